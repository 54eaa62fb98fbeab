"""The node embedded in Orthanc: score stable series and store the results back through Orthanc's API.

Loaded by `deploy/orthanc/iqe_plugin.py` (the script Orthanc's Python plugin runs), which
only puts our interpreter's site-packages and the repository on `sys.path` and calls
`install`. Orthanc's change callback only queues the series; a worker thread reads the
instances through the REST API, scores them with the same pipeline as the standalone
node (`iqe.node.pipeline`) and POSTs the SR, Parametric Map and SC overlays to
`/instances` — no network hop, nothing long on Orthanc's callback thread.

Our own result series are never scored (their description starts with "IQE", their
Manufacturer is iqe-engine). Result UIDs depend only on the series' instance set and the
model, so a series that becomes stable again with the same instances yields the same
objects, which Orthanc stores once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

from iqe.node.config import NodeConfig

log = logging.getLogger("iqe.node.orthanc")


class OrthancLogHandler(logging.Handler):
    """Python logging -> Orthanc's log (so `iqe.node` messages appear where Orthanc's do)."""

    def __init__(self, orthanc: Any) -> None:
        super().__init__()
        self.orthanc = orthanc

    def emit(self, record: logging.LogRecord) -> None:
        msg = f"iqe: {self.format(record)}"
        if record.levelno >= logging.ERROR:
            self.orthanc.LogError(msg)
        elif record.levelno >= logging.WARNING:
            self.orthanc.LogWarning(msg)
        else:
            self.orthanc.LogInfo(msg)


class OrthancSeriesWorker:
    """Queue of stable series and the thread that scores them.

    Args:
        orthanc: the `orthanc` module of the Python plugin.
        cfg: node configuration ([model], [results], [node] uid_root and spool are used).
    """

    def __init__(self, orthanc: Any, cfg: NodeConfig) -> None:
        self.orthanc, self.cfg = orthanc, cfg
        self.queue: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()  # series waiting in the queue (an event and the replay may both add one)
        self._lock = threading.Lock()
        self.state_path = cfg.spool / "orthanc-plugin.json"
        self.thread = threading.Thread(target=self._run, name="iqe-orthanc", daemon=True)

    def on_change(self, change_type: int, level: int, resource_id: str) -> None:
        """Orthanc's change callback: only queues work (it must return at once)."""
        if change_type == self.orthanc.ChangeType.STABLE_SERIES:
            self._enqueue(resource_id)
        elif change_type == self.orthanc.ChangeType.ORTHANC_STOPPED:
            self.queue.put(None)

    def _enqueue(self, series_id: str) -> None:
        with self._lock:
            if series_id in self._queued:
                return
            self._queued.add(series_id)
        self.queue.put(series_id)

    def replay(self) -> int:
        """Queue the StableSeries changes Orthanc logged since the last checkpoint.

        Orthanc does not repeat a stable-series event after a restart, so series that became
        stable while the plugin was down, loading, or busy when Orthanc stopped are found in
        Orthanc's change log (`/changes`). Returns the number of series queued.
        """
        since, queued = self._checkpoint(), 0
        while True:
            page = self._get(f"/changes?since={since}&limit=500")
            for change in page["Changes"]:
                if change["ChangeType"] == "StableSeries":
                    self._enqueue(change["ID"])
                    queued += 1
            since = page["Last"]
            if page["Done"] or not page["Changes"]:
                return queued

    def _checkpoint(self) -> int:
        try:
            return int(json.loads(self.state_path.read_text())["last_seq"])
        except (FileNotFoundError, KeyError, ValueError):
            return 0

    def _save_checkpoint(self) -> None:
        """With the queue empty, every change up to Orthanc's newest one has been handled."""
        from iqe.atomic import atomic_write_text

        try:
            last = int(self._get("/changes?last")["Last"])
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.state_path, json.dumps({"last_seq": last}))
        except OSError as exc:
            log.warning("change-log checkpoint not saved (%s): a restart replays more, which is harmless", exc)

    def _run(self) -> None:
        from iqe import __version__
        from iqe.node.pipeline import StudyResults
        from iqe.node.runtime_adapter import SeriesScorer

        try:
            scorer = SeriesScorer(self.cfg.model)
        except Exception:  # noqa: BLE001 - reported in Orthanc's log; Orthanc itself keeps running
            log.exception("model could not be loaded; the IQE plugin is idle")
            return
        try:
            studies: StudyResults | None = StudyResults(self.cfg.spool / "results")
        except OSError as exc:  # e.g. the spool is not writable by Orthanc's user: results still go to Orthanc
            log.warning("no JSON results: %s (set [node] spool to a folder Orthanc may write)", exc)
            studies = None
        replayed = self.replay()
        log.info("IQE plugin ready: model %s (%s, %s); %d stable series from Orthanc's change log", scorer.identity.name,
                 scorer.identity.backend, scorer.identity.precision, replayed)
        while (series_id := self.queue.get()) is not None:
            with self._lock:
                self._queued.discard(series_id)
            try:
                self.process(series_id, scorer, studies, f"iqe-engine {__version__}")
            except Exception:  # noqa: BLE001 - one series must not stop the worker
                log.exception("Orthanc series %s: scoring failed", series_id)
            if self.queue.empty():
                self._save_checkpoint()
        scorer.close()

    def _get(self, uri: str) -> Any:
        return json.loads(self.orthanc.RestApiGet(uri))

    def process(self, series_id: str, scorer, studies, software_version: str) -> int:
        """Score one Orthanc series and store its results in Orthanc; returns the objects stored."""
        from iqe.node.dicom_results import MANUFACTURER, SERIES_DESCRIPTION_PREFIX, ResultContext
        from iqe.node.pipeline import SeriesResults, job_name
        from iqe.node.scp import SCORABLE

        series = self._get(f"/series/{series_id}")
        tags = series["MainDicomTags"]
        series_uid = tags.get("SeriesInstanceUID", "?")
        if tags.get("SeriesDescription", "").startswith(SERIES_DESCRIPTION_PREFIX) or \
                tags.get("Manufacturer", "") == MANUFACTURER:
            return 0  # our own results
        instances = self._get(f"/series/{series_id}/instances")
        sop_class = self.orthanc.RestApiGet(f"/instances/{instances[0]['ID']}/metadata/SopClassUid").decode()
        if sop_class not in SCORABLE:
            log.info("series %s: SOP class %s is not scored", series_uid, sop_class)
            return 0
        study_uid = self._get(f"/series/{series_id}/study")["MainDicomTags"]["StudyInstanceUID"]
        sops = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances)
        digest = hashlib.sha256("\n".join(sops).encode()).hexdigest()
        job = job_name(series_uid, digest)
        ctx = ResultContext(job, self.cfg.node.uid_root, self.cfg.results.series_number, scorer.identity,
                            software_version)
        with tempfile.TemporaryDirectory(prefix="iqe-orthanc-") as tmp:
            for n, instance in enumerate(instances):
                Path(tmp, f"{n:05d}.dcm").write_bytes(self.orthanc.RestApiGet(f"/instances/{instance['ID']}/file"))
            out = SeriesResults.build(Path(tmp), series_uid, study_uid, scorer, ctx,
                                      self.cfg.results.parametric_map, self.cfg.results.overlays)
        for kind, ds in out.objects:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.orthanc.RestApiPost("/instances", buf.getvalue())
        if studies is not None:
            studies.put_series(study_uid, out.summary)
        for error in out.errors:
            log.warning("%s", error)
        log.info("series %s (study %s): %d instances scored, score %s, %d result objects stored", series_uid,
                 study_uid, len(instances), f"{out.score.score:.4f}" if out.score.score is not None else "none",
                 len(out.objects))
        return len(out.objects)


def install(orthanc: Any, settings: dict[str, Any]) -> OrthancSeriesWorker:
    """Register the change callback and start the worker.

    Args:
        orthanc: the plugin's `orthanc` module.
        settings: the "IQE" section of Orthanc's configuration: "Config" (path of a
            node.toml; its [model], [results], uid_root and spool are used).
    """
    from iqe.node.config import NodeConfig, load_config

    handler = OrthancLogHandler(orthanc)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("iqe.node")  # iqe.node.orthanc propagates to it
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    cfg = load_config(settings["Config"]) if settings.get("Config") else NodeConfig()
    worker = OrthancSeriesWorker(orthanc, cfg)
    orthanc.RegisterOnChangeCallback(worker.on_change)
    worker.thread.start()
    return worker
