"""Bulk scoring of archives on Ray Data (`iqe bulk INPUTS --out DIR [--ray ADDRESS]`).

    inputs (files, folders, manifests) --discover on the driver--> one unit per source
      (a PNG, a DICOM file, a whole DICOM series, a NIfTI volume, or an unreadable path)
    --ray.data.from_items--> map_batches(_Scorer, actor pool: one engine per actor)
      each actor reads its units with `iqe.runtime.sources` and scores them with
      `iqe.runtime.scoring.score_items`: the code and batching `iqe score` uses
    --driver--> DIR/parts/*.parquet (one atomic file per finished block), maps/<id>.npz
    at the end: DIR/results.parquet and DIR/results.jsonl (rows and order of `iqe score`)

A series is one unit, so its slices are ordered and indexed exactly as in `iqe score`.
Resuming: units whose rows are all in DIR/parts are skipped; a unit cut short by a crash
is scored again and its stale rows dropped. Actors take whole CPUs (and a GPU each when
the cluster has them): fractional-CPU actors can starve other tasks of the 1 CPU they
need; ONNX Runtime in each actor gets `cpus_per_actor` threads. Ray Data retries the
blocks of an actor that dies (its restarted replacement scores them again).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iqe.errors import InputError

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".jsonl")
PARTS, MAPS = "parts", "maps"
_COLUMNS = ("unit", "unit_rows", "slice_no", "path", "row", "map_file", "node", "t_start", "t_end")


@dataclass
class BulkOptions:
    bundle: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
    batch: int = 8
    actors: int | None = None  # default: cluster CPUs // cpus_per_actor
    cpus_per_actor: int = 1
    units_per_task: int = 32  # sources per actor call; a multiple of `batch` keeps batches aligned with `iqe score`
    save_maps: bool = False
    windows: dict | None = None
    address: str | None = None  # None: in-process ray.init()
    num_cpus: int | None = None  # in-process cluster size (default: all cores)
    object_store_mb: int = 256
    progress: bool = True
    fail_once: str | None = None  # fault injection (tests): the first actor call that finds no file here exits hard


# -- planning ---------------------------------------------------------------------------------
def read_manifest(path: Path) -> list[str]:
    """Paths listed in a manifest: .txt/.lst one per line, .csv/.jsonl a `path` column; relative to the manifest."""
    base = path.parent
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if "path" not in (reader.fieldnames or []):
                raise InputError(f"{path}: manifest CSV needs a 'path' column")
            raw = [row["path"] for row in reader]
    elif path.suffix == ".jsonl":
        raw = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{path}:{n}: expected a JSON object with a 'path'") from None
    else:
        raw = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [p if Path(p).is_absolute() else os.path.normpath(base / p) for p in raw]


def expand_inputs(inputs: Iterable[str | Path]) -> list[str]:
    """Command-line inputs with manifests replaced by the paths they list (order kept)."""
    out: list[str] = []
    for raw in inputs:
        p = Path(raw)
        out.extend(read_manifest(p) if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES else [str(raw)])
    return out


def plan_units(inputs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One unit per source, in `iqe score` order (headers only are read here)."""
    from iqe.runtime.scoring import discover_in_order

    units = []
    for seq, s in enumerate(discover_in_order(expand_inputs(inputs))):
        units.append({"seq": seq, "unit": f"{s.kind}:{s.name}", "kind": s.kind, "path": str(s.path),
                      "files": json.dumps([str(f) for f in s.files]), "series_uid": s.series_uid or "",
                      "ordered_by": s.ordered_by or "", "error": s.error or ""})
    return units


def _source(unit: dict[str, Any]):
    from iqe.runtime.sources import Source

    return Source(unit["kind"], Path(unit["path"]), tuple(Path(f) for f in json.loads(unit["files"])),
                  unit["series_uid"] or None, unit["ordered_by"] or None, unit["error"] or None)


