"""Calibration plots as PNG: reliability diagram, ROC with the operating point, score histograms.

matplotlib is imported lazily (extra ``.[plots]``); without it `write_plots` returns a note
instead of failing the calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iqe.calibration.operating_point import ECE_BINS, apply_normalisation, roc_curve


def write_plots(folder: Path, scores: np.ndarray, labels: np.ndarray, entry: dict) -> list[Path] | str:
    """Write the PNGs for one entry under `folder`; returns their paths, or a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'iqe-engine[plots]')"
    folder.mkdir(parents=True, exist_ok=True)
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    normal, abnormal = scores[labels == 0], scores[labels == 1]
    t, key, name = entry["threshold"], entry["score_key"], entry["target"]
    written = []

    fig, ax = plt.subplots(figsize=(5, 3.6))
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(normal, bins=bins, alpha=0.6, label=f"normal (n={len(normal)})", color="tab:blue")
    if len(abnormal):
        ax.hist(abnormal, bins=bins, alpha=0.6, label=f"abnormal (n={len(abnormal)})", color="tab:red")
    ax.axvline(t, color="k", ls="--", label=f"threshold {t:.4g}")
    ax.set(xlabel=key, ylabel="cases", title=f"{name}: score histograms")
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / f"{name}_histograms.png"))

    if len(abnormal):
        fpr, tpr, _ = roc_curve(normal, abnormal)
        m = entry["metrics"]
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        ax.plot(fpr, tpr, color="tab:purple", label=f"AUC {m['auc']['value']:.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        se, sp = m["sensitivity"], m["specificity"]
        ax.errorbar([1 - sp["value"]], [se["value"]],
                    xerr=[[sp["ci95"][1] - sp["value"]], [sp["value"] - sp["ci95"][0]]],
                    yerr=[[se["value"] - se["ci95"][0]], [se["ci95"][1] - se["value"]]],
                    fmt="o", color="k", capsize=3, label=f"operating point ({entry['rule']})")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{name}: ROC ({key})", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=8, loc="lower right")
        written.append(_save(fig, folder / f"{name}_roc.png"))

        prob = apply_normalisation(entry["normalisation"], scores)
        order = np.argsort(prob, kind="stable")
        chunks = np.array_split(order, min(ECE_BINS, len(order)))
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        ax.plot([prob[c].mean() for c in chunks], [labels[c].mean() for c in chunks], "o-", color="tab:green",
                label=f"{entry['normalisation']['method']} (in-sample)")
        ax.set(xlabel="calibrated probability", ylabel="observed abnormal fraction", xlim=(0, 1), ylim=(0, 1),
               title=f"{name}: reliability (equal-count bins)")
        ax.legend(fontsize=8, loc="upper left")
        written.append(_save(fig, folder / f"{name}_reliability.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
