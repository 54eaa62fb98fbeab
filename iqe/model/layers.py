"""Building blocks shared by the CLIP towers (REFERENCE.md §2, §4).

Parameter names follow OpenAI's CLIP (`attn.in_proj_weight`, `mlp.c_fc`, ...) so that a
CLIP state dict maps onto these modules key for key.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# GEMMs of a residual block that a precision policy may run in FP16 (iqe.export.precision).
# The attention logits q k^T and the softmax are not among them: they stay float32.
FP16_OPS = ("qkv", "attn_v", "out_proj", "mlp_fc", "mlp_proj")


@dataclass(frozen=True)
class BlockPrecision:
    """Which GEMMs of one block run in FP16, and how.

    `ops` lists members of FP16_OPS. `emulate=False` casts for real (FP16 inputs and
    weights, FP32 accumulation, FP16 output cast back to float32: what the ONNX graph and
    TensorRT run); `emulate=True` applies the same roundings in float32 arithmetic, so a
    policy sweep runs on any CPU at float32 speed.
    """

    ops: frozenset[str] = frozenset()
    emulate: bool = False


FP32 = BlockPrecision()


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for the noise-floor reference)."""
    return t if t.dtype == torch.float64 else t.float()


def _round16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: str, prec: BlockPrecision) -> torch.Tensor:
    """x @ weight^T + bias, in FP16 when `op` is in `prec.ops`; the result is in x's dtype.

    The residual stream around it stays float32 either way.
    """
    if op not in prec.ops:
        return F.linear(x, weight, bias)
    if prec.emulate:
        return _round16(F.linear(_round16(x), _round16(weight), None if bias is None else _round16(bias)))
    return F.linear(x.half(), weight.half(), None if bias is None else bias.half()).to(x.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor, op: str, prec: BlockPrecision) -> torch.Tensor:
    """a @ b, in FP16 when `op` is in `prec.ops` (as `gemm`)."""
    if op not in prec.ops:
        return a @ b
    if prec.emulate:
        return _round16(_round16(a) @ _round16(b))
    return (a.half() @ b.half()).to(a.dtype)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (CLIP's LayerNorm).

    A named wrapper so that FP16 export can recognise it: LayerNorm statistics overflow
    in FP16 after attention.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(upcast(x)).to(x.dtype)


class MultiheadAttention(nn.Module):
    """Attention with a packed q/k/v in-projection, OpenAI CLIP layout, batch first.

    `forward(x, mask)` is self-attention; `project_kv` / `attend` split it so that the
    text branch can reuse keys and values of a precomputed prefix.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.precision = FP32  # set by iqe.export.precision.apply_policy

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = gemm(x, self.in_proj_weight, self.in_proj_bias, "qkv", self.precision).chunk(3, dim=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v, heads merged, then out_proj.

        The logits and the softmax are computed in float32 whatever the policy: with
        sharp attention (large q/k) FP16 logits move the attention pattern.
        """
        scores = (upcast(q) / self.head_dim**0.5) @ upcast(k).transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        out = matmul(scores.softmax(dim=-1).to(v.dtype), v, "attn_v", self.precision)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.width)
        return gemm(out, self.out_proj.weight, self.out_proj.bias, "out_proj", self.precision)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*self.project_qkv(x), mask)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); the MLP uses exact (erf) GELU.

    The reference replaced OpenAI's QuickGELU with nn.GELU(); using QuickGELU here would
    silently change every output.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNormFp32(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNormFp32(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    @property
    def precision(self) -> BlockPrecision:
        return self.attn.precision

    @precision.setter
    def precision(self, value: BlockPrecision) -> None:
        self.attn.precision = value

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """self.mlp(x) under the block's precision (GELU in float32 between the GEMMs)."""
        prec, fc, proj = self.attn.precision, self.mlp.c_fc, self.mlp.c_proj
        h = self.mlp.gelu(gemm(x, fc.weight, fc.bias, "mlp_fc", prec))
        return gemm(h, proj.weight, proj.bias, "mlp_proj", prec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp_forward(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks (kept as `resblocks` for CLIP key compatibility)."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


def causal_mask(n: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """Additive causal mask [n, n]: 0 on and below the diagonal, the dtype's minimum above.

    The dtype's own minimum (not -inf, not float32's minimum) keeps the mask finite in FP16.
    """
    full = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(full, diagonal=1)
