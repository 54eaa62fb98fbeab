"""`iqe demo`: the main job on the embedded default, with no download.

synthesize a Brain data set (MNI152 anatomy, painted lesions) -> copy the demo bundle to
``out/bundle`` -> score the calibration split (``valid``) and fit an operating point on it
(`iqe.calibration`, stored in ``out/bundle/calibration.json``) -> score the separate test
split, annotate every row with its decision -> results.jsonl + maps.npz + overlays with the
score, decision and a colour bar burned in + summary.json (image AUC of the reference
``score`` and of ``map_max``, pixel AUC, the operating point's reported and observed
sensitivity / specificity).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from iqe.engine.build import best_backend, bundle_key, make_runner
from iqe.model.data import list_split
from iqe.model.preprocess import load_mask
from iqe.model.synth import write_synthetic_bmad
from iqe.model.train import roc_auc
from iqe.runtime.overlay import colorize, save_overlay
from iqe.runtime.results import write_results
from iqe.runtime.scoring import score_inputs

DEMO_SCORE_KEY = "map_max"  # the decision score: the paper's image score (max of the smoothed map)
DEMO_SENSITIVITY = 0.9  # operating point fitted on the calibration split
DEMO_COUNTS = {"train": 0, "valid": 50, "test": 50}  # images per class: calibration split / test split
DEMO_SEED = 0  # the demo bundle was trained on seed 1 (and pretrained on seed 2): no image is shared


def _burn_in(path: Path, lines: list[str], vmin: float, vmax: float, colour: tuple[int, int, int]) -> Path:
    """Add a colour bar (map value scale) on the right and caption lines on top of an overlay PNG."""
    from PIL import Image, ImageDraw, ImageFont

    base = Image.open(path).convert("RGB")
    w, h = base.size
    bar_w, pad, top = 14, 46, 34
    canvas = Image.new("RGB", (w + bar_w + pad, h + top), (0, 0, 0))
    canvas.paste(base, (0, top))
    ramp = colorize(np.linspace(1, 0, h, dtype=np.float32)[:, None].repeat(bar_w, axis=1))
    canvas.paste(Image.fromarray(ramp), (w + 4, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    draw.text((w + bar_w + 6, top), f"{vmax:.2f}", fill=(255, 255, 255), font=font)
    draw.text((w + bar_w + 6, top + h - 12), f"{vmin:.2f}", fill=(255, 255, 255), font=font)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 15 * i), line, fill=colour if i == 0 else (255, 255, 255), font=font)
    canvas.save(path)
    return path


def _score(runner, paths: list[Path], batch_size: int, progress: bool, keep: bool):
    return score_inputs([str(p) for p in paths], runner.infer, runner.image_size, batch_size, keep_maps=keep,
                        keep_images=keep, progress=progress)


def run_demo(out: Path, bundle: Path, target: str = "Brain", batch_size: int = 8, n_overlays: int = 6,
             progress: bool = True, backend: str | None = None) -> dict:
    """Run the demo end to end and return its summary (also written to `out/summary.json`).

    bundle -> export -> engine on the best backend available here (or `backend`) -> score
    the calibration split -> fit the operating point -> score and decide the test split.
    """
    from iqe.calibration import annotate_results
    from iqe.calibration.fit import fit_entry, save_entry
    from iqe.calibration.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_bmad(out / "data", objects=(target,), n_per_class=DEMO_COUNTS, seed=DEMO_SEED, overwrite=True)
    calib_samples, test_samples = list_split(data, target, "valid"), list_split(data, target, "test")
    # A private copy: calibration.json goes into it, the packaged bundle stays untouched.
    local = out / "bundle"
    shutil.rmtree(local, ignore_errors=True)
    shutil.copytree(bundle, local, ignore=shutil.ignore_patterns("calibration.json", "calibration_plots"))
    backend = backend or best_backend()
    print(f"iqe demo: backend {backend}", flush=True)
    runner = make_runner(local, backend, "fp32", progress=progress)
    with runner:
        calib = _score(runner, [s.image for s in calib_samples], batch_size, progress, keep=False)
        t0 = time.perf_counter()
        results = _score(runner, [s.image for s in test_samples], batch_size, progress, keep=True)
        seconds = time.perf_counter() - t0

    # Operating point from the calibration split only.
    calib_scores = np.array([r.scores[DEMO_SCORE_KEY] for r in calib])
    calib_labels = np.array([s.label for s in calib_samples])
    entry = fit_entry(calib_scores, calib_labels, target=target, score_key=DEMO_SCORE_KEY, rule="sensitivity",
                      requested=DEMO_SENSITIVITY, data={"source": str(data), "description": f"synthetic {target}_AD/valid "
                                                        f"(seed {DEMO_SEED})", "failed": 0, "backend": backend,
                                                        "precision": "fp32"})
    save_entry(local, entry, bundle_key(local))
    plots = write_plots(out / "calibration_plots", calib_scores, calib_labels, entry)
    annotate_results(results, local)
    write_results(out, results, save_maps=True)

    labels = np.array([s.label for s in test_samples])
    scores = {k: np.array([r.scores[k] for r in results]) for k in ("score", DEMO_SCORE_KEY)}
    decided = np.array([r.extra["decision"] == "abnormal" for r in results])
    observed = {"sensitivity": float(decided[labels == 1].mean()), "specificity": float(1 - decided[labels == 0].mean())}
    reported = entry["metrics"]
    summary = {
        "backend": f"{backend} ({runner.device})",
        "bundle": str(bundle),
        "target": target,
        "images": len(test_samples),
        "calibration_images": len(calib_samples),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(test_samples) / seconds, 2),
        "image_auc": round(roc_auc(scores["score"], labels), 4),
        "image_auc_map_max": round(roc_auc(scores[DEMO_SCORE_KEY], labels), 4),
        "decision_score": DEMO_SCORE_KEY,
    }
    size = runner.image_size
    pix = np.concatenate([r.map_smooth.ravel() for r in results])
    gt = np.concatenate([(load_mask(s.mask, size) if s.mask else np.zeros((size, size), np.float32)).ravel()
                         for s in test_samples])
    summary["pixel_auc"] = round(roc_auc(pix, gt), 4)
    summary["operating_point"] = {
        "fitted_on": f"{target}_AD/valid ({entry['data']['normal']} normal, {entry['data']['abnormal']} abnormal)",
        "rule": f"sensitivity >= {DEMO_SENSITIVITY}",
        "threshold": entry["threshold"],
        "calibration": str(local / "calibration.json"),
        **{k: {"reported": round(reported[k]["value"], 4), "ci95": [round(v, 4) for v in reported[k]["ci95"]],
               "observed_on_test": round(observed[k], 4),
               "inside_ci95": bool(reported[k]["ci95"][0] <= observed[k] <= reported[k]["ci95"][1])}
           for k in ("sensitivity", "specificity")},
    }
    summary["calibration_plots"] = plots if isinstance(plots, str) else [str(p) for p in plots]

    # Overlays: the most and least anomalous test images by the decision score, one colour range.
    order = np.argsort(-scores[DEMO_SCORE_KEY])
    picks = list(order[: (n_overlays + 1) // 2]) + list(order[::-1][: n_overlays // 2])
    lo = min(float(r.map_smooth.min()) for r in results)
    hi = max(float(r.map_smooth.max()) for r in results)
    overlays = []
    for i in picks[:n_overlays]:
        r, s = results[i], test_samples[i]
        truth = "abnormal" if s.label else "normal"
        name = f"{truth}_{Path(r.path).stem}_{r.extra['decision']}.png"
        path = save_overlay(r.image, r.map_smooth, out / "overlays" / name, lo, hi)
        colour = (255, 80, 80) if r.extra["decision"] == "abnormal" else (120, 220, 120)
        _burn_in(path, [f"{r.extra['decision'].upper()}  {DEMO_SCORE_KEY} {r.scores[DEMO_SCORE_KEY]:.3f} "
                        f"(threshold {entry['threshold']:.3f})",
                        f"p(abnormal) {r.extra['calibrated_score']:.2f}  truth: {truth}"], lo, hi, colour)
        overlays.append(str(path))
    summary["overlays"] = overlays
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
