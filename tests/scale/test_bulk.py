"""`iqe bulk` on Ray: equal to `iqe score`, resumable, crash-tolerant, and on a two-node loopback cluster.

Ray is kept small (2 CPUs in-process, 1 CPU per node in the cluster, small object stores).
Reference rows come from `iqe score` itself on the same archive (PNG folders, a broken file,
a DICOM series, a NIfTI volume). Rows, order, keys and errors must be equal; floats equal
to 1e-6 relative: ONNX Runtime's CPU GEMMs round the last bit differently when a batch
holds other images, and where Ray's chunks of sources split `iqe score`'s batches they do.
A PNG-only archive with chunks a multiple of --batch must give byte-identical files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from iqe.cli import main
from iqe.model.bundle import save_bundle
from tests.conftest import REPO, write_test_images

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A bundle, an archive with good, bad and grouped inputs, and `iqe score`'s rows for it."""
    import torch

    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel
    from tests.conftest import randomize_
    from tests.runtime.test_volumes import write_cube_series

    root = tmp_path_factory.mktemp("bulk")
    os.environ["IQE_CACHE"] = str(root / "cache")
    torch.manual_seed(0)
    bundle = save_bundle(randomize_(IQEModel(load_config("tiny")), seed=1).eval(), root / "bundle")
    archive = root / "archive"
    for seed in range(3):
        write_test_images(archive / f"site{seed}", seed=seed)
    pngs = root / "pngs"
    shutil.copytree(archive, pngs)
    (archive / "site1" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_cube_series(archive / "series", [1, 0, 0, 0, 1, 0], spacing=2.5, count=5)
    import nibabel as nib

    vol = np.random.default_rng(0).normal(40, 30, (48, 40, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1.0])), archive / "vol.nii.gz")
    scored = {}
    for name, folder in (("archive", archive), ("pngs", pngs)):
        scored[name] = root / f"score-{name}"
        assert main(["score", "--model", str(bundle), "--backend", "onnxruntime", str(folder), "--out",
                     str(scored[name]), "--batch", "2", "--quiet"]) == 0
    yield {"root": root, "bundle": bundle, "archive": archive, "score": scored["archive"], "pngs": pngs,
           "score_pngs": scored["pngs"]}


@pytest.fixture(scope="module")
def local_ray(env):
    from iqe.runtime.bulk import BulkOptions, _init_ray

    _init_ray(BulkOptions(env["bundle"], num_cpus=2, object_store_mb=128))
    yield
    ray.shutdown()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), a["path"]
        for k, v in b.items():
            assert a[k] == (pytest.approx(v, rel=1e-6, abs=1e-7) if isinstance(v, float) else v), (a["path"], k)


def _opts(env, **kw):
    from iqe.runtime.bulk import BulkOptions

    return BulkOptions(env["bundle"], batch=2, units_per_task=4, actors=2, progress=False, **kw)


def test_bulk_equals_score_and_resumes(env, local_ray, tmp_path):
    from iqe.runtime.bulk import run_bulk

    manifest = tmp_path / "archive.txt"  # a manifest naming the archive's parts, relative to itself
    manifest.write_text("".join(f"{os.path.relpath(p, tmp_path)}\n" for p in sorted(env["archive"].iterdir())))
    out = tmp_path / "out"
    summary = run_bulk([str(manifest)], out, _opts(env, save_maps=True))
    want = _rows(env["score"])
    assert_same_rows(_rows(out), want)
    assert sum("error" in r for r in want) == 1 and any("series" in r for r in want)
    n_units = 3 * 4 + 1 + 1 + 1  # PNGs, the broken file, the series, the NIfTI volume
    assert summary["units"] == summary["scored_units"] == n_units and summary["skipped_done"] == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out / "results.parquet").to_pydict()
    assert table["path"] == [r["path"] for r in want]
    maps = {r: np.load(out / "maps" / f) for r, f in zip(table["path"], table["map_file"]) if f}
    assert len(maps) == len(want) - 1 and all(m["map_smooth"].shape == (240, 240) for m in maps.values())
    # the map of a row is that image's map_smooth: its max is the row's map_max
    for row in want:
        if "error" not in row:
            assert float(maps[row["path"]]["map_smooth"].max()) == pytest.approx(row["map_max"], abs=1e-6)
    # resume: lose one part file (as if the run died before writing it) and run again
    parts = sorted((out / "parts").glob("part-*.parquet"))
    lost = pq.read_table(parts[0]).column("unit").to_pylist()
    parts[0].unlink()
    (out / "results.jsonl").unlink()
    again = run_bulk([str(manifest)], out, _opts(env, save_maps=True))
    assert again["skipped_done"] == n_units - len(set(lost)) and again["scored_units"] == len(set(lost))
    assert_same_rows(_rows(out), want)
    # everything done: nothing to score, nothing starts
    third = run_bulk([str(manifest)], out, _opts(env))
    assert third["skipped_done"] == n_units and "scored_units" not in third