# -- the actor --------------------------------------------------------------------------------
class _Scorer:
    """One engine per actor; scores whole units (sources) per call."""

    def __init__(self, opts: BulkOptions, engine_dir: str | None, image_size: int):
        from iqe.engine.build import make_runner
        from iqe.engine.onnxruntime_backend import OrtRunner

        t0 = time.perf_counter()
        self.opts = opts
        self.runner = make_runner(opts.bundle, opts.backend, opts.precision, engine_dir, progress=False)
        if isinstance(self.runner, OrtRunner):
            self.runner.threads = opts.cpus_per_actor  # not every core of the node: actors share it
        elif opts.backend == "torch":
            import torch

            torch.set_num_threads(opts.cpus_per_actor)
        self.runner.activate()
        self.size = image_size
        self.startup_s = time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """One row per call: a chunk of units, scored as one stream (batches span sources, as in `iqe score`)."""
        from iqe.runtime.scoring import score_items
        from iqe.runtime.sources import check_windows, iter_slices

        t_start = time.time()
        _maybe_fail(self.opts.fail_once)
        windows = check_windows(self.opts.windows)
        units = [u for chunk in batch["units"] for u in json.loads(str(chunk))]
        unit_of: list[int] = []  # unit index of every item, filled as the stream is read

        def items():
            for i, unit in enumerate(units):
                for item in iter_slices(_source(unit), self.size, windows):
                    unit_of.append(i)
                    yield item

        results = score_items(items(), self.runner.infer, self.opts.batch, keep_maps=self.opts.save_maps,
                              progress=False)
        counts = np.bincount(unit_of, minlength=len(units))
        cols: dict[str, list] = {k: [] for k in _COLUMNS if not k.startswith("t_")}
        maps: list[np.ndarray] = []
        node = _node_id()
        slice_no = 0
        for k, r in enumerate(results):
            i = unit_of[k]
            slice_no = slice_no + 1 if k and unit_of[k - 1] == i else 0
            cols["unit"].append(units[i]["unit"])
            cols["unit_rows"].append(int(counts[i]))
            cols["slice_no"].append(slice_no)
            cols["path"].append(r.path)
            cols["row"].append(json.dumps(r.to_json()))
            cols["map_file"].append(_map_name(r.path) if self.opts.save_maps and r.error is None else "")
            cols["node"].append(node)
            if self.opts.save_maps:
                maps.append(np.stack([r.map, r.map_smooth]) if r.map is not None and r.map_smooth is not None else
                            np.zeros((2, self.size, self.size), np.float32))
        cols["t_start"] = [t_start] * len(results)  # wall clock of this chunk: throughput once actors are up
        cols["t_end"] = [time.time()] * len(results)
        out: dict[str, Any] = {k: np.array(v) for k, v in cols.items()}
        if self.opts.save_maps:
            out["maps"] = np.stack(maps).astype(np.float32) if maps else np.zeros((0, 2, self.size, self.size), np.float32)
        return out


def _maybe_fail(marker: str | None) -> None:
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)  # an actor crash, as a node loss or OOM kill would cause


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _map_name(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:20] + ".npz"


# -- driver ---------------------------------------------------------------------------------
def _done_units(out: Path) -> tuple[set[str], list[Path]]:
    """Units whose rows are all present in the readable part files (plus those files)."""
    import pyarrow.parquet as pq

    rows: dict[str, set[int]] = {}
    expected: dict[str, int] = {}
    files = []
    for f in sorted((out / PARTS).glob("part-*.parquet")):
        try:
            t = pq.read_table(f, columns=["unit", "unit_rows", "slice_no"]).to_pydict()
        except Exception:  # a file not written through (should not happen: parts are renamed into place)
            continue
        files.append(f)
        for unit, total, no in zip(t["unit"], t["unit_rows"], t["slice_no"]):
            rows.setdefault(unit, set()).add(no)
            expected[unit] = total
    return {u for u, got in rows.items() if len(got) == expected[u]}, files


def _init_ray(opts: BulkOptions):
    import ray

    repo = str(Path(__file__).resolve().parents[2])
    # workers import this checkout's `iqe` (nodes of a real cluster need the package installed as well)
    paths = [repo] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != repo]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
    if ray.is_initialized():
        return ray
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # execution-plan chatter; errors still show
    if opts.address:
        try:
            ray.init(address=opts.address, runtime_env=runtime_env, **quiet)
        except ValueError:  # inside a submitted job: the job's runtime env applies (and must not be overridden)
            ray.init(address=opts.address, **quiet)
    else:
        ray.init(num_cpus=opts.num_cpus, object_store_memory=opts.object_store_mb << 20, include_dashboard=False,
                 runtime_env=runtime_env, **quiet)
    return ray


