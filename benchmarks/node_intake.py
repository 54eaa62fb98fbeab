"""Intake benchmark: 512x512 CT instances over one DICOM association into the node's durable spool,
side by side with Orthanc's own intake and dcmtk's storescp of the same files.

    python benchmarks/node_intake.py [--count 200] [--size 512] [--repeat 3] [--json out.json]

Each receiver gets the same files from dcmtk `storescu` (one association, TCP_NODELAY=1 in
every process's environment, as dcmtk reads it; the node sets TCP_NODELAY on its sockets
itself). Timed: storescu's run, from process start to exit, so association set-up and
release are included. Receivers:

    node (durable)    iqe.node StoreSCP -> Spool: temp file, fsync, rename, directory fsync per instance
    node (no fsync)   the same without the fsyncs: the difference is the fsync cost
    orthanc           /usr/sbin/Orthanc (SQLite index + storage area), default settings
    storescp          dcmtk's storescp writing files (no fsync): the transport's ceiling here

Instances/s are reported per repeat (median over repeats in the summary), with the
machine's CPU model and the per-instance fsync cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from iqe.bench.data import write_dicom_series  # noqa: E402
from iqe.engine.onnxruntime_backend import cpu_name  # noqa: E402
from iqe.node.config import AllowEntry, NodeSection  # noqa: E402
from iqe.node.scp import StoreSCP  # noqa: E402
from iqe.node.spool import Spool  # noqa: E402
from tests.node.servers import DCMTK_ENV as ENV  # noqa: E402
from tests.node.servers import STORESCU, Orthanc, free_port  # noqa: E402

STORESCP = "/usr/bin/storescp"


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def send(port: int, files: list[Path], called: str) -> float:
    """storescu all files over one association; returns seconds."""
    t0 = time.perf_counter()
    done = subprocess.run([STORESCU, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {done.stderr[-500:]}")
    return elapsed


def bench_node(files: list[Path], work: Path, durable: bool) -> float:
    spool_dir = work / f"spool-{durable}"
    shutil.rmtree(spool_dir, ignore_errors=True)
    spool = Spool(spool_dir, durable=durable)
    port = free_port()
    scp = StoreSCP(NodeSection(host="127.0.0.1", port=port, allow=[AllowEntry("BENCH")]), spool,
                   lambda *a: None, lambda r: None)
    scp.start()
    try:
        elapsed = send(port, files, "IQE_NODE")
    finally:
        scp.stop()
    assert spool.instance_count() == len(files), "not every instance reached the spool"
    shutil.rmtree(spool_dir, ignore_errors=True)
    return elapsed


def bench_orthanc(files: list[Path], work: Path) -> float:
    folder = work / "orthanc"
    shutil.rmtree(folder, ignore_errors=True)
    orthanc = Orthanc(folder).start()  # default settings apart from ports and storage
    try:
        return send(orthanc.dicom_port, files, "ORTHANC")
    finally:
        orthanc.stop()  # SIGTERM, then wait: its ports are free only once it has exited


def bench_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-od", str(out), "-aet", "STORESCP", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_port(port)
        return send(port, files, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="instances per run")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each CT instance")
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="iqe-node-bench-") as tmp:
        work = Path(tmp)
        files = write_dicom_series(work / "ct", args.count, size=args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        receivers = {"node (durable)": lambda: bench_node(files, work, True),
                     "node (no fsync)": lambda: bench_node(files, work, False),
                     "orthanc": lambda: bench_orthanc(files, work),
                     "storescp": lambda: bench_storescp(files, work)}
        runs: dict[str, list[float]] = {name: [] for name in receivers}
        for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits all alike
            for name, run in receivers.items():
                runs[name].append(run())
    load = os.getloadavg()[0]
    print(f"intake of {args.count} CT instances {args.size}x{args.size} ({mb:.1f} MB) over one association, "
          f"loopback, TCP_NODELAY; {cpu_name()}, {os.cpu_count()} CPUs, load {load:.1f}")
    print(f"{'receiver':<18}{'instances/s (median)':>22}{'runs (s)':>28}")
    summary = {}
    for name, seconds in runs.items():
        rate = args.count / statistics.median(seconds)
        summary[name] = {"instances_per_s": rate, "seconds": seconds}
        print(f"{name:<18}{rate:>22.1f}{'  ' + ', '.join(f'{s:.2f}' for s in seconds):>28}")
    fsync_ms = 1000 * (statistics.median(runs["node (durable)"]) - statistics.median(runs["node (no fsync)"])) / args.count
    print(f"fsync cost (durable - no fsync): {fsync_ms:.2f} ms per instance")
    if args.json:
        args.json.write_text(json.dumps({"count": args.count, "size": args.size, "mb": mb, "cpu": cpu_name(),
                                         "load": load, "fsync_ms_per_instance": fsync_ms, "receivers": summary},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