def test_killed_actor_is_retried_and_aligned_chunks_are_byte_identical(env, local_ray, tmp_path):
    """An actor dies hard mid-run: its chunk is scored again by the restarted actor, no row lost or doubled.

    PNG-only archive, chunks (4 sources) a multiple of --batch (2): every engine call sees the
    same images as in `iqe score`, so the files are byte-identical.
    """
    from iqe.runtime.bulk import run_bulk

    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    run_bulk([str(env["pngs"])], out, _opts(env, fail_once=str(marker)))
    assert marker.is_file(), "no actor crashed"
    import pyarrow.parquet as pq

    paths = [p for f in (out / "parts").glob("part-*.parquet") for p in pq.read_table(f).column("path").to_pylist()]
    assert sorted(paths) == sorted(r["path"] for r in _rows(env["score_pngs"]))  # each exactly once
    assert (out / "results.jsonl").read_text() == (env["score_pngs"] / "results.jsonl").read_text()


def _ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_ray_bin(), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _ray_bin() -> str:
    ray_bin = Path(sys.executable).with_name("ray")
    return str(ray_bin) if ray_bin.exists() else "ray"


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block` in its own process group: stopping it ends exactly the processes it started."""
    return subprocess.Popen([_ray_bin(), "start", "--block", *args], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop_node(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_dashboard(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"Ray head not up after {timeout} s:\n{log.read_text()[-3000:]}")


def test_two_node_loopback_cluster_job(env, tmp_path):
    """`ray start` head on 127.0.0.2 + a second node, token auth on, `iqe bulk --ray` submitted as a job."""
    from tests.scale.tritonserver import free_port

    if ray.is_initialized():
        ray.shutdown()
    port, dash, client = free_port(), free_port(), free_port()
    token = secrets.token_hex(16)
    temp = Path("/tmp") / f"iqe-ray-{secrets.token_hex(3)}"  # short: Ray's socket paths have a length limit
    e = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    small = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
    nodes = []
    try:
        nodes.append(_start_node(["--head", "--node-ip-address=127.0.0.2", f"--port={port}", f"--temp-dir={temp}",
                                  "--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={dash}",
                                  f"--ray-client-server-port={client}", *small], e, tmp_path / "head.log"))
        dashboard = f"http://127.0.0.2:{dash}"
        _wait_dashboard(dashboard, token, nodes[0], tmp_path / "head.log")
        nodes.append(_start_node([f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.2", *small], e,
                                 tmp_path / "worker.log"))
        out = tmp_path / "out"
        job = [sys.executable, "-m", "iqe.cli", "bulk", "--model", str(env["bundle"]), str(env["archive"]),
               "--out", str(out), "--ray", "auto", "--batch", "2", "--units-per-task", "4", "--actors", "2", "--quiet"]
        runtime = json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "IQE_CACHE": os.environ["IQE_CACHE"]}})
        r = _ray_cli("job", "submit", f"--address={dashboard}", f"--runtime-env-json={runtime}", "--", *job, env=e,
                     timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # a client with another token is refused
        req = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        assert refused.value.code in (401, 403)
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        shutil.rmtree(temp, ignore_errors=True)
    assert_same_rows(_rows(out), _rows(env["score"]))
    summary = json.loads((out / "bulk_summary.json").read_text())
    # A fixed pool of 2 actors of 1 CPU each on two 1-CPU nodes puts one actor on each node; which
    # actor scores which block is Ray's choice (on an idle machine the first one up may take them all).
    assert summary["actors"] == 2 and 1 <= len(summary["nodes"]) <= 2, summary
