"""`iqe`: one command, one subcommand per stage.

    iqe import-reference   reference CLIP weights + IQE checkpoint -> bundle
    iqe export             bundle -> ONNX graphs (fp32 / fp16), each verified against PyTorch
    iqe build              ONNX -> engine (onnxruntime / tensorrt) + manifest
    iqe score              score images with a bundle -> results.jsonl (+ maps.npz)
    iqe train              train on a BMAD-layout data set -> bundle
    iqe synth              write a small synthetic BMAD-layout data set
    iqe bench              latency/throughput benchmarks against the reference loop
    iqe demo               the main job: score the synthetic test split with the demo bundle

Environment defaults (flags override, values are checked like the flags'): IQE_MODEL (bundle
for `score`), IQE_BACKEND (`score`), IQE_BATCH (`score`, `demo`); IQE_CACHE: engine cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from iqe.argtypes import (
    EnvDefault,
    apply_env_defaults,
    backend_name,
    int_at_least,
    missing_module_message,
    require_modules,
)
from iqe.errors import InputError

_positive = int_at_least(1)

DEMO_BUNDLE = Path(__file__).parent / "data" / "demo_bundle"

# Subcommands that live with their stage: each module has `register(add)`, where `add(name, fn)`
# returns the subparser (see build_parser). Modules must import lightly (heavy imports inside fn).
STAGE_COMMANDS: list[str] = [
    "iqe.node",
    "iqe.export.triton",
    "iqe.runtime.bulk",
    "iqe.model.bank_command",
    "iqe.runtime.check",
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


def _export_options(p: argparse.ArgumentParser) -> None:
    """Options of the export verification (iqe.export.fidelity), shared by `export` and `score`."""
    p.add_argument("--calib", type=_existing, default=os.environ.get("IQE_CALIB"),
                   help="folder of your own images for the FP16 policy sweep and verification (env IQE_CALIB); "
                        "default: the synthetic set")
    p.add_argument("--tolerance", type=float, default=None,
                   help="multiplier >= 1 on the fidelity contract's limits (env IQE_TOLERANCE, default 1)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime verification of the exported graph")


def _print(msg: str) -> None:
    print(msg, file=sys.stderr)


def _cache_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: exists and is not a directory")
    return path


# Options that fall back to an environment variable, per command (checked after parsing).
ENV_DEFAULTS = {
    "score": [EnvDefault("model", "IQE_MODEL", _existing), EnvDefault("backend", "IQE_BACKEND", backend_name),
              EnvDefault("batch", "IQE_BATCH", _positive), EnvDefault("cache", "IQE_CACHE", _cache_dir)],
    "demo": [EnvDefault("batch", "IQE_BATCH", _positive), EnvDefault("cache", "IQE_CACHE", _cache_dir)],
}
ONNX_MODULES = ("onnx", "onnxruntime")  # export writes with onnx and verifies every graph with ONNX Runtime


# -- subcommands ------------------------------------------------------------------------------
def cmd_import_reference(args: argparse.Namespace) -> int:
    """Import a reference's OpenAI CLIP weights + checkpoint (IQE-CLIP, or MVFA with --family mvfa) into a bundle."""
    from iqe.model.bundle import check_bundle_target, save_bundle

    check_bundle_target(args.out, args.force)
    if args.family == "mvfa":
        from iqe.model.mvfa import import_command

        return import_command(args)
    from iqe.model.reference import import_reference

    args.features = args.features or [6, 12, 18, 24]
    model = import_reference(args.clip, args.checkpoint, args.features, args.iqm_config, args.image_size)
    provenance = {"clip": str(args.clip), "checkpoint": str(args.checkpoint), "features": args.features}
    save_bundle(model, args.out, force=args.force, extra={"imported_from": provenance})
    c = model.cfg
    _print(f"wrote {args.out}: ViT width {c.vision.width} x {c.vision.layers} blocks, patch {c.vision.patch_size}, "
           f"text width {c.text.width} x {c.text.layers}, IQM {c.iqm.hidden_size}/{c.iqm.num_attention_heads}/"
           f"{c.iqm.num_hidden_layers}, features {c.features}, {c.image_size} px")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a bundle to ONNX graphs (image encoder, text branch, head, fused), each verified."""
    from iqe.engine.manifest import BundleRef, check_export_target, short

    require_modules(ONNX_MODULES, "iqe export")
    ref = BundleRef.of_bundle(args.bundle)
    check_export_target(args.out, ref, args.force)
    from iqe.export.onnx_export import export_model
    from iqe.export.precision import read_policy
    from iqe.model.bundle import load_bundle

    info = export_model(load_bundle(args.bundle), args.out, args.precision, args.max_batch, progress=not args.quiet,
                        verify=not args.no_verify, calib=args.calib, calib_images=args.calib_images,
                        tolerance=args.tolerance, policy=read_policy(args.policy) if args.policy else None)
    ref.write(args.out)
    _print(f"  bundle {short(ref.bundle_sha256)} recorded in {args.out / 'bundle.json'}")
    for g in info.graphs.values():
        if g.verify_max_abs is not None:
            _print(f"  {g.file}: ORT vs torch max abs {g.verify_max_abs:.2e}")
    _print(f"wrote {len(info.graphs)} graphs to {args.out} in {info.export_seconds:.1f} s")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build an engine from an exported ENGINE_DIR and write its manifest."""
    from iqe.engine.build import build

    m = build(args.engine_dir, args.backend, args.precision, args.min_batch, args.opt_batch, args.max_batch)
    _print(f"built {m.backend} {m.backend_version} {m.precision} engine on {m.device} in {m.build_seconds:.1f} s "
           f"-> manifest.{m.backend}.{m.precision}.json")
    from iqe.export.fidelity import drift_summary_line

    _print(drift_summary_line(args.engine_dir, m.backend, m.precision))
    return 0


