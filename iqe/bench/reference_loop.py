"""The baseline: the same weights run the way the reference's test loop runs them.

Differences from the engine, all of them the reference's (REFERENCE.md §4-6):

- eager PyTorch, float32;
- the text branch runs the full 77-token sequence of both prompts (`forward_full`),
  once per image, in a Python loop over the batch (no precomputed prefix);
- the IQM runs once per tapped layer (four calls) instead of once over the layers
  folded into the batch;
- maps are upsampled and soft-maxed per layer, then averaged; the smoothing is
  scipy's `gaussian_filter` per image on the host.

The math is written out here from REFERENCE.md rather than calling `IQEModel.outputs`,
so agreement with the engine is a check, not a tautology.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from iqe.engine.runners import Runner
from iqe.model.iqe import IQEModel

OUTPUT_KEYS = ("score", "score_query", "score_text", "score_few", "map", "map_query", "map_text", "map_smooth",
               "map_max")


class ReferenceLoopRunner(Runner):
    """Runner interface around the reference-style loop (CPU or CUDA, float32 only)."""

    name = "reference-loop"

    def __init__(self, model: IQEModel, device: str = "cpu"):
        super().__init__(model.cfg.image_size)
        self.model = model
        self.device = device

    def _activate(self) -> None:
        self.model = self.model.float().to(self.device).eval()

    @torch.inference_mode()
    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        m, cfg = self.model, self.model.cfg
        x = torch.from_numpy(images).to(self.device)
        b, size, grid = x.shape[0], cfg.image_size, cfg.grid
        g, taps = m.visual(x)
        q0 = m.query_init(g)
        cpt = m.cpt(g)
        # The reference's text branch: one image at a time, full sequences.
        text = torch.cat([m.text.forward_full(cpt[i : i + 1]) for i in range(b)])  # [B, 2, E]
        temp = m.prompt_temp.exp()
        score_q = torch.zeros(b, device=x.device)
        score_t = torch.zeros(b, device=x.device)
        map_q = torch.zeros(b, size, size, device=x.device)
        map_t = torch.zeros(b, size, size, device=x.device)
        for fc, tokens in zip(m.patch_adapter, taps):
            feats = fc(tokens[:, 1:])  # [B, L, E], class token dropped
            queries = m.iqm(q0, feats, text)  # one IQM call per layer
            f = feats / feats.norm(dim=-1, keepdim=True)
            q = queries / queries.norm(dim=-1, keepdim=True)
            for logits, score, acc in ((f @ q.transpose(1, 2), score_q, map_q),
                                       (temp * f @ text.transpose(1, 2), score_t, map_t)):
                score += logits.softmax(dim=-1)[..., 1].mean(dim=1)
                grid_logits = logits.permute(0, 2, 1).reshape(b, 2, grid, grid)
                up = F.interpolate(grid_logits, size=(size, size), mode="bilinear", align_corners=True)
                acc += up.softmax(dim=1)[:, 1]
        k = len(taps)
        map_q, map_t = map_q / k, map_t / k
        anomaly = (1 - cfg.alpha) * map_t + cfg.alpha * map_q
        out = {
            "score": score_q + score_t,
            "score_query": score_q,
            "score_text": score_t,
            "score_few": map_t.flatten(1).mean(dim=1) + map_q.flatten(1).mean(dim=1),
            "map": anomaly,
            "map_query": map_q,
            "map_text": map_t,
        }
        res = {key: v.float().cpu().numpy() for key, v in out.items()}
        res["map_smooth"] = np.stack([gaussian_filter(a, sigma=cfg.sigma) for a in res["map"]])
        res["map_max"] = res["map_smooth"].reshape(b, -1).max(axis=1)
        return res
