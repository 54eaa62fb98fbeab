"""The two CLIP towers of the reference variant (REFERENCE.md §2 and §4).

`VisionTransformer` returns the global feature and the raw residual streams after the
selected blocks. `PromptedTextTransformer` turns per-image class-based prompt tokens
(CPT) into the two text embeddings, either over the full 77-token sequence (as the
reference does) or from a precomputed prefix: the mask is causal, so every position
before the first CPT token is the same for all images and only the CPT rows need
computing per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iqe.model.config import IQEConfig
from iqe.model.layers import LayerNormFp32, Transformer, causal_mask


class VisionTransformer(nn.Module):
    """OpenAI CLIP ViT without the final ln_post on the tapped layers.

    forward(images [B,3,S,S]) -> (global feature [B, embed_dim], [tokens_k [B, 1+G*G, W] for k in features])
    """

    def __init__(self, cfg: IQEConfig):
        super().__init__()
        v = cfg.vision
        self.grid = cfg.grid
        self.features = list(cfg.features)
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        scale = v.width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid * self.grid + 1, v.width))
        self.ln_pre = LayerNormFp32(v.width)
        self.transformer = Transformer(v.width, v.layers, cfg.vision_heads)
        self.ln_post = LayerNormFp32(v.width)
        self.proj = nn.Parameter(scale * torch.randn(v.width, cfg.embed_dim))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, W, G, G]; trailing pixels unused
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, W], row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        taps = []
        for i, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x)
            if i in self.features:
                taps.append(x)
        g = self.ln_post(x[:, 0]) @ self.proj
        return g, taps


@dataclass
class TextPrefix:
    """Keys and values of the image-independent prefix, per block: [2 prompts, H, P, hd]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class PromptedTextTransformer(nn.Module):
    """CLIP text tower with deep prompts and class-based prompt tokens (REFERENCE §4).

    Two prompts ("normal", "abnormal"); in each the end token at index p is replaced by the
    r CPT vectors of the image. A deep prompt of n tokens sits at index 1 (after the
    start token) and is replaced by a fresh projection before every block i >= 1.
    """

    def __init__(self, cfg: IQEConfig):
        super().__init__()
        t = cfg.text
        self.p = cfg.end_position
        self.r = cfg.prompt_len
        self.n = cfg.deep_prompt_len
        self.context_length = t.context_length
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, cfg.text_heads)
        self.ln_final = LayerNormFp32(t.width)
        self.text_projection = nn.Parameter(t.width**-0.5 * torch.randn(t.width, cfg.embed_dim))
        # Deep prompt parameters, named as in the reference's CLIP (`prompt` in every name).
        self.prompt_embeddings = nn.Parameter(torch.empty(1, self.n, t.width).uniform_(-1, 1))
        self.deep_prompt_embeddings = nn.Parameter(torch.empty(cfg.deep_prompt_layers, self.n, t.width).uniform_(-1, 1))
        self.prompt_proj = nn.Linear(t.width, t.width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = LayerNormFp32(t.width, eps=1e-6)
        ids = torch.zeros(2, t.context_length, dtype=torch.long)
        ids[0, : len(cfg.normal_prompt_ids)] = torch.tensor(cfg.normal_prompt_ids)
        ids[1, : len(cfg.abnormal_prompt_ids)] = torch.tensor(cfg.abnormal_prompt_ids)
        self.register_buffer("prompt_ids", ids, persistent=False)

    def _deep_prompt(self, block_index: int) -> torch.Tensor:
        """Prompt tokens inserted before block `block_index` ([n, W])."""
        source = self.prompt_embeddings[0] if block_index == 0 else self.deep_prompt_embeddings[block_index - 1]
        return self.prompt_proj(source)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """prompt_norm, then ln_final, projection, L2 normalisation of the last CPT token.

        The reference normalises, averages over its single template and normalises
        again; the second normalisation is kept because it is not bit-exact identity.
        """
        x = self.ln_final(self.prompt_norm(x)) @ self.text_projection
        x = x / x.norm(dim=-1, keepdim=True)
        return x / x.norm(dim=-1, keepdim=True)

    # -- full sequence (the reference's computation) -----------------------------------
    def forward_full(self, cpt: torch.Tensor) -> torch.Tensor:
        """Text embeddings from the full 77-token sequences.

        Args:
            cpt: [B, r, W] class-based prompt tokens.
        Returns:
            [B, 2, E] L2-normalised (normal, abnormal) text embeddings.
        """
        b, ctx, p, r, n = cpt.shape[0], self.context_length, self.p, self.r, self.n
        tok = self.token_embedding(self.prompt_ids).to(cpt.dtype)  # [2, ctx, W]
        seq = torch.cat(
            [
                tok[:, None, :p].expand(2, b, p, -1),
                cpt[None].expand(2, -1, -1, -1),
                tok[:, None, p + 1 : ctx - r + 1].expand(2, b, ctx - r - p, -1),
            ],
            dim=2,
        ).reshape(2 * b, ctx, -1)
        x = seq + self.positional_embedding.to(seq.dtype)
        mask = causal_mask(ctx, x.dtype, x.device)
        x = torch.cat([x[:, :1], self._deep_prompt(0).expand(2 * b, -1, -1), x[:, 1 : ctx - n]], dim=1)
        for i, block in enumerate(self.transformer.resblocks):
            if i > 0:
                x = torch.cat([x[:, :1], self._deep_prompt(i).expand(2 * b, -1, -1), x[:, 1 + n :]], dim=1)
            x = block(x, mask)
        x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)  # drop the deep prompt tokens
        out = self._head(x[:, p + r - 1])  # the last CPT token
        return out.view(2, b, -1).transpose(0, 1)

    # -- precomputed prefix -------------------------------------------------------------
    def compute_prefix(self) -> TextPrefix:
        """Keys/values of every position before the first CPT token, for both prompts.

        Positions: start token, n deep-prompt tokens, prompt tokens 1..p-1 (P = p + n).
        Differentiable, so training can call it every step; inference caches it.
        """
        p, n = self.p, self.n
        tok = self.token_embedding(self.prompt_ids[:, :p]) + self.positional_embedding[:p]  # [2, p, W]
        x = torch.cat([tok[:, :1], self._deep_prompt(0).expand(2, -1, -1), tok[:, 1:]], dim=1)
        mask = causal_mask(x.shape[1], x.dtype, x.device)
        keys, values = [], []
        for i, block in enumerate(self.transformer.resblocks):
            if i > 0:
                x = torch.cat([x[:, :1], self._deep_prompt(i).expand(2, -1, -1), x[:, 1 + n :]], dim=1)
            _, k, v = block.attn.project_qkv(block.ln_1(x))
            keys.append(k)
            values.append(v)
            x = block(x, mask)
        return TextPrefix(keys, values)

    def forward_prefixed(self, cpt: torch.Tensor, prefix: TextPrefix) -> torch.Tensor:
        """Text embeddings computing only the r CPT positions per image.

        Args:
            cpt: [B, r, W] class-based prompt tokens.
            prefix: from `compute_prefix` (same weights).
        Returns:
            [B, 2, E], equal to `forward_full` up to float rounding.
        """
        b, p, r = cpt.shape[0], self.p, self.r
        y = (cpt + self.positional_embedding[p : p + r].to(cpt.dtype))[None].expand(2, -1, -1, -1).reshape(2 * b, r, -1)
        plen = prefix.keys[0].shape[2]
        # Each CPT row sees the whole prefix and the CPT rows up to itself.
        mask = causal_mask(plen + r, y.dtype, y.device)[plen:]
        for i, block in enumerate(self.transformer.resblocks):
            q, k, v = block.attn.project_qkv(block.ln_1(y))
            pk = prefix.keys[i][:, None].expand(-1, b, -1, -1, -1).flatten(0, 1)  # [2B, H, P, hd]
            pv = prefix.values[i][:, None].expand(-1, b, -1, -1, -1).flatten(0, 1)
            y = y + block.attn.attend(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), mask)
            y = y + block.mlp(block.ln_2(y))
        out = self._head(y[:, r - 1])
        return out.view(2, b, -1).transpose(0, 1)
