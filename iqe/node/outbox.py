"""Persistent outbox: result jobs on disk, sent by C-STORE with retry and exponential backoff.

    <spool>/outbox/<job>/NN-<kind>.dcm   result objects of one series, read back once written
    <spool>/outbox/<job>/job.json        series, study, receive time, file list
    <spool>/outbox/<job>/state.json      attempts, next attempt time, files already stored, last error
    <spool>/sent/<job>/                  the job after every file was stored (state.json kept)

A job appears under its final name only once all its files are durable (written in a
temporary folder, fsynced, renamed), and a job that exists is never written again, so a
result is produced once. After a restart the outbox is simply sent again; files already
stored are skipped, and resending one is harmless: its SOP Instance UID is the same.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from iqe.atomic import atomic_write_text, fsync_dir
from iqe.node.config import DestinationSection, OutboxSection

log = logging.getLogger("iqe.node")


class SendError(Exception):
    """The destination could not store a result (unreachable, rejected, failure status)."""


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY: small DICOM PDUs go out at once instead of waiting on Nagle + delayed ACKs."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already closed, or not TCP
            pass


class DicomSender:
    """C-STORE SCU to the destination; one association per batch of files.

    Args:
        dest: [destination] section.
        calling_ae_title: our AE title on the association.
        timeout_s: association, DIMSE and network timeout.
    """

    def __init__(self, dest: DestinationSection, calling_ae_title: str, timeout_s: float) -> None:
        self.dest, self.calling, self.timeout = dest, dest.calling_ae_title or calling_ae_title, timeout_s

    def send(self, paths: list[Path], on_stored: Callable[[Path], None]) -> None:
        """Store every file; calls `on_stored` after each success.

        Raises:
            SendError: no association, or a file got a failure status.
        """
        from pynetdicom import AE

        datasets = [(p, pydicom.dcmread(p)) for p in paths]
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
            ae.add_requested_context(sop_class, [str(pydicom.uid.ExplicitVRLittleEndian),
                                                 str(pydicom.uid.ImplicitVRLittleEndian)])
        tls = None
        if self.dest.tls_ca:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.dest.tls_ca)
            tls = (context, self.dest.host)
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls)
        if not assoc.is_established:
            raise SendError(f"no association with {self.dest.ae_title}@{self.dest.host}:{self.dest.port} "
                            f"({'rejected' if assoc.is_rejected else 'unreachable or aborted'})")
        set_nodelay(getattr(assoc.dul.socket, "socket", None))
        try:
            for path, ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError(f"{path.name} ({ds.SOPInstanceUID}): no response from {self.dest.ae_title}")
                if code not in (0x0000, 0x0107, 0x0116) and not 0xB000 <= code <= 0xBFFF:  # success or warning
                    raise SendError(f"{path.name} ({ds.SOPInstanceUID}): {self.dest.ae_title} answered status "
                                    f"0x{code:04X}")
                on_stored(path)
        finally:
            if assoc.is_established:
                assoc.release()


class Outbox:
    """Result jobs waiting for delivery.

    Args:
        root: spool directory (outbox/ and sent/ are created in it).
        settings: [outbox] section (backoff).
    """

    def __init__(self, root: str | Path, settings: OutboxSection) -> None:
        self.dir = Path(root) / "outbox"
        self.sent_dir = Path(root) / "sent"
        for d in (self.dir, self.sent_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        for leftover in self.dir.glob(".tmp-*"):  # a job interrupted while being written: produced again
            shutil.rmtree(leftover, ignore_errors=True)

    def has(self, job: str) -> bool:
        """Whether `job` was already produced (waiting or delivered)."""
        return (self.dir / job).is_dir() or (self.sent_dir / job).is_dir()

    def put(self, job: str, objects: list[tuple[str, Dataset]], meta: dict) -> Path:
        """Write a job durably: every object saved, fsynced and read back, then the folder renamed in.

        Args:
            job: job name (file-safe).
            objects: (kind, data set) in sending order.
            meta: JSON facts (series, study, receive time) for job.json.
        """
        final = self.dir / job
        tmp = self.dir / f".tmp-{job}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        names = []
        for n, (kind, ds) in enumerate(objects):
            name = f"{n:04d}-{kind}.dcm"
            with open(tmp / name, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            back = pydicom.dcmread(tmp / name)  # written objects are read back before they can be sent
            if back.SOPInstanceUID != ds.SOPInstanceUID:
                raise RuntimeError(f"{name}: read back SOP Instance UID {back.SOPInstanceUID} != {ds.SOPInstanceUID}")
            names.append(name)
        with open(tmp / "job.json", "w") as fh:
            json.dump({**meta, "job": job, "files": names, "created": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.dir)
        return final

    def jobs(self) -> list[Path]:
        """Waiting jobs, oldest first."""
        return sorted((p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime)

    def depth(self) -> int:
        return len(self.jobs())

    @staticmethod
    def state(job_dir: Path) -> dict:
        try:
            return json.loads((job_dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {"attempts": 0, "next_attempt": 0.0, "stored": []}

    def deliver_due(self, sender: DicomSender | None, now: float | None = None,
                    on_delivered: Callable[[dict], None] | None = None,
                    on_failed: Callable[[str], None] | None = None) -> int:
        """Try every job whose retry time has come; returns how many were delivered.

        With no `sender` (no destination configured) jobs count as delivered at once:
        the results stay in sent/ and the study JSON.
        """
        delivered = 0
        for job_dir in self.jobs():
            state = self.state(job_dir)
            if (now or time.time()) < state["next_attempt"]:
                continue
            meta = json.loads((job_dir / "job.json").read_text())
            stored = set(state["stored"])
            todo = [job_dir / f for f in meta["files"] if f not in stored]

            def mark(path: Path) -> None:
                stored.add(path.name)

            try:
                if sender is not None and todo:
                    sender.send(todo, mark)
            except Exception as exc:  # noqa: BLE001 - any failure to deliver is retried, never lost
                state["attempts"] += 1
                delay = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2 ** (state["attempts"] - 1))
                state.update(next_attempt=time.time() + delay, stored=sorted(stored), last_error=str(exc))
                atomic_write_text(job_dir / "state.json", json.dumps(state))
                log.warning("job %s: delivery attempt %d failed (%s); retry in %.1f s", job_dir.name,
                            state["attempts"], exc, delay)
                if on_failed:
                    on_failed(type(exc).__name__)
                continue
            state.update(stored=sorted(stored), delivered=time.time(), last_error=None)
            atomic_write_text(job_dir / "state.json", json.dumps(state))
            for f in meta["files"]:  # the objects are in the PACS now; keep the record, free the space
                (job_dir / f).unlink(missing_ok=True)
            os.rename(job_dir, self.sent_dir / job_dir.name)
            fsync_dir(self.dir)
            fsync_dir(self.sent_dir)
            delivered += 1
            log.info("job %s: %d objects stored at the destination", job_dir.name, len(meta["files"]))
            if on_delivered:
                on_delivered(meta)
        return delivered
