"""`iqe check`: compare two configurations (backend x precision) on the user's own files.

In the spirit of `polygraphy run --onnxrt --trt`: both configurations score the same
inputs through the normal runtime (readers, preprocessing, runners), and the second is
judged against the first by the fidelity contract (iqe.export.fidelity): per-output max
abs, per-image map correlation, score Spearman and Kendall, decision flips at the
bundle's operating point (`calibration.json` in the bundle, when present), the worst
images. Writes check.json, check.md and check.png (scatter of the image scores, map
correlation per image); exits 1 when past the limits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from iqe.errors import InputError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16")


def parse_config(text: str) -> tuple[str, str]:
    """'backend[:precision]' -> (backend, precision); precision defaults to fp32."""
    backend, _, precision = text.partition(":")
    precision = precision or "fp32"
    if backend not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend '{backend}' in '{text}'; known: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown precision '{precision}' in '{text}'; known: {', '.join(PRECISIONS)}")
    return backend, precision


def operating_point(bundle: Path) -> tuple[str, float] | None:
    """(score output, threshold) from the bundle's calibration.json, or None when it has none."""
    path = Path(bundle) / "calibration.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    op = data.get("operating_point", data)
    if isinstance(op, list):  # several points: the first is the default one
        op = op[0] if op else {}
    threshold = op.get("threshold")
    if threshold is None:
        return None
    return str(op.get("score", op.get("score_key", "map_max"))), float(threshold)


def _score(bundle: Path, config: tuple[str, str], inputs: list[str], batch: int, engine: Path | None,
           progress: bool) -> dict[str, Any]:
    from iqe.engine.build import make_runner
    from iqe.runtime.scoring import score_inputs

    backend, precision = config
    runner = make_runner(bundle, backend, precision, engine, progress=progress)
    with runner:
        results = score_inputs(inputs, runner.infer, runner.image_size, batch, keep_maps=True, progress=progress)
    return {r.path: r for r in results}, _fp16_flop_fraction(runner)


def _fp16_flop_fraction(runner) -> float | None:
    """The FP16 FLOP fraction of the policy an engine runs (from its export record), if any."""
    graph = getattr(runner, "onnx_path", None) or getattr(runner, "plan_path", None)
    if graph is None:
        policy = getattr(runner, "policy", None)
        return getattr(policy, "fp16_flop_fraction", None)
    parts = Path(graph).name.split(".")
    record = Path(graph).parent / f"export.{parts[1] if len(parts) >= 3 else 'fp32'}.json"
    try:
        return json.loads(record.read_text()).get("fp16_flop_fraction")
    except (OSError, ValueError):
        return None


def _plot(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], corr: np.ndarray, labels: tuple[str, str],
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key in zip(axes[:2], ("score", "map_max")):
        a, b = ref[key], got[key]
        ax.scatter(a, b, s=10)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"{key} ({labels[0]})")
        ax.set_ylabel(f"{key} ({labels[1]})")
    axes[2].plot(np.sort(corr), ".")
    axes[2].set_xlabel("image (sorted)")
    axes[2].set_ylabel("map correlation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_check(bundle: Path, inputs: list[str], a: tuple[str, str], b: tuple[str, str], out: Path,
              tolerance: float = 1.0, batch: int = 8, engine: Path | None = None, progress: bool = True):
    """Score `inputs` with configurations `a` (reference) and `b`, judge b by the contract of b's precision.

    Returns:
        (DriftReport, paths written).
    """
    from iqe.atomic import atomic_write_text
    from iqe.export.fidelity import compare, per_image_corr

    first, _ = _score(bundle, a, inputs, batch, engine, progress)
    second, fraction = _score(bundle, b, inputs, batch, engine, progress)
    names = [p for p, r in first.items() if r.error is None and p in second and second[p].error is None]
    if not names:
        raise InputError("nothing to compare: no input was scored by both configurations")

    def arrays(results) -> dict[str, np.ndarray]:
        rows = [results[p] for p in names]
        out_ = {k: np.array([r.scores[k] for r in rows]) for k in rows[0].scores}
        out_["map"] = np.stack([r.map for r in rows])
        out_["map_smooth"] = np.stack([r.map_smooth for r in rows])
        for k in rows[0].branch_maps:  # MVFA: the raw per-branch maps are judged too
            out_[k] = np.stack([r.branch_maps[k] for r in rows])
        return out_

    ref, got = arrays(first), arrays(second)
    label = (f"{a[0]} {a[1]}", f"{b[0]} {b[1]}")
    rep = compare(ref, got, b[1], names, tolerance, threshold=operating_point(bundle), reference_name=label[0],
                  candidate_name=label[1])
    if fraction is not None and b[1] != "fp32":
        rep.extra["fp16_flop_fraction"] = fraction  # the candidate's policy: what its speed is bought with
    skipped = sorted((set(first) | set(second)) - set(names))
    if skipped:
        rep.notes.append(f"{len(skipped)} input(s) not scored by both configurations: {', '.join(skipped[:5])}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "check.json", "markdown": out / "check.md", "plot": out / "check.png"}
    atomic_write_text(paths["json"], json.dumps(rep.to_dict(), indent=2) + "\n")
    atomic_write_text(paths["markdown"], rep.markdown())
    _plot(ref, got, per_image_corr(ref["map"], got["map"]), label, paths["plot"])
    return rep, paths


def cmd_check(args: argparse.Namespace) -> int:
    """Compare two configurations (backend:precision) on your files by the fidelity contract; exit 1 past the limits."""
    if args.model is None:
        raise InputError("no model: pass --model BUNDLE or set IQE_MODEL")
    if args.tolerance < 1:
        raise InputError(f"--tolerance must be >= 1, got {args.tolerance}")
    rep, paths = run_check(args.model, args.inputs, args.a, args.b, args.out, args.tolerance, args.batch, args.engine,
                           progress=not args.quiet)
    import sys

    print(rep.summary_line(), file=sys.stderr)
    for c in rep.failures():
        print(f"  past the limit: {c.line()}", file=sys.stderr)
    for w in rep.worst_images[:3]:
        print(f"  worst: {w['image']} map corr {w['map_corr']:.5f}, map max abs {w['map_max_abs']:.3g}", file=sys.stderr)
    print(f"wrote {paths['json']}, {paths['markdown'].name}, {paths['plot'].name}", file=sys.stderr)
    return 0 if rep.passed else 1


def register(add) -> None:
    import os

    p = add("check", cmd_check)
    p.add_argument("inputs", nargs="+", help="files/folders to score (as `iqe score`)")
    p.add_argument("--model", type=Path, default=os.environ.get("IQE_MODEL"), help="bundle directory (env IQE_MODEL)")
    p.add_argument("--a", type=parse_config, default=("torch", "fp32"), metavar="BACKEND[:PRECISION]",
                   help="reference configuration")
    p.add_argument("--b", type=parse_config, default=("onnxruntime", "fp32"), metavar="BACKEND[:PRECISION]",
                   help="configuration judged against the reference")
    p.add_argument("--out", type=Path, required=True, help="directory for check.json, check.md, check.png")
    p.add_argument("--tolerance", type=float, default=1.0, help="multiplier on the contract's limits")
    p.add_argument("--batch", type=int, default=8, help="images per inference call")
    p.add_argument("--engine", type=Path, default=None, help="engine directory (default: cached by bundle content)")
