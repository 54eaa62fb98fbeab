"""Instance-aware Query Module: a BLIP-2 Q-Former-style stack (REFERENCE.md §5).

Each layer: self-attention over the queries, cross-attention to the patch features,
cross-attention to the text embeddings, feed-forward; each ends with
LayerNorm(dense(out) + input). Module names follow the BERT/Q-Former layout of the
reference checkpoint (`attention.attention.query`, `output.LayerNorm`, ...), so its
`iqm` state dict loads key for key. Masks in the reference are all-ones (no effect) and
no positional embedding is added (code != paper), so neither exists here.
"""

from __future__ import annotations

import torch
from torch import nn

from iqe.model.config import IQMConfig


class IQMMultiHeadAttention(nn.Module):
    def __init__(self, cfg: IQMConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(hidden)), self._split(self.key(context)), self._split(self.value(context))
        # The reference divides the scores (not q) by sqrt(head_dim).
        probs = ((q @ k.transpose(-1, -2)) / self.head_dim**0.5).softmax(dim=-1)
        out = probs @ v
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class IQMOutput(nn.Module):
    """LayerNorm(dense(x) + residual): BERT's SelfOutput / Output."""

    def __init__(self, in_width: int, cfg: IQMConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # BERT key name

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class IQMAttention(nn.Module):
    def __init__(self, cfg: IQMConfig, kv_width: int):
        super().__init__()
        self.attention = IQMMultiHeadAttention(cfg, kv_width)
        self.output = IQMOutput(cfg.hidden_size, cfg)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(hidden, context), hidden)


class IQMIntermediate(nn.Module):
    def __init__(self, cfg: IQMConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU()  # transformers' "gelu": exact erf GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class IQMLayer(nn.Module):
    def __init__(self, cfg: IQMConfig, patch_width: int, text_width: int):
        super().__init__()
        self.attention = IQMAttention(cfg, cfg.hidden_size)
        self.crossattention = IQMAttention(cfg, patch_width)
        self.text_crossattention = IQMAttention(cfg, text_width)
        self.intermediate_query = IQMIntermediate(cfg)
        self.output_query = IQMOutput(cfg.intermediate_size, cfg)

    def forward(self, h: torch.Tensor, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.attention(h, h)
        h = self.crossattention(h, patches)
        h = self.text_crossattention(h, text)
        return self.output_query(self.intermediate_query(h), h)


class IQMEncoder(nn.Module):
    def __init__(self, cfg: IQMConfig, patch_width: int, text_width: int):
        super().__init__()
        self.layer = nn.ModuleList(IQMLayer(cfg, patch_width, text_width) for _ in range(cfg.num_hidden_layers))


class IQM(nn.Module):
    """forward(queries [N,Q,D], patches [N,L,D_p], text [N,T,D_t]) -> refined queries [N,Q,D]."""

    def __init__(self, cfg: IQMConfig, patch_width: int, text_width: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = IQMEncoder(cfg, patch_width, text_width)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.layernorm(queries)
        for layer in self.encoder.layer:
            h = layer(h, patches, text)
        return h
