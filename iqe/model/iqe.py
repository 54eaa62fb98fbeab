"""IQE-CLIP: CLIP towers + query init + CPT + patch adapter + IQM -> maps and scores.

`IQEModel.forward(images)` returns the raw outputs of REFERENCE.md §3-6 (before Gaussian
smoothing); `IQEModel.score(images)` adds `map_smooth` and `map_max`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from iqe.model.clip import PromptedTextTransformer, TextPrefix, VisionTransformer
from iqe.model.config import IQEConfig
from iqe.model.iqm import IQM

OUTPUT_KEYS = ("score", "score_query", "score_text", "score_few", "map", "map_query", "map_text")


class GlobalConvTokens(nn.Module):
    """tokens + Conv1d(1 -> k, kernel 3, 'same')(g): k tokens conditioned on the global feature.

    Used twice (REFERENCE §3): the query init (`query_tokens`, `query_linear`) and the
    class-based prompt tokens (`prompt_query`, `prompt_linear1`).
    """

    def __init__(self, k: int, width: int):
        super().__init__()
        self.tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, k, width)))
        self.fc = nn.Conv1d(1, k, 3, padding="same")

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.tokens + self.fc(g[:, None, :])  # [B, k, width]


class IQEModel(nn.Module):
    """IQE-CLIP inference and training graph.

    Parameter groups: `visual` and `text` (CLIP, frozen in training except the `prompt_*`
    parameters of `text`), `query_init`, `cpt` (+ `prompt_temp`), `patch_adapter`, `iqm`.
    """

    def __init__(self, cfg: IQEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        e = cfg.embed_dim
        self.visual = VisionTransformer(cfg)
        self.text = PromptedTextTransformer(cfg)
        self.query_init = GlobalConvTokens(2, e)
        self.cpt = GlobalConvTokens(cfg.prompt_len, e)
        self.prompt_temp = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.patch_adapter = nn.ModuleList(nn.Linear(cfg.vision.width, e) for _ in cfg.features)
        self.iqm = IQM(cfg.iqm, patch_width=e, text_width=e)
        self._prefix: TextPrefix | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module.invalidate_text_prefix())

    # -- text prefix cache ---------------------------------------------------------------
    def invalidate_text_prefix(self) -> None:
        self._prefix = None

    def train(self, mode: bool = True) -> "IQEModel":
        self.invalidate_text_prefix()
        return super().train(mode)

    def text_prefix(self) -> TextPrefix:
        """The precomputed prefix; recomputed every call while training (weights move)."""
        if self.training and torch.is_grad_enabled():
            return self.text.compute_prefix()
        if self._prefix is None:
            with torch.no_grad():
                self._prefix = self.text.compute_prefix()
        return self._prefix

    # -- stages ----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B,3,S,S] -> (q0 [B,2,E], text [B,2,E], patch features [K,B,L,E])."""
        g, taps = self.visual(images)
        q0 = self.query_init(g)
        text = self.text.forward_prefixed(self.cpt(g), self.text_prefix())
        feats = torch.stack([fc(t[:, 1:]) for fc, t in zip(self.patch_adapter, taps)])  # class token dropped
        return q0, text, feats

    def logits(self, q0: torch.Tensor, text: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and text logits [K, B, L, 2]; the IQM runs once over all K layers."""
        k, b, n, e = feats.shape
        queries = self.iqm(
            q0.repeat(k, 1, 1), feats.reshape(k * b, n, e), text.repeat(k, 1, 1)
        ).view(k, b, 2, e)
        f = feats / feats.norm(dim=-1, keepdim=True)
        q = queries / queries.norm(dim=-1, keepdim=True)
        logits_query = f @ q.transpose(-1, -2)
        logits_text = self.prompt_temp.exp() * f @ text.transpose(-1, -2)[None]
        return logits_query, logits_text

    def maps(self, logits: torch.Tensor) -> torch.Tensor:
        """[K, B, L, 2] logits -> per-layer anomaly maps [K, B, S, S] (softmax channel 1).

        Upsampling happens on logits with align_corners=True, softmax after (as the reference).
        """
        k, b, n, _ = logits.shape
        grid = self.cfg.grid
        x = logits.permute(0, 1, 3, 2).reshape(k * b, 2, grid, grid)
        x = F.interpolate(x, size=self.cfg.image_size, mode="bilinear", align_corners=True)
        return x.softmax(dim=1)[:, 1].view(k, b, self.cfg.image_size, self.cfg.image_size)

    def outputs(self, logits_query: torch.Tensor, logits_text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores [B] and maps [B, S, S] from the per-layer logits (REFERENCE §6)."""
        score_query = logits_query.softmax(dim=-1)[..., 1].mean(dim=-1).sum(dim=0)
        score_text = logits_text.softmax(dim=-1)[..., 1].mean(dim=-1).sum(dim=0)
        map_query = self.maps(logits_query).mean(dim=0)
        map_text = self.maps(logits_text).mean(dim=0)
        alpha = self.cfg.alpha
        return {
            "score": score_query + score_text,
            "score_query": score_query,
            "score_text": score_text,
            # test_few.py's image score: pixel means of the layer-averaged maps.
            "score_few": map_text.flatten(1).mean(dim=1) + map_query.flatten(1).mean(dim=1),
            "map": (1 - alpha) * map_text + alpha * map_query,
            "map_query": map_query,
            "map_text": map_text,
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw IQE-CLIP outputs for a batch (no smoothing, no normalisation).

        Returns:
            dict with `score`, `score_query`, `score_text`, `score_few` [B] and `map`,
            `map_query`, `map_text` [B, S, S].
        """
        return self.outputs(*self.logits(*self.encode(images)))

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """forward() + smoothing, as float32 NumPy arrays (see `smooth_outputs`)."""
        out = {k: v.float().cpu().numpy() for k, v in self.forward(images).items()}
        return smooth_outputs(out, self.cfg.sigma)


def smooth_outputs(out: dict[str, np.ndarray], sigma: float) -> dict[str, np.ndarray]:
    """Add `map_smooth` (scipy gaussian_filter, reflect, truncate 4) and `map_max` (its max).

    Applied per image, which equals the reference's `gaussian_filter(..., axes=(1, 2))`
    over the stacked test set.
    """
    maps = np.asarray(out["map"], dtype=np.float32)
    smooth = np.stack([gaussian_filter(m, sigma=sigma) for m in maps]) if len(maps) else maps.copy()
    return {**out, "map_smooth": smooth, "map_max": smooth.reshape(len(smooth), -1).max(axis=1) if len(smooth) else smooth[:, 0, 0]}
