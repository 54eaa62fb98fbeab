"""Start-up cost of `iqe score` with a built ONNX Runtime engine: prints numbers.

    python benchmarks/startup.py                      # ViT-L (random weights, seed 0); ~10 min on 2 cores
    python benchmarks/startup.py --preset tiny        # quick check of the script itself

Measures, each in a fresh process so nothing is warm but the OS page cache:

- session creation for the three ways to open the engine: the exported graph with ORT's
  full optimisation (what iqe did before engines kept their optimised artefact), the
  optimised ONNX artefact with optimisation disabled (iqe's default), and ORT's own
  `.ort` format with optimisation disabled;
- `iqe score ONE.png --backend onnxruntime --batch 1`: wall time and peak RSS of the
  whole CLI process, and its overhead = wall time - model time, where model time is
  one warm `runner.infer` at batch 1 on the preprocessed image (median of 3);
- the import time of the CLI's scoring path, and whether torch or MONAI gets imported;
- a whole `iqe score` run over 16 PNGs (start-up included, default batch) against the
  reference loop's model-only rate in the same run (`iqe.bench.reference_loop`, eager
  PyTorch; the better of batch 1 and batch 8, each over 8 of the preprocessed PNGs).

Preparation (bundle, export, build) is not timed; it goes to --work (kept between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's iqe, also when another one is installed


def _spawn(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS MiB, stdout) of one fresh process; RuntimeError with its stderr on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err.read()[-2000:]}")
        return wall, usage.ru_maxrss // 1024, out.read()


def run_child(code: str, env: dict[str, str]) -> tuple[float, int, str]:
    return _spawn([sys.executable, "-c", code], env)


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    wall, rss, _ = _spawn([sys.executable, "-m", "iqe.cli", *args], env)
    return wall, rss


def prepare(preset: str, work: Path, env: dict[str, str]) -> tuple[Path, Path, Path]:
    """(bundle, engine dir, png): a random-weight bundle of `preset`, its built ORT fp32 engine, one PNG."""
    os.environ.update(env)
    import numpy as np
    import torch
    from PIL import Image

    from iqe.engine.build import ensure_engine
    from iqe.model.bundle import is_bundle, save_bundle
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel

    bundle = work / f"bundle-{preset}"
    if not is_bundle(bundle):
        torch.manual_seed(0)
        save_bundle(IQEModel(load_config(preset)).eval(), bundle)
    t0 = time.perf_counter()
    engine = ensure_engine(bundle, "onnxruntime", "fp32", work / f"engine-{preset}", max_batch=8, progress=True)
    print(f"prepared {engine} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    png = work / "one.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(png)
    return bundle, engine, png


def ort_format_artefact(engine: Path) -> Path | None:
    """The fused graph in ORT's format, optimised like the default artefact (None when ORT cannot save it)."""
    import onnxruntime as ort

    target = engine / "fused.fp32.optimized.ort"
    if target.is_file():
        return target
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(target)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(engine / "fused.fp32.onnx"), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - e.g. the 2 GB flatbuffer limit; reported, not fatal
        print(f"ORT format not available: {exc}"[:300], file=sys.stderr)
        target.unlink(missing_ok=True)
        return None
    return target


SESSION = """
import time, onnxruntime as ort
t0 = time.perf_counter()
o = ort.SessionOptions()
o.graph_optimization_level = ort.GraphOptimizationLevel.{level}
o.log_severity_level = 3
ort.InferenceSession({path!r}, o, providers=["CPUExecutionProvider"])
print(time.perf_counter() - t0)
"""

MODEL_TIME = """
import json, statistics, time, sys
from iqe.engine.build import make_runner
from iqe.runtime.scoring import score_inputs
images = []
with make_runner({bundle!r}, "onnxruntime", "fp32", {engine!r}, progress=False) as r:
    # the preprocessed PNG exactly as `iqe score` feeds it
    score_inputs([{png!r}], lambda x: images.append(x) or r.infer(x), r.image_size, 1, progress=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter(); r.infer(images[0]); times.append(time.perf_counter() - t0)
print(json.dumps({{"model_s": statistics.median(times), "torch": "torch" in sys.modules}}))
"""

IMPORTS = """
import sys, time
t0 = time.perf_counter()
import iqe.cli, iqe.engine.build, iqe.runtime.scoring
print(time.perf_counter() - t0, "torch" in sys.modules, "monai" in sys.modules)
"""