def run_bulk(inputs: list[str], out: str | Path, opts: BulkOptions) -> dict[str, Any]:
    """Score `inputs` on Ray into `out` (see the module docstring); returns a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from iqe.atomic import atomic_open, atomic_write_text
    from iqe.engine.build import ensure_engine
    from iqe.runtime.sources import check_windows

    out = Path(out)
    check_windows(opts.windows)
    if opts.batch < 1:
        raise InputError(f"--batch must be >= 1, got {opts.batch}")
    if not (Path(opts.bundle) / "config.json").is_file():
        raise InputError(f"{opts.bundle}: not a bundle (config.json missing)")
    t0 = time.perf_counter()
    units = plan_units(inputs)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    done, _ = _done_units(out)
    todo = [u for u in units if u["unit"] not in done]
    engine_dir = None
    if opts.backend != "torch":  # built once here, loaded by every actor
        engine_dir = str(ensure_engine(opts.bundle, opts.backend, opts.precision, progress=opts.progress))
    image_size = json.loads((Path(opts.bundle) / "config.json").read_text()).get("image_size", 240)
    plan_s = time.perf_counter() - t0
    summary: dict[str, Any] = {"units": len(units), "skipped_done": len(units) - len(todo), "plan_s": round(plan_s, 2)}
    if todo:
        ray = _init_ray(opts)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts units on the driver
        resources = ray.cluster_resources()
        actors = opts.actors or max(1, int(resources.get("CPU", 1)) // opts.cpus_per_actor)
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0  # one GPU per actor where the cluster has them
        # one dataset row per chunk of units: chunk boundaries are exactly where we cut them
        chunks = [{"units": json.dumps(todo[i:i + opts.units_per_task])}
                  for i in range(0, len(todo), opts.units_per_task)]
        ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
        ds = ds.map_batches(_Scorer, fn_constructor_args=(opts, engine_dir, image_size), batch_size=1,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(actors, len(chunks))),
                            num_cpus=opts.cpus_per_actor, num_gpus=gpus)
        bar = tqdm(total=len(todo), desc="bulk", unit="unit", disable=not opts.progress)
        t1, wall1 = time.perf_counter(), time.time()
        first = None
        span = [float("inf"), 0.0, 0]  # earliest chunk start, latest chunk end, items
        seen_units: set[str] = set()
        nodes: set[str] = set()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            first = first or time.perf_counter() - t1
            maps = batch.pop("maps", None)
            if maps is not None:
                (out / MAPS).mkdir(exist_ok=True)
                for name, m in zip(batch["map_file"], maps):
                    if name:
                        with atomic_open(out / MAPS / str(name), "wb", durable=False) as fh:
                            np.savez(fh, map=m[0], map_smooth=m[1])
            table = pa.table({k: batch[k].tolist() for k in _COLUMNS})
            with atomic_open(out / PARTS / f"part-{uuid.uuid4().hex}.parquet", "wb") as fh:
                pq.write_table(table, fh)
            nodes.update(table.column("node").to_pylist())
            span = [min(span[0], min(batch["t_start"])), max(span[1], max(batch["t_end"])), span[2] + len(table)]
            new = set(table.column("unit").to_pylist()) - seen_units
            seen_units |= new
            bar.update(len(new))
        bar.close()
        summary.update(scored_units=len(seen_units), first_block_s=round(first or 0.0, 2),
                       run_s=round(time.perf_counter() - t1, 2), actors=min(actors, len(chunks)),
                       nodes=sorted(nodes), actor_startup_s=round(span[0] - wall1, 2),
                       items_per_s_actors_up=round(span[2] / max(span[1] - span[0], 1e-9), 2))
    n = _finish(out, units)
    summary.update(items=n, total_s=round(time.perf_counter() - t0, 2))
    atomic_write_text(out / "bulk_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _finish(out: Path, units: list[dict[str, Any]]) -> int:
    """results.parquet + results.jsonl from the part files: `iqe score` order, one row per item."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iqe.atomic import atomic_open

    order = {u["unit"]: u["seq"] for u in units}
    done, files = _done_units(out)
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for f in files:
        t = pq.read_table(f).to_pydict()
        for i, unit in enumerate(t["unit"]):
            if unit in order and unit in done:  # units of other inputs, or cut short, stay out
                rows.setdefault((order[unit], t["slice_no"][i]), {k: t[k][i] for k in _COLUMNS})
    ordered = [rows[k] for k in sorted(rows)]
    missing = [u["unit"] for u in units if u["unit"] not in done]
    if missing:
        raise RuntimeError(f"bulk run incomplete: {len(missing)} units without results (first: {missing[0]}); "
                           "run the same command again to resume")
    with atomic_open(out / "results.parquet", "wb") as fh:
        pq.write_table(pa.table({k: [r[k] for r in ordered] for k in _COLUMNS}), fh)
    with atomic_open(out / "results.jsonl", "w") as fh:
        for r in ordered:
            fh.write(r["row"] + "\n")
    return len(ordered)