def _quiet_dicom_warnings() -> None:
    """Damaged headers make pydicom warn per value; each item's own error line says what matters."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def cmd_score(args: argparse.Namespace) -> int:
    """Score images, DICOM files/series and NIfTI volumes; results.jsonl streamed per batch (+ maps, overlays, volumes)."""
    from iqe.engine.build import make_runner
    from iqe.runtime.results import RESULTS, RunOutput
    from iqe.runtime.run import score_to_folder

    from iqe.calibration import calibration_hook
    from iqe.export.fidelity import engine_drift_meta, export_options_to_env

    _quiet_dicom_warnings()
    export_options_to_env(args)  # --tolerance / --no-verify / --calib reach an on-demand export
    # The output folder is checked (and a resume matched to its record) before any engine or inference.
    options = {"inputs": [str(p) for p in args.inputs], "model": str(Path(args.model).resolve()) if args.model else None,
               "server": args.server, "backend": args.backend, "precision": args.precision,
               "window": sorted(args.window or []), "save_maps": args.save_maps, "overlays": args.overlays,
               "volumes": args.volumes}
    output = RunOutput(args.out, options, resume=args.resume, save_maps=args.save_maps or args.volumes,
                       overlays=args.overlays, annotate=calibration_hook(args.model))
    if args.server:  # a Triton server runs the model (iqe.export.triton); files are read here
        from iqe.engine.triton_runner import TritonRunner

        runner = TritonRunner(args.server)
    else:
        runner = make_runner(args.model, args.backend, args.precision, args.engine, progress=not args.quiet,
                             compile=args.compile)
    with runner:
        batch = args.batch or runner.preferred_batch()
        report = score_to_folder(args.inputs, runner.infer, runner.image_size, output, batch_size=batch,
                                 windows=dict(args.window or []), volumes=args.volumes, progress=not args.quiet,
                                 meta=engine_drift_meta(runner))  # the engine's drift summary -> results.meta.json
    for line in report.lines:
        _print(line)
    if args.quiet:
        for error in report.errors:
            _print(f"error: {error}")
    resumed = f" (+{report.resumed} from the earlier run)" if report.resumed else ""
    _print(f"scored {report.scored} of {report.scored + report.failed} items{resumed} -> {args.out / RESULTS}")
    if report.interrupted is not None:
        _print(f"interrupted: {args.out / RESULTS} holds every finished item; rerun with --resume to go on")
        return 128 + report.interrupted
    if report.scored + report.resumed == 0:
        _print("nothing could be scored")
        return 2
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train IQE-CLIP (frozen CLIP) on a BMAD-layout data set; writes the best epoch as a bundle."""
    import torch

    from iqe.model.bundle import check_bundle_target, is_bundle, load_bundle
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel
    from iqe.model.train import TrainOptions, train

    if not (args.resume and is_bundle(args.out)):  # --resume continues into the bundle this training wrote
        check_bundle_target(args.out, args.force)
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = load_bundle(args.init)
        if getattr(model.cfg, "family", "iqe-clip") == "mvfa":
            from iqe.model.mvfa_train import train_command

            return train_command(model, args)
    else:
        _print(f"no --init bundle: starting from preset '{args.preset}' with RANDOM CLIP weights "
               "(fine for tests and demos; import real CLIP weights with `iqe import-reference` for real use)")
        model = IQEModel(load_config(args.preset))
    opts = TrainOptions(data=str(args.data), target=args.target, setting=args.setting, shots=args.shots,
                        epochs=args.epochs, batch_size=args.batch, lr=args.lr or 1e-4, seed=args.seed,
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

    summary = run_demo(Path(args.out), bundle=args.model or DEMO_BUNDLE, target=args.target, batch_size=args.batch or 8,
                       n_overlays=args.overlays, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iqe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"iqe-engine {__import__('iqe').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

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
    p.add_argument("--features", type=_features, default=None,
                   help="1-based vision blocks used in training (default 6,12,18,24)")
    p.add_argument("--image-size", type=_positive, default=240, help="evaluation resolution")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (new or empty)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out (its bundle files only)")
    p.add_argument("--family", choices=["iqe-clip", "mvfa"], default="iqe-clip", help="model family of the checkpoint")
    p.add_argument("--organ", default="Brain", help="mvfa: data set whose text prompts to precompute "
                   "(Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, Histopathology)")
    p.add_argument("--organ-text", default=None, help="mvfa: the word in the prompts (default: the reference's for --organ)")
    p.add_argument("--all-organs", action="store_true",
                   help="mvfa: also store the six reference data sets' text features (for zero-shot training)")

    p = add("export", cmd_export)
    p.add_argument("bundle", type=_existing, help="bundle directory")
    p.add_argument("--out", type=Path, required=True, help="engine directory to write")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--max-batch", type=_positive, default=32, help="largest batch engines are built for")
    p.add_argument("--force", action="store_true", help="re-export a folder that holds another bundle's engines")
    _export_options(p)
    p.add_argument("--calib-images", type=_positive, default=None,
                   help="verification/calibration images (default: 16 for fp32, 64 for fp16)")
    p.add_argument("--policy", type=_existing, default=None,
                   help="FP16 precision policy JSON to use instead of measuring one (verified all the same)")

    p = add("build", cmd_build)
    p.add_argument("engine_dir", type=_existing, help="directory written by `iqe export`")
    p.add_argument("--backend", type=backend_name, default="onnxruntime", metavar="{onnxruntime,tensorrt}")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--min-batch", type=_positive, default=1)
    p.add_argument("--opt-batch", type=_positive, default=None, help="default: 8, within min..max")
    p.add_argument("--max-batch", type=_positive, default=None, help="default: the export's max batch")

    p = add("score", cmd_score)
    p.add_argument("inputs", nargs="+",
                   help="PNG/JPEG/TIFF files, DICOM files, folders (DICOM series are grouped by SeriesInstanceUID), NIfTI")
    p.add_argument("--model", type=_existing, default=None, help="bundle directory (env IQE_MODEL)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: new, empty, or one an earlier `iqe score` wrote (its recorded files are replaced)")
    p.add_argument("--save-maps", action="store_true", help="also write maps/NNNNNN.npz per item (map, map_smooth)")
    p.add_argument("--resume", action="store_true",
                   help="go on with an interrupted run in --out (same inputs and options): finished items are skipped")
    p.add_argument("--batch", type=_positive, default=None,
                   help="images per inference call (env IQE_BATCH; default: the backend's measured best on this "
                        "device: 1 on CPU, 8 on GPU)")
    p.add_argument("--overlays", action="store_true", help="write a heatmap overlay PNG per scored image/slice")
    p.add_argument("--volumes", action="store_true",
                   help="write a NIfTI anomaly volume (map_smooth in the input's geometry) per DICOM series / NIfTI "
                        "input (keeps maps/ too)")
    p.add_argument("--window", type=_window, action="append", default=None, metavar="MODALITY=C,W",
                   help="intensity window override, e.g. CT=40,400 (repeatable; C,W alone: every modality). "
                        "Default: the file's VOI window, else an 8-bit image's full range, else CT 40/400, "
                        "else the 0.5-99.5 percentile range")
    p.add_argument("--backend", type=backend_name, default=None, metavar="{torch,onnxruntime,tensorrt}",
                   help="inference backend (env IQE_BACKEND; default torch)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile the fused graph")
    p.set_defaults(cache=None)
    p.add_argument("--engine", type=Path, default=None,
                   help="engine directory (default: exported and built on demand, cached by bundle content in IQE_CACHE)")
    p.add_argument("--server", default=os.environ.get("IQE_SERVER"), metavar="URL",
                   help="infer on a Triton server (grpc://HOST:8001 or http://HOST:8000) serving `iqe export-triton` "
                        "output instead of a local engine (env IQE_SERVER)")
    _export_options(p)

    p = add("train", cmd_train)
    p.add_argument("--data", type=_existing, required=True, help="BMAD root holding <Obj>_AD folders")
    p.add_argument("--target", required=True, help="target object, e.g. Brain, Liver, Retina_RESC")
    p.add_argument("--setting", choices=["zero", "few"], default="zero", help="zero-shot (leave-one-out) or few-shot")
    p.add_argument("--shots", type=_positive, default=4, help="K labelled images per class (few-shot)")
    p.add_argument("--init", type=Path, default=None, help="bundle to start from (e.g. from import-reference)")
    p.add_argument("--preset", default="tiny", help="preset used when no --init is given (random CLIP)")
    p.add_argument("--epochs", type=_positive, default=5)
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-4; MVFA bundles: the reference's 1e-3 few-shot, 1e-4 zero-shot)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-steps", type=_positive, default=None, help="cap on batches per epoch")
    p.add_argument("--resume", action="store_true", help="continue from <out>.train/train_state.pt")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (best epoch; new or empty)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out (its bundle files only)")

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
    p.add_argument("--batch", type=_positive, default=None, help="images per inference call (env IQE_BATCH; default 8)")
    p.add_argument("--overlays", type=int, default=6, help="heatmap overlay PNGs to write")
    p.set_defaults(cache=None)

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
        validate(args)
        return args.func(args)
    except InputError as exc:
        _print(f"iqe {args.command}: error: {exc}")
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency some path imported without checking first
        from iqe.argtypes import EXTRAS

        if (exc.name or "").split(".")[0] not in EXTRAS:
            raise
        _print(f"iqe {args.command}: error: {missing_module_message(exc)}")
        return 2


def validate(args: argparse.Namespace) -> None:
    """Checks that need more than one option or the environment; all before any work starts."""
    apply_env_defaults(args, ENV_DEFAULTS.get(args.command, ()))
    if getattr(args, "cache", None) is not None:
        os.environ["IQE_CACHE"] = str(args.cache)
    if args.command == "score":
        if args.server:  # a Triton server runs the model: its URL is checked now, no local bundle needed
            from iqe.engine.triton_runner import parse_server_url

            parse_server_url(args.server)
        elif args.model is None:
            raise InputError("no model: pass --model BUNDLE (env IQE_MODEL) or --server URL (env IQE_SERVER)")
        args.backend = args.backend or "torch"
        if args.compile:
            from iqe.engine.build import check_compile

            check_compile(args.backend)


if __name__ == "__main__":
    sys.exit(main())
