"""Peak memory of `iqe score` on a long DICOM series with maps and overlays: it must stay flat.

Writes a synthetic CT series (`iqe.bench.data.write_dicom_series`), a `tiny`-preset
bundle (random weights: memory does not depend on them), runs

    python -m iqe.cli score SERIES --model BUNDLE --out OUT --save-maps --overlays --batch B

in a subprocess and samples its resident set size (/proc/PID/status VmRSS) together with
the rows already in results.jsonl, then prints the RSS at each tenth of the run and the
peak (VmHWM). Flat memory means the RSS after 10 % of the slices is the RSS after 100 %.

    python benchmarks/score_memory.py --slices 2000 --size 256 --batch 8
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


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rows(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--slices", type=int, default=2000, help="slices in the series")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each slice")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    from iqe.bench.data import write_dicom_series
    from iqe.model.bundle import save_bundle
    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_dicom_series(root / "series", args.slices, size=args.size)
        torch.manual_seed(0)
        save_bundle(IQEModel(load_config("tiny")).eval(), root / "bundle")
        print(f"wrote {args.slices} slices of {args.size}x{args.size} in {time.perf_counter() - t:.1f} s", flush=True)
        out = root / "out"
        cmd = [sys.executable, "-m", "iqe.cli", "score", str(root / "series"), "--model", str(root / "bundle"),
               "--out", str(out), "--save-maps", "--overlays", "--batch", str(args.batch), "--quiet",
               "--backend", "torch"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, int, int]] = []  # (seconds, rows written, RSS KiB)
        peak = 0
        while proc.poll() is None:
            rss = _status_kib(proc.pid, "VmRSS")
            hwm = _status_kib(proc.pid, "VmHWM")
            if rss is not None:
                samples.append((time.perf_counter() - t0, _rows(out / "results.jsonl"), rss))
            peak = max(peak, hwm or 0)
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            print(stderr, file=sys.stderr)
            return proc.returncode
        rows = _rows(out / "results.jsonl")
        maps = len(list((out / "maps").glob("*.npz")))
        overlays = len(list((out / "overlays").glob("*.png")))

    print(f"iqe score: {rows} rows, {maps} maps, {overlays} overlays in {wall:.1f} s "
          f"({rows / wall:.1f} slices/s, batch {args.batch})")
    print("RSS by progress (rows written -> MiB):")
    table = []
    for tenth in range(1, 11):
        target = args.slices * tenth / 10
        hit = next((s for s in samples if s[1] >= target), samples[-1] if samples else None)
        if hit is not None:
            table.append({"rows": hit[1], "seconds": round(hit[0], 1), "rss_mib": round(hit[2] / 1024, 1)})
            print(f"  {hit[1]:6d} rows  {hit[0]:7.1f} s  {hit[2] / 1024:8.1f} MiB")
    scored = [s for s in samples if s[1] > 0]
    first, last = (scored[0][2], scored[-1][2]) if scored else (0, 0)
    print(f"peak RSS (VmHWM, last seen): {peak / 1024:.1f} MiB; RSS after the first rows {first / 1024:.1f} MiB, "
          f"at the end {last / 1024:.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"slices": args.slices, "size": args.size, "batch": args.batch,
                                         "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 1024, 1),
                                         "by_progress": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
