"""Building blocks shared by the CLIP towers (REFERENCE.md §2, §4).

Parameter names follow OpenAI's CLIP (`attn.in_proj_weight`, `mlp.c_fc`, ...) so that a
CLIP state dict maps onto these modules key for key.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (CLIP's LayerNorm).

    A named wrapper so that FP16 export can recognise it: LayerNorm statistics overflow
    in FP16 after attention.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


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

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v, heads merged, then out_proj."""
        scores = (q / self.head_dim**0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        # softmax in float32: a no-op for FP32, and keeps FP16 exports from overflowing
        out = scores.float().softmax(dim=-1).to(v.dtype) @ v
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.width))

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


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
