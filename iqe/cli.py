"""`iqe`: one command, one subcommand per stage.

    iqe import-reference   reference CLIP weights + IQE checkpoint -> bundle
    iqe export             bundle -> ONNX graphs (fp32 / fp16), each verified against PyTorch
    iqe build              ONNX -> engine (onnxruntime / tensorrt) + manifest
    iqe score              score images with a bundle -> results.jsonl (+ maps.npz)
    iqe train              train on a BMAD-layout data set -> bundle
    iqe synth              write a small synthetic BMAD-layout data set
    iqe bench              latency/throughput benchmarks against the reference loop
    iqe demo               the main job: score the synthetic test split with the demo bundle

Environment defaults (flags override): IQE_MODEL (bundle for `score`), IQE_BATCH.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from iqe.argtypes import int_at_least
from iqe.errors import InputError

_positive = int_at_least(1)

DEMO_BUNDLE = Path(__file__).parent / "data" / "demo_bundle"

# Subcommands that live with their stage: each module has `register(add)`, where `add(name, fn)`
# returns the subparser (see build_parser). Modules must import lightly (heavy imports inside fn).
STAGE_COMMANDS: list[str] = [
    "iqe.calibration.cli",
]


def _features(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 6,12,18,24, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"layer numbers are 1-based and positive, got '{text}'")
    return values


def _window(text: str) -> tuple[str, tuple[float, float]]:
    """MODALITY=CENTER,WIDTH (or CENTER,WIDTH for every modality)."""
    key, _, value = text.rpartition("=")
    try:
        center, width = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODALITY=CENTER,WIDTH like CT=40,400, got '{text}'") from None
    if width <= 0:
        raise argparse.ArgumentTypeError(f"window width must be > 0, got {width}")
    return (key.upper() or "*"), (center, width)


def _existing(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path}: no such file or directory")
    return path


def _print(msg: str) -> None:
    print(msg, file=sys.stderr)


# -- subcommands ------------------------------------------------------------------------------
def cmd_import_reference(args: argparse.Namespace) -> int:
    """Import the reference's OpenAI CLIP weights + IQE-CLIP checkpoint into a bundle."""
    from iqe.model.bundle import save_bundle
    from iqe.model.reference import import_reference

    model = import_reference(args.clip, args.checkpoint, args.features, args.iqm_config, args.image_size)
    save_bundle(model, args.out, extra={"imported_from": {"clip": str(args.clip), "checkpoint": str(args.checkpoint),
                                                           "features": args.features}})
    c = model.cfg
    _print(f"wrote {args.out}: ViT width {c.vision.width} x {c.vision.layers} blocks, patch {c.vision.patch_size}, "
           f"text width {c.text.width} x {c.text.layers}, IQM {c.iqm.hidden_size}/{c.iqm.num_attention_heads}/"
           f"{c.iqm.num_hidden_layers}, features {c.features}, {c.image_size} px")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a bundle to ONNX graphs (image encoder, text branch, head, fused), each verified."""
    from iqe.export.onnx_export import export_model
    from iqe.model.bundle import load_bundle

    info = export_model(load_bundle(args.bundle), args.out, args.precision, args.max_batch, progress=not args.quiet)
    for g in info.graphs.values():
        _print(f"  {g.file}: ORT vs torch max abs {g.verify_max_abs:.2e}")
    _print(f"wrote {len(info.graphs)} graphs to {args.out} in {info.export_seconds:.1f} s")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build an engine from an exported ENGINE_DIR and write its manifest."""
    from iqe.engine.build import build

    m = build(args.engine_dir, args.backend, args.precision, args.min_batch, args.opt_batch, args.max_batch)
    _print(f"built {m.backend} {m.backend_version} {m.precision} engine on {m.device} in {m.build_seconds:.1f} s "
           f"-> manifest.{m.backend}.{m.precision}.json")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score images, DICOM files/series and NIfTI volumes; write results.jsonl (+ maps.npz with --save-maps)."""
    from iqe.engine.build import make_runner
    from iqe.runtime.results import write_results
    from iqe.runtime.scoring import score_inputs

    if args.model is None:
        raise InputError("no model: pass --model BUNDLE or set IQE_MODEL")
    runner = make_runner(args.model, args.backend, args.precision, args.engine, progress=not args.quiet,
                         compile=args.compile)
    with runner:
        results = score_inputs(args.inputs, runner.infer, runner.image_size, args.batch,
                               keep_maps=args.save_maps or args.overlays or args.volumes, keep_images=args.overlays,
                               windows=dict(args.window or []), progress=not args.quiet)
    from iqe.calibration import annotate_results  # calibrated_score / decision when the bundle has calibration.json

    annotate_results(results, args.model)
    written = write_results(args.out, results, args.save_maps)
    from iqe.runtime.volumes import write_series_outputs

    for line in write_series_outputs(args.inputs, results, args.out, volumes=args.volumes):
        _print(line)
    if args.overlays:
        from iqe.runtime.overlay import save_overlays

        n = len(save_overlays(results, args.out / "overlays"))
        _print(f"wrote {n} heatmap overlays to {args.out / 'overlays'}")
    failed = [r for r in results if r.error]
    for r in failed:
        _print(f"error: {r.error}")
    _print(f"scored {len(results) - len(failed)} of {len(results)} inputs -> {written['results']}")
    if len(failed) == len(results):
        _print("nothing could be scored")
        return 2
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train IQE-CLIP (frozen CLIP) on a BMAD-layout data set; writes the best epoch as a bundle."""
    import torch

    from iqe.model.bundle import load_bundle
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel
    from iqe.model.train import TrainOptions, train

    torch.manual_seed(args.seed)
    if args.init is not None:
        model = load_bundle(args.init)
    else:
        _print(f"no --init bundle: starting from preset '{args.preset}' with RANDOM CLIP weights "
               "(fine for tests and demos; import real CLIP weights with `iqe import-reference` for real use)")
        model = IQEModel(load_config(args.preset))
    opts = TrainOptions(data=str(args.data), target=args.target, setting=args.setting, shots=args.shots,
                        epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed,
                        max_steps_per_epoch=args.max_steps)
    summary = train(model, opts, args.out, resume=args.resume, progress=not args.quiet)
    _print(f"best epoch {summary['best_epoch']}: {json.dumps(summary['validation'])} -> {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a small synthetic BMAD-layout data set (organ-like images with lesion masks)."""
    from iqe.model.synth import write_synthetic_bmad

    root = write_synthetic_bmad(args.out, seed=args.seed)
    _print(f"wrote synthetic BMAD data set to {root}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency/throughput benchmarks: backends x precisions x batch sizes vs the reference loop (see `iqe bench --help`)."""
    from iqe.bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Main job: synthesize data, score its test split with the demo bundle, write overlays and AUC."""
    from iqe.runtime.demo import run_demo

    summary = run_demo(Path(args.out), bundle=args.model or DEMO_BUNDLE, target=args.target, batch_size=args.batch,
                       n_overlays=args.overlays, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iqe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"iqe-engine {__import__('iqe').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    batch_default = int(os.environ.get("IQE_BATCH", "8"))

    def add(name: str, fn) -> argparse.ArgumentParser:
        doc = fn.__doc__.strip()
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc, formatter_class=fmt)
        p.set_defaults(func=fn)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    p = add("import-reference", cmd_import_reference)
    p.add_argument("--clip", type=_existing, required=True, help="OpenAI CLIP weights (TorchScript archive or state dict)")
    p.add_argument("--checkpoint", type=_existing, required=True, help="IQE-CLIP checkpoint from the reference code")
    p.add_argument("--iqm-config", type=_existing, default=None, help="reference IQM JSON (num_attention_heads); default 8 heads")
    p.add_argument("--features", type=_features, default=[6, 12, 18, 24], help="1-based vision blocks used in training")
    p.add_argument("--image-size", type=_positive, default=240, help="evaluation resolution")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")

    p = add("export", cmd_export)
    p.add_argument("bundle", type=_existing, help="bundle directory")
    p.add_argument("--out", type=Path, required=True, help="engine directory to write")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--max-batch", type=_positive, default=32, help="largest batch engines are built for")

    p = add("build", cmd_build)
    p.add_argument("engine_dir", type=_existing, help="directory written by `iqe export`")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--min-batch", type=_positive, default=1)
    p.add_argument("--opt-batch", type=_positive, default=8)
    p.add_argument("--max-batch", type=_positive, default=None, help="default: the export's max batch")

    p = add("score", cmd_score)
    p.add_argument("inputs", nargs="+",
                   help="PNG/JPEG/TIFF files, DICOM files, folders (DICOM series are grouped by SeriesInstanceUID), NIfTI")
    p.add_argument("--model", type=Path, default=os.environ.get("IQE_MODEL"), help="bundle directory (env IQE_MODEL)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--save-maps", action="store_true", help="also write maps.npz (map, map_smooth)")
    p.add_argument("--batch", type=_positive, default=batch_default, help="images per inference call (env IQE_BATCH)")
    p.add_argument("--overlays", action="store_true", help="write a heatmap overlay PNG per scored image/slice")
    p.add_argument("--volumes", action="store_true",
                   help="write a NIfTI anomaly volume (map_smooth in the input's geometry) per DICOM series / NIfTI input")
    p.add_argument("--window", type=_window, action="append", default=None, metavar="MODALITY=C,W",
                   help="intensity window override, e.g. CT=40,400 (repeatable; C,W alone: every modality). "
                        "Default: the file's VOI window, else CT 40/400, else the 0.5-99.5 percentile range")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default=os.environ.get("IQE_BACKEND", "torch"),
                   help="inference backend (env IQE_BACKEND)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile the fused graph")
    p.add_argument("--engine", type=Path, default=None,
                   help="engine directory (default: exported and built on demand, cached by bundle content in IQE_CACHE)")

    p = add("train", cmd_train)
    p.add_argument("--data", type=_existing, required=True, help="BMAD root holding <Obj>_AD folders")
    p.add_argument("--target", required=True, help="target object, e.g. Brain, Liver, Retina_RESC")
    p.add_argument("--setting", choices=["zero", "few"], default="zero", help="zero-shot (leave-one-out) or few-shot")
    p.add_argument("--shots", type=_positive, default=4, help="K labelled images per class (few-shot)")
    p.add_argument("--init", type=Path, default=None, help="bundle to start from (e.g. from import-reference)")
    p.add_argument("--preset", default="tiny", help="preset used when no --init is given (random CLIP)")
    p.add_argument("--epochs", type=_positive, default=5)
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-steps", type=_positive, default=None, help="cap on batches per epoch")
    p.add_argument("--resume", action="store_true", help="continue from <out>.train/train_state.pt")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (best epoch)")

    p = add("synth", cmd_synth)
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0)

    # The benchmark's options live with it (iqe.bench); forwarding keeps the CLI's start-up light.
    p = sub.add_parser("bench", help=cmd_bench.__doc__.strip().splitlines()[0], add_help=False)
    p.set_defaults(func=cmd_bench)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)

    p = add("demo", cmd_demo)
    p.add_argument("--out", type=Path, default=Path("iqe-demo"), help="output directory")
    p.add_argument("--model", type=Path, default=None, help="bundle (default: the embedded demo bundle)")
    p.add_argument("--target", default="Brain", help="synthetic object to score")
    p.add_argument("--batch", type=_positive, default=batch_default)
    p.add_argument("--overlays", type=int, default=6, help="heatmap overlay PNGs to write")

    import importlib

    for module in STAGE_COMMANDS:
        importlib.import_module(module).register(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # options are parsed by iqe.bench itself (leading --flags included)
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        _print(f"iqe {args.command}: error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