# -- CLI ------------------------------------------------------------------------------------------
def cmd_bulk(args: argparse.Namespace) -> int:
    """Score an archive (folders, DICOM series, NIfTI, manifests) on Ray Data; resumable; writes Parquet + results.jsonl."""
    from iqe.runtime.results import read_results

    opts = BulkOptions(bundle=args.model, backend=args.backend, precision=args.precision, batch=args.batch,
                       actors=args.actors, cpus_per_actor=args.cpus_per_actor, units_per_task=args.units_per_task,
                       save_maps=args.save_maps, windows=dict(args.window or []), address=args.ray,
                       num_cpus=args.num_cpus, object_store_mb=args.object_store_mb, progress=not args.quiet)
    if opts.bundle is None:
        raise InputError("no model: pass --model BUNDLE or set IQE_MODEL")
    summary = run_bulk(args.inputs, args.out, opts)
    failed = sum("error" in r for r in read_results(args.out))
    print(f"scored {summary['items'] - failed} of {summary['items']} items ({summary['units']} sources, "
          f"{summary['skipped_done']} already done) -> {Path(args.out) / 'results.jsonl'}", file=sys.stderr)
    return 0 if summary["items"] > failed else 2


def register(add) -> None:
    """Add `iqe bulk` to the CLI."""
    from iqe.argtypes import int_at_least
    from iqe.cli import _window

    p = add("bulk", cmd_bulk)
    p.add_argument("inputs", nargs="+", help="files, folders (DICOM series grouped), NIfTI, or manifests "
                                             f"({', '.join(MANIFEST_SUFFIXES)}: one path per line / a 'path' column)")
    p.add_argument("--model", type=Path, default=os.environ.get("IQE_MODEL"), help="bundle directory (env IQE_MODEL)")
    p.add_argument("--out", type=Path, required=True, help="output directory (resumed when it holds a previous run)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="Ray cluster address (e.g. auto or HOST:6379); default: start Ray in this process")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--batch", type=int_at_least(1), default=8, help="images per inference call")
    p.add_argument("--actors", type=int_at_least(1), default=None, help="engine actors (default: cluster CPUs / cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=int_at_least(1), default=1, help="whole CPUs (= ORT threads) per actor")
    p.add_argument("--units-per-task", type=int_at_least(1), default=32,
                   help="sources (files / series) per actor call (a multiple of --batch keeps batches as in `iqe score`)")
    p.add_argument("--num-cpus", type=int_at_least(1), default=None, help="in-process Ray: CPUs to use (default: all)")
    p.add_argument("--object-store-mb", type=int_at_least(64), default=256, help="in-process Ray: object store size")
    p.add_argument("--save-maps", action="store_true", help="write maps/<id>.npz (map, map_smooth) per item")
    p.add_argument("--window", type=_window, action="append", default=None, metavar="MODALITY=C,W",
                   help="intensity window override as in `iqe score`")