REFERENCE_RATE = """
import json, time
import numpy as np
from iqe.bench.reference_loop import ReferenceLoopRunner
from iqe.model.bundle import load_bundle
from iqe.model.preprocess import load_image
runner = ReferenceLoopRunner(load_bundle({bundle!r}))
images = np.stack([load_image(p, runner.image_size) for p in {pngs!r}][:8])
rates = {{}}
with runner:
    runner.infer(images[:1])  # warm-up
    for batch in (1, 8):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            runner.infer(images[i : i + batch])
        rates[batch] = len(images) / (time.perf_counter() - t0)
print(json.dumps(rates))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-l-14-336")
    parser.add_argument("--work", type=Path, default=Path("/tmp/iqe-startup"), help="bundle, engine and cache")
    parser.add_argument("--repeats", type=int, default=2, help="CLI runs (the best is reported)")
    parser.add_argument("--pngs", type=int, default=16, help="PNGs of the whole-run comparison (0: skip it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "IQE_CACHE": str(args.work / "cache")}
    if args.prepare_only:
        bundle, engine, png = prepare(args.preset, args.work, env)
        ort_format_artefact(engine)
        print(json.dumps({"bundle": str(bundle), "engine": str(engine), "png": str(png), "cpu": _cpu()}))
        return 0
    # Preparing loads the whole model; on Linux a child's peak RSS starts from its parent's at
    # fork, so this process stays small and prepares in a child of its own.
    _, _, out = _spawn([sys.executable, __file__, "--prepare-only", "--preset", args.preset, "--work",
                        str(args.work)], env)
    prepared = json.loads(out.splitlines()[-1])
    bundle, engine, png = Path(prepared["bundle"]), Path(prepared["engine"]), Path(prepared["png"])
    manifest = json.loads((engine / "manifest.onnxruntime.fp32.json").read_text())
    numbers: dict = {"preset": args.preset, "cpu": prepared["cpu"], "usable_cpus": len(os.sched_getaffinity(0)),
                     "loadavg_before": [round(x, 1) for x in os.getloadavg()], "artefact": manifest["artefact"],
                     "sizes_mb": {p.name: round(p.stat().st_size / 2**20) for p in engine.iterdir() if p.is_file()}}

    sessions = {"exported graph, ORT_ENABLE_ALL (before)": (engine / "fused.fp32.onnx", "ORT_ENABLE_ALL"),
                "optimised ONNX, ORT_DISABLE_ALL (default)": (engine / manifest["artefact"], "ORT_DISABLE_ALL")}
    if (engine / "fused.fp32.optimized.ort").is_file():
        sessions["ORT format, ORT_DISABLE_ALL"] = (engine / "fused.fp32.optimized.ort", "ORT_DISABLE_ALL")
    numbers["session_s"], numbers["session_rss_mb"] = {}, {}
    for label, (path, level) in sessions.items():
        runs = [run_child(SESSION.format(level=level, path=str(path)), env) for _ in range(2)]
        numbers["session_s"][label] = round(min(float(out) for _, _, out in runs), 2)
        numbers["session_rss_mb"][label] = min(rss for _, rss, _ in runs)

    _, _, out = run_child(IMPORTS, env)
    seconds, torch_imported, monai_imported = out.split()
    numbers["import_s"] = round(float(seconds), 2)
    numbers["import_pulls_torch"] = torch_imported == "True"
    numbers["import_pulls_monai"] = monai_imported == "True"
    _, _, out = run_child(MODEL_TIME.format(bundle=str(bundle), engine=str(engine), png=str(png)), env)
    model = json.loads(out)
    numbers["model_s"] = round(model["model_s"], 3)
    cli = [run_cli(["score", str(png), "--model", str(bundle), "--engine", str(engine), "--backend", "onnxruntime",
                    "--batch", "1", "--out", str(args.work / f"out{i}"), "--quiet"], env) for i in range(args.repeats)]
    wall, rss = min(cli)
    numbers["cli_wall_s"] = round(wall, 2)
    numbers["cli_overhead_s"] = round(wall - model["model_s"], 2)
    numbers["cli_peak_rss_mb"] = rss
    if args.pngs:
        numbers.update(whole_run(bundle, engine, args.work, args.pngs, env))
    numbers["loadavg_after"] = [round(x, 1) for x in os.getloadavg()]  # other work on the machine skews every number
    print(json.dumps(numbers, indent=2))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


def whole_run(bundle: Path, engine: Path, work: Path, count: int, env: dict[str, str]) -> dict:
    """A whole `iqe score` over `count` PNGs vs the reference loop's model-only rate, both measured now."""
    import numpy as np
    from PIL import Image

    folder = work / f"pngs{count}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    pngs = []
    for i in range(count):
        pngs.append(folder / f"{i:02d}.png")
        if not pngs[-1].is_file():
            Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(pngs[-1])
    wall, rss = run_cli(["score", str(folder), "--model", str(bundle), "--engine", str(engine), "--backend",
                         "onnxruntime", "--out", str(work / "out-pngs"), "--quiet"], env)
    _, _, out = run_child(REFERENCE_RATE.format(bundle=str(bundle), pngs=[str(p) for p in pngs]), env)
    reference = json.loads(out.splitlines()[-1])
    best = max(reference.values())
    return {"whole_run_pngs": count, "whole_run_wall_s": round(wall, 2), "whole_run_images_per_s": round(count / wall, 3),
            "whole_run_peak_rss_mb": rss,
            "reference_loop_images_per_s": {f"batch {b}": round(r, 3) for b, r in reference.items()},
            "whole_run_vs_reference_loop": round(count / wall / best, 2)}


def _cpu() -> str:
    from iqe.engine.onnxruntime_backend import cpu_name

    return cpu_name()


if __name__ == "__main__":
    sys.exit(main())
