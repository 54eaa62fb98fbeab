"""The node wired together: receive -> spool -> group series -> score -> build SR/PM/SC -> outbox -> send.

    StoreSCP (scp.py)         C-STORE -> Spool (durable) -> status
    series worker (here)      quiet/triggered series -> SeriesResults (pipeline.py) -> Outbox + study JSON
    sender (here)             Outbox -> DicomSender (C-STORE SCU), retry with backoff
    HTTP (here)               /healthz, /metrics (prometheus-client), POST /series/<uid>/complete

Restart-safe by construction: the spool and outbox are the state. On start, series whose
instance set was not scored are scored (their job name, and so their result UIDs, are the
same as before the crash) and waiting jobs are sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from iqe.node.config import NodeConfig
from iqe.node.dicom_results import ResultContext
from iqe.node.outbox import DicomSender, Outbox
from iqe.node.pipeline import SeriesResults, StudyResults, job_name
from iqe.node.runtime_adapter import SeriesScorer
from iqe.node.scp import Rejection, StoreSCP
from iqe.node.spool import PendingSeries, Spool

log = logging.getLogger("iqe.node")
POLL_S = 0.1  # how often the series worker and the sender look for work
SCORING_RETRY_S = 30.0  # a series whose scoring raised is tried again after this long


class NodeMetrics:
    """Prometheus metrics of one node (own registry, so several nodes can live in one process)."""

    def __init__(self, spool: Spool, outbox: Outbox) -> None:
        self.registry = r = CollectorRegistry()
        self.received = Counter("iqe_node_instances_received", "Instances stored in the spool", registry=r)
        self.duplicates = Counter("iqe_node_instances_duplicate", "Instances received again (idempotent)", registry=r)
        self.scored = Counter("iqe_node_series_scored", "Series scored (instance sets)", registry=r)
        self.sent = Counter("iqe_node_results_sent", "Result objects stored at the destination", registry=r)
        self.failures = Counter("iqe_node_failures", "Failures by kind", ["kind"], registry=r)
        self.spool_depth = Gauge("iqe_node_spool_series_pending", "Series received but not yet scored", registry=r)
        self.spool_depth.set_function(spool.unscored_count)
        self.outbox_depth = Gauge("iqe_node_outbox_jobs", "Result jobs waiting for delivery", registry=r)
        self.outbox_depth.set_function(outbox.depth)
        self.latency = Histogram("iqe_node_receive_to_result_seconds",
                                 "Last instance of a series received -> its results stored at the destination",
                                 buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800), registry=r)


class Node:
    """The DICOM inference node.

    Args:
        cfg: the node configuration.
        scorer: a SeriesScorer (default: built from cfg.model).
    """

    def __init__(self, cfg: NodeConfig, scorer: SeriesScorer | None = None) -> None:
        from iqe import __version__

        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.outbox = Outbox(cfg.spool, cfg.outbox)
        self.studies = StudyResults(cfg.spool / "results")
        self.metrics = NodeMetrics(self.spool, self.outbox)
        self.scorer = scorer or SeriesScorer(cfg.model)
        self.version = f"iqe-engine {__version__}"
        self.sender = (DicomSender(cfg.destination, cfg.node.ae_title, cfg.outbox.timeout_s)
                       if cfg.destination else None)
        self.scp = StoreSCP(cfg.node, self.spool, self._stored, self._rejected)
        self._stop = threading.Event()
        self._wake_sender = threading.Event()
        self._triggers: set[str] = set()
        self._retry_after: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self.address: tuple[str, int] | None = None
        self.http_address: tuple[str, int] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the SCP, the series worker, the sender and the HTTP endpoint."""
        self.spool.resume()
        self.address = self.scp.start()
        for name, target in (("iqe-series", self._series_loop), ("iqe-sender", self._sender_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.cfg.node.http_port:
            self._http = ThreadingHTTPServer((self.cfg.node.http_host, self.cfg.node.http_port), _handler(self))
            host, port = self._http.server_address[:2]
            self.http_address = (str(host), int(port))
            threading.Thread(target=self._http.serve_forever, name="iqe-http", daemon=True).start()
        log.info("node %s listening on %s:%d (DICOM), http %s; spool %s; destination %s", self.cfg.node.ae_title,
                 *self.address, self.http_address, self.cfg.spool,
                 f"{self.cfg.destination.ae_title}@{self.cfg.destination.host}:{self.cfg.destination.port}"
                 if self.cfg.destination else "none")

    def stop(self) -> None:
        """Stop accepting, finish the current step, release the runner."""
        self.scp.stop()
        self._stop.set()
        self._wake_sender.set()
        for t in self._threads:
            t.join(timeout=60)
        if self._http is not None:
            self._http.shutdown()
        self.scorer.close()

    def trigger(self, series_uid: str) -> bool:
        """Score `series_uid` now instead of after the quiet period; False when it is not spooled."""
        if not (self.spool.series_root / series_uid).is_dir():
            return False
        self._triggers.add(series_uid)
        return True

    # -- intake callbacks --------------------------------------------------------------------
    def _stored(self, series_uid: str, new: bool) -> None:
        (self.metrics.received if new else self.metrics.duplicates).inc()

    def _rejected(self, r: Rejection) -> None:
        self.metrics.failures.labels("association_rejected" if r.status == -1 else "instance_refused").inc()
        if r.study_uid:
            self.studies.reject(r.study_uid, {"sop_instance_uid": r.sop_uid, "sop_class_uid": r.sop_class,
                                              "calling_ae": r.calling_ae, "status": f"0x{r.status:04X}",
                                              "reason": r.reason, "time": time.time()})

    # -- series worker -----------------------------------------------------------------------
    def _series_loop(self) -> None:
        while not self._stop.is_set():
            force, self._triggers = self._triggers, set()
            now = time.time()
            for series in self.spool.pending(self.cfg.node.quiet_period_s, now, force):
                if self._stop.is_set():
                    return
                if self._retry_after.get(series.series_uid, 0) > now and series.series_uid not in force:
                    continue
                try:
                    self.process(series)
                except Exception:  # noqa: BLE001 - one series must never stop the node; it is retried
                    log.exception("series %s: scoring failed; retry in %.0f s", series.series_uid, SCORING_RETRY_S)
                    self.metrics.failures.labels("scoring").inc()
                    self._retry_after[series.series_uid] = time.time() + SCORING_RETRY_S
            self._stop.wait(POLL_S)

    def process(self, series: PendingSeries) -> None:
        """Score one complete series and queue its results (once per instance set)."""
        job = job_name(series.series_uid, series.digest)
        if self.outbox.has(job):  # produced before a crash, not yet marked: never produce it twice
            self.spool.mark_scored(series, job)
            return
        t0 = time.time()
        ctx = ResultContext(job, self.cfg.node.uid_root, self.cfg.results.series_number, self.scorer.identity,
                            self.version)
        with self.spool.snapshot(series) as folder:
            out = SeriesResults.build(folder, series.series_uid, series.study_uid, self.scorer, ctx,
                                      self.cfg.results.parametric_map, self.cfg.results.overlays)
        self.studies.put_series(series.study_uid, out.summary)
        self.outbox.put(job, out.objects, {"series_uid": series.series_uid, "study_uid": series.study_uid,
                                           "last_received": series.last_received, "instances": len(series.instances)})
        self.spool.mark_scored(series, job)
        self.metrics.scored.inc()
        for error in out.errors:
            self.metrics.failures.labels("unscorable").inc()
            log.warning("%s", error)
        log.info("series %s (study %s): %d instances scored in %.2f s, score %s, %d result objects queued",
                 series.series_uid, series.study_uid, len(series.instances), time.time() - t0,
                 f"{out.score.score:.4f}" if out.score.score is not None else "none", len(out.objects))
        self._wake_sender.set()

    # -- sender ------------------------------------------------------------------------------
    def _sender_loop(self) -> None:
        while not self._stop.is_set():
            self.outbox.deliver_due(self.sender, on_delivered=self._delivered,
                                    on_failed=lambda kind: self.metrics.failures.labels("send").inc())
            self._wake_sender.wait(POLL_S * 5)
            self._wake_sender.clear()

    def _delivered(self, meta: dict) -> None:
        self.metrics.sent.inc(len(meta["files"]))
        if self.sender is not None:
            self.metrics.latency.observe(max(0.0, time.time() - float(meta.get("last_received", time.time()))))


def _handler(node: Node) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/healthz":
                alive = all(t.is_alive() for t in node._threads) and node.scp.server is not None
                body = {"status": "ok" if alive else "degraded", "ae_title": node.cfg.node.ae_title,
                        "spool_series_pending": node.spool.unscored_count(), "outbox_jobs": node.outbox.depth(),
                        "model": node.scorer.identity.as_dict()}
                self._send(200 if alive else 503, json.dumps(body).encode())
            elif self.path == "/metrics":
                self._send(200, generate_latest(node.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b'{"error": "unknown path; known: /healthz, /metrics, POST /series/<uid>/complete"}')

        def do_POST(self) -> None:  # noqa: N802
            parts = self.path.strip("/").split("/")
            if len(parts) == 3 and parts[0] == "series" and parts[2] == "complete":
                ok = node.trigger(parts[1])
                self._send(202 if ok else 404, json.dumps({"series_uid": parts[1], "triggered": ok}).encode())
            else:
                self._send(404, b'{"error": "unknown path"}')

        def log_message(self, format: str, *args) -> None:  # quiet: scrapes every few seconds
            log.debug("http %s", format % args)

    return Handler


def run_node(config_path: str | Path) -> int:
    """`iqe node`: run until SIGTERM / SIGINT."""
    import signal

    from iqe.node.config import load_config

    cfg = load_config(config_path)
    node = Node(cfg)
    node.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    node.stop()
    return 0
