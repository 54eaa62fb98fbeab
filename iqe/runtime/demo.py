"""`iqe demo`: the main job on the embedded default, with no download.

synthesize a BMAD-layout data set -> score the target's test split with the demo bundle
-> results.jsonl + maps.npz + heatmap overlays + summary.json (image and pixel AUC).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from iqe.engine.build import best_backend, make_runner
from iqe.model.data import list_split
from iqe.model.preprocess import load_mask
from iqe.model.synth import write_synthetic_bmad
from iqe.model.train import roc_auc
from iqe.runtime.overlay import save_overlay
from iqe.runtime.results import write_results
from iqe.runtime.scoring import score_inputs


def run_demo(out: Path, bundle: Path, target: str = "Brain", batch_size: int = 8, n_overlays: int = 6,
             progress: bool = True, backend: str | None = None) -> dict:
    """Run the demo end to end and return its summary (also written to `out/summary.json`).

    bundle -> export -> engine on the best backend available here (or `backend`) -> score.
    """
    out.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_bmad(out / "data", seed=0, overwrite=True)
    samples = list_split(data, target, "test")
    backend = backend or best_backend()
    print(f"iqe demo: backend {backend}", flush=True)
    runner = make_runner(bundle, backend, "fp32", progress=progress)
    with runner:
        t0 = time.perf_counter()
        results = score_inputs([s.image for s in samples], runner.infer, runner.image_size, batch_size,
                               keep_maps=True, keep_images=True, progress=progress)
        seconds = time.perf_counter() - t0
    write_results(out, results, save_maps=True)
    labels = np.array([s.label for s in samples])
    scores = np.array([r.scores["score"] for r in results])
    summary = {
        "backend": f"{backend} ({runner.device})",
        "bundle": str(bundle),
        "target": target,
        "images": len(samples),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(samples) / seconds, 2),
        "image_auc": round(roc_auc(scores, labels), 4),
        "image_auc_map_max": round(roc_auc(np.array([r.scores["map_max"] for r in results]), labels), 4),
    }
    masked = [(r, s) for r, s in zip(results, samples) if s.mask is not None or s.label == 0]
    if any(s.mask is not None for _, s in masked):
        size = runner.image_size
        pix = np.concatenate([r.map_smooth.ravel() for r, _ in masked])
        gt = np.concatenate([(load_mask(s.mask, size) if s.mask else np.zeros((size, size), np.float32)).ravel()
                             for _, s in masked])
        summary["pixel_auc"] = round(roc_auc(pix, gt), 4)
    # Overlays: the most and least anomalous images, one colour range for all of them.
    order = np.argsort(-scores)
    picks = list(order[: (n_overlays + 1) // 2]) + list(order[::-1][: n_overlays // 2])
    lo = min(float(r.map_smooth.min()) for r in results)
    hi = max(float(r.map_smooth.max()) for r in results)
    overlays = []
    for i in picks[:n_overlays]:
        r, s = results[i], samples[i]
        name = f"{'abnormal' if s.label else 'normal'}_{Path(r.path).stem}_score{r.scores['score']:.3f}.png"
        overlays.append(str(save_overlay(r.image, r.map_smooth, out / "overlays" / name, lo, hi)))
    summary["overlays"] = overlays
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
