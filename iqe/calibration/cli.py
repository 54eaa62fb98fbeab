"""`iqe calibrate BUNDLE --data DIR`: fit an operating point on a site's own cases.

images (+ labels) -> scores with the bundle -> threshold, intervals, calibrated
probability -> ``BUNDLE/calibration.json`` entry + PNG plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iqe.errors import InputError

SCORE_KEYS = ("map_max", "score", "score_query", "score_text", "score_few")
DEFAULT_SCORE_KEY = "map_max"


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate between 0 and 1, got '{text}'") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate strictly between 0 and 1, got {value:g}")
    return value


def score_labelled_set(bundle: Path, paths: list[Path], backend: str, precision: str, batch: int,
                       progress: bool) -> tuple[list, list[str]]:
    """Score `paths` with `bundle`; returns (ItemResults, per-item error lines)."""
    from iqe.engine.build import make_runner
    from iqe.runtime.scoring import score_inputs

    runner = make_runner(bundle, backend, precision, progress=progress)
    with runner:
        results = score_inputs([str(p) for p in paths], runner.infer, runner.image_size, batch, progress=progress)
    return results, [r.error for r in results if r.error]


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit a decision threshold (+ CIs, calibrated probability) on labelled or normal-only cases; store it in the bundle.

    Labelled: --target-sensitivity S | --target-specificity S | --youden (bootstrap 95% CIs).
    Normals only: --normals-only --fpr RATE (exact order-statistics CI on the false-positive rate).
    One entry per --target (body part / modality); other targets' entries are kept.
    """
    import numpy as np

    from iqe.calibration.fit import fit_entry, save_entry
    from iqe.calibration.labels import read_labelled
    from iqe.calibration.plots import write_plots
    from iqe.engine.build import bundle_key

    bundle: Path = args.bundle
    if not (bundle / "config.json").is_file():
        raise InputError(f"{bundle}: not a model bundle (no config.json)")
    if args.normals_only:
        rule, requested = "fpr", args.fpr
    elif args.target_sensitivity is not None:
        rule, requested = "sensitivity", args.target_sensitivity
    elif args.target_specificity is not None:
        rule, requested = "specificity", args.target_specificity
    else:
        rule, requested = "youden", None
    labelled = read_labelled(args.data, args.data_target, args.split, normals_only=args.normals_only)
    if args.normals_only:
        keep = [i for i, y in enumerate(labelled.labels) if y == 0]
        dropped = len(labelled.labels) - len(keep)
        if dropped:
            print(f"iqe calibrate: --normals-only: ignoring {dropped} abnormal case(s) of {args.data}", file=sys.stderr)
        labelled.paths = [labelled.paths[i] for i in keep]
        labelled.labels = [0] * len(keep)
    target = args.target or labelled.target
    results, errors = score_labelled_set(bundle, labelled.paths, args.backend, args.precision, args.batch,
                                         not args.quiet)
    for line in errors:
        print(f"iqe calibrate: skipped: {line}", file=sys.stderr)
    ok = [i for i, r in enumerate(results) if r.error is None]
    if not ok:
        raise InputError(f"{args.data}: none of the {len(results)} images could be scored")
    scores = np.array([results[i].scores[args.score] for i in ok], np.float64)
    labels = np.array([labelled.labels[i] for i in ok])
    data = {"source": str(args.data), "description": labelled.description, "failed": len(errors),
            "backend": args.backend, "precision": args.precision}
    entry = fit_entry(scores, labels, target=target, score_key=args.score, rule=rule, requested=requested,
                      prevalence=args.prevalence, resamples=args.bootstrap, seed=args.seed, data=data,
                      source=str(args.data))
    path = save_entry(bundle, entry, bundle_key(bundle))
    plots = write_plots(args.plots or bundle / "calibration_plots", scores, labels, entry)
    print(summary_text(entry), file=sys.stderr)
    print(f"wrote entry '{target}' to {path}", file=sys.stderr)
    print(plots if isinstance(plots, str) else f"plots: {', '.join(str(p) for p in plots)}", file=sys.stderr)
    return 0


def summary_text(entry: dict) -> str:
    """Human-readable lines for one entry."""
    lines = [f"{entry['target']}: {entry['mode']}, {entry['score_key']} >= {entry['threshold']:.6g} -> abnormal "
             f"(rule {entry['rule']}{'' if entry['requested'] is None else ' ' + format(entry['requested'], 'g')}; "
             f"{entry['data']['normal']} normal, {entry['data']['abnormal']} abnormal)"]
    for name, m in entry["metrics"].items():
        lines.append(f"  {name:<12} {m['value']:.3f}  95% CI (new set of this size) {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}"
                     f"  (population {m['ci95_population'][0]:.3f}-{m['ci95_population'][1]:.3f})")
    norm = entry["normalisation"]
    if "cv_ece" in norm:
        lines.append(f"  calibrated probability: {norm['method']} (cross-validated ECE "
                     + ", ".join(f"{k} {v:.3f}" for k, v in norm["cv_ece"].items()) + ")")
    return "\n".join(lines)


def register(add) -> None:
    """Add `iqe calibrate` to the CLI."""
    from iqe.argtypes import int_at_least

    p = add("calibrate", cmd_calibrate)
    p.add_argument("bundle", type=Path, help="bundle directory (calibration.json is written into it)")
    p.add_argument("--data", type=Path, required=True,
                   help="CSV of path,label | BMAD root (<Obj>_AD folders) | folder with good/ and Ungood/ "
                        "| with --normals-only: a folder of normal images")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-sensitivity", type=_rate, default=None, metavar="S", help="threshold meeting this sensitivity")
    rule.add_argument("--target-specificity", type=_rate, default=None, metavar="S", help="threshold meeting this specificity")
    rule.add_argument("--youden", action="store_true", help="maximise sensitivity + specificity - 1 (the default rule)")
    rule.add_argument("--normals-only", action="store_true", help="fit on normal cases only (with --fpr)")
    p.add_argument("--fpr", type=_rate, default=0.05, help="normals only: wanted false-positive rate")
    p.add_argument("--prevalence", type=_rate, default=None, help="for PPV/NPV (default: the data's abnormal fraction)")
    p.add_argument("--score", choices=SCORE_KEYS, default=DEFAULT_SCORE_KEY, help="score the threshold applies to")
    p.add_argument("--target", default=None,
                   help="entry key: target / body part / modality (default: the BMAD object, else 'default')")
    p.add_argument("--data-target", default=None, help="BMAD object to read under a BMAD root (default: the only one)")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="BMAD split to read")
    p.add_argument("--bootstrap", type=int_at_least(200), default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap / cross-validation seed")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--batch", type=int_at_least(1), default=8)
    p.add_argument("--plots", type=Path, default=None, help="PNG folder (default: BUNDLE/calibration_plots)")
