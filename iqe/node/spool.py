"""Durable spool: received instances grouped by series, and what has been scored.

    <spool>/series/<SeriesInstanceUID>/.series.json          study UID, modality, first arrival
    <spool>/series/<SeriesInstanceUID>/<SOPInstanceUID>.dcm  instances, as received (file format)
    <spool>/series/<SeriesInstanceUID>/.scored.json          digest of the instance set last scored

Every file is written to a temporary name, fsynced, renamed, and its directory fsynced
(`iqe.atomic`) before `store` returns, so a success status sent after it means the
instance survives a crash or power cut. A series is *pending* while its set of instances
differs from the set last scored; it is *complete* once no instance arrived for the
quiet period (or on an explicit trigger). The set's digest names the result job, so a
restart that scores the same set again produces the same job and the same result UIDs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from iqe.atomic import atomic_write_bytes, atomic_write_text, fsync_dir

log = logging.getLogger("iqe.node")
# Hidden names: the runtime's folder discovery skips dot files, so a series folder scores as `iqe score` would.
SERIES_JSON, SCORED_JSON = ".series.json", ".scored.json"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (also safe as a file name)."""
    return 0 < len(uid) <= 64 and bool(_UID.match(uid))


@dataclass
class PendingSeries:
    """A series whose instance set has not been scored yet."""

    series_uid: str
    study_uid: str
    folder: Path
    instances: list[str]  # SOP Instance UIDs, sorted
    digest: str  # sha256 of the sorted SOP Instance UIDs (names the result job)
    first_received: float  # epoch seconds of the first instance (latency metric)
    last_received: float  # epoch seconds of the newest instance


class Spool:
    """Instances on disk, grouped by series; thread-safe.

    Args:
        root: spool directory (created).
        durable: fsync files and directories (False only for benchmarks measuring its cost).
    """

    def __init__(self, root: str | Path, durable: bool = True) -> None:
        self.root = Path(root)
        self.series_root = self.root / "series"
        self.series_root.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # series -> newest arrival (epoch s)
        self._dirty: set[str] = set()  # series that may hold unscored instances
        for folder in self.series_root.iterdir():
            if folder.is_dir() and any(folder.glob("*.dcm")):
                self._last[folder.name] = time.time()
                self._dirty.add(folder.name)

    def resume(self) -> None:
        """Restart the quiet period of every spooled series (called when intake opens after a restart:
        a sender cut off by the crash is probably still resending the rest of its series)."""
        with self._lock:
            now = time.time()
            for uid in self._dirty:
                self._last[uid] = now

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes, info: dict | None = None) -> bool:
        """Write one instance durably; returns False when it was already there (a duplicate).

        Args:
            study_uid, series_uid, sop_uid: the instance's UIDs (checked by the caller).
            data: the instance in DICOM file format (preamble + file meta + data set).
            info: facts for series.json on the first instance (modality, calling AE, ...).
        """
        folder = self.series_root / series_uid
        target = folder / f"{sop_uid}.dcm"
        now = time.time()
        with self._lock:
            if not folder.is_dir():
                folder.mkdir(parents=True)
                if self.durable:
                    fsync_dir(self.series_root)
            meta = folder / SERIES_JSON
            if not meta.exists():
                atomic_write_text(meta, json.dumps({"study_uid": study_uid, "series_uid": series_uid,
                                                    "first_received": now, **(info or {})}), durable=self.durable)
            self._last[series_uid] = now
        if target.exists():
            return False
        # Concurrent duplicates write the same bytes to separate temporary names; either rename wins.
        atomic_write_bytes(target, data, durable=self.durable)
        with self._lock:  # only now: a scan that saw the series clean must see this file next time
            self._last[series_uid] = time.time()
            self._dirty.add(series_uid)
        return True

    def series_info(self, series_uid: str) -> dict:
        """series.json of a spooled series."""
        return json.loads((self.series_root / series_uid / SERIES_JSON).read_text())

    def pending(self, quiet_period_s: float, now: float | None = None, force: set[str] | None = None
                ) -> list[PendingSeries]:
        """Series whose instance set is unscored and quiet for `quiet_period_s` (or in `force`)."""
        now = time.time() if now is None else now
        force = force or set()
        out = []
        with self._lock:
            candidates = {uid: self._last[uid] for uid in self._dirty}
        for uid, newest in sorted(candidates.items(), key=lambda kv: kv[1]):
            if now - newest < quiet_period_s and uid not in force:
                continue
            series = self.describe(uid, newest)
            if series is not None and series.digest != self.scored_digest(uid):
                out.append(series)
            else:
                with self._lock:
                    if self._last.get(uid) == newest:  # nothing arrived since the scan began
                        self._dirty.discard(uid)
        return out

    def unscored_count(self) -> int:
        """Series with instances not yet scored (the spool depth metric)."""
        with self._lock:
            uids = list(self._dirty)
        return sum(1 for uid in uids if (s := self.describe(uid, 0.0)) is not None and s.digest != self.scored_digest(uid))

    def describe(self, series_uid: str, last_received: float) -> PendingSeries | None:
        folder = self.series_root / series_uid
        instances = sorted(p.stem for p in folder.glob("*.dcm"))
        if not instances:
            return None
        info = self.series_info(series_uid)
        digest = hashlib.sha256("\n".join(instances).encode()).hexdigest()
        return PendingSeries(series_uid, info["study_uid"], folder, instances, digest,
                             float(info.get("first_received", last_received)), last_received)

    def scored_digest(self, series_uid: str) -> str | None:
        try:
            return json.loads((self.series_root / series_uid / SCORED_JSON).read_text())["digest"]
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def mark_scored(self, series: PendingSeries, job: str) -> None:
        """Record that `series`'s instance set has its result job (written after the job is durable)."""
        atomic_write_text(series.folder / SCORED_JSON, json.dumps({"digest": series.digest, "job": job,
                                                                     "instances": len(series.instances)}),
                          durable=self.durable)

    @contextlib.contextmanager
    def snapshot(self, series: PendingSeries) -> Iterator[Path]:
        """A folder holding exactly `series.instances` (hard links), for scoring.

        Instances keep arriving while a series is scored; scoring the live folder could mix
        a later instance into a job named after the earlier set. The snapshot is what the
        job's name (digest) says it is.
        """
        work = self.root / "work" / f"{series.series_uid}-{series.digest[:16]}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            for sop in series.instances:
                src = series.folder / f"{sop}.dcm"
                try:
                    os.link(src, work / src.name)
                except OSError:  # a file system without hard links
                    shutil.copy2(src, work / src.name)
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def instance_count(self) -> int:
        return sum(1 for _ in self.series_root.glob("*/*.dcm"))
