"""The receiving end: a pynetdicom SCP answering C-ECHO and C-STORE into the durable spool.

Accepted: Verification, the image storage SOP classes the runtime scores (`SCORABLE`,
every transfer syntax pydicom can decode with the optional codecs), and every other
storage SOP class only to answer it with a clear failure status (0x0122, "SOP class not
supported") and a report, so a PACS routing everything to the node sees why. Calling
peers are checked against the allow-list (AE title and host) before negotiation; a
peer not on it gets an A-ASSOCIATE-RJ ("calling AE title not recognized").
"""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import sop_class as sc
from pynetdicom.transport import ThreadedAssociationServer

from iqe.node.config import AllowEntry, NodeSection
from iqe.node.outbox import set_nodelay
from iqe.node.spool import Spool, valid_uid

log = logging.getLogger("iqe.node")

# Image storage SOP classes the runtime scores: CT, MR, CR, DX, MG, SC, US, XA, XRF, NM, PT
# and their enhanced / multi-frame / legacy-converted forms.
SCORABLE: frozenset[str] = frozenset(str(getattr(sc, name)) for name in (
    "CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage",
    "MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage", "LegacyConvertedEnhancedMRImageStorage",
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation", "DigitalMammographyXRayImageStorageForProcessing",
    "BreastTomosynthesisImageStorage",
    "SecondaryCaptureImageStorage", "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage", "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage", "EnhancedUSVolumeStorage",
    "XRayAngiographicImageStorage", "EnhancedXAImageStorage",
    "XRayRadiofluoroscopicImageStorage", "EnhancedXRFImageStorage",
    "NuclearMedicineImageStorage",
    "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage", "LegacyConvertedEnhancedPETImageStorage",
))

MAX_PDU = 4 * 1024 * 1024  # bytes; what we tell senders they may send in one P-DATA PDU

# C-STORE statuses (PS3.4 B.2.3 / pynetdicom).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


@dataclass
class Rejection:
    """An instance refused at intake, for the study report."""

    study_uid: str | None
    sop_uid: str | None
    sop_class: str
    calling_ae: str
    status: int
    reason: str


class NodelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on every accepted socket (before TLS wraps it)."""

    def get_request(self):  # type: ignore[override]
        client, address = self.socket.accept()
        set_nodelay(client)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


def is_allowed(allow: list[AllowEntry], calling_ae: str, host: str) -> bool:
    """Whether a calling peer is on the allow-list (an empty list allows everyone)."""
    calling_ae = calling_ae.strip()
    return not allow or any(a.ae_title.strip() == calling_ae and a.host in ("*", host) for a in allow)


def tls_context(cfg: NodeSection) -> ssl.SSLContext | None:
    """Server-side TLS context from [node.tls]; client certificates required when `ca` is set."""
    if cfg.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    if cfg.tls.ca:
        context.load_verify_locations(cfg.tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class StoreSCP:
    """C-ECHO / C-STORE SCP writing into `spool`.

    Args:
        cfg: [node] section (AE title, address, allow-list, TLS).
        spool: where instances go (durably, before the status is sent).
        on_stored: called with (series UID, new?) after each stored instance.
        on_rejected: called with a `Rejection` for each refused instance or association.
    """

    def __init__(self, cfg: NodeSection, spool: Spool, on_stored: Callable[[str, bool], None],
                 on_rejected: Callable[[Rejection], None]) -> None:
        self.cfg, self.spool, self.on_stored, self.on_rejected = cfg, spool, on_stored, on_rejected
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.maximum_associations = 32
        # Large PDUs: a 512x512 CT instance in 1-2 PDUs instead of 32 of the 16 KiB default; each PDU
        # costs Python-level parsing, so this alone decides much of the intake rate.
        self.ae.maximum_pdu_size = MAX_PDU
        self.ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
        for cx in AllStoragePresentationContexts:
            uid = str(cx.abstract_syntax)
            self.ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES if uid in SCORABLE else cx.transfer_syntax)
        self.server: ThreadedAssociationServer | None = None
        if not cfg.allow:
            log.warning("[node] allow is empty: any calling AE title may store to %s", cfg.ae_title)

    def start(self) -> tuple[str, int]:
        """Listen (non-blocking); returns the bound address."""
        import threading

        handlers: list = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                          (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        server = self.ae.make_server((self.cfg.host, self.cfg.port), ssl_context=tls_context(self.cfg),
                                     evt_handlers=handlers, server_class=NodelayServer)
        self.ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
        threading.Thread(target=server.serve_forever, name="iqe-scp", daemon=True).start()
        self.server = server
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        host = assoc.requestor.address
        if not is_allowed(self.cfg.allow, calling, host):
            log.warning("association from %s@%s rejected: calling AE title/host not on the allow-list", calling, host)
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE not recognized
            assoc.is_rejected = True
            assoc.kill()  # as pynetdicom does after its own rejections: lets the DUL send the PDU and stop
            self.on_rejected(Rejection(None, None, "", calling, -1, f"association from {calling}@{host} "
                                                                    f"rejected (not on the allow-list)"))

    def _on_store(self, event) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.context.abstract_syntax)
        try:
            raw = event.encoded_dataset(include_meta=True)
            header = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
            study, series, sop = (str(header.get(k, "") or "") for k in
                                  ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        except Exception as exc:  # noqa: BLE001 - any undecodable data set is the sender's problem, not ours
            return self._reject(None, None, sop_class, calling, CANNOT_UNDERSTAND,
                                f"cannot parse the data set ({type(exc).__name__}: {exc})")
        if sop_class not in SCORABLE:
            name = pydicom.uid.UID(sop_class).name
            return self._reject(study or None, sop or None, sop_class, calling, SOP_CLASS_NOT_SUPPORTED,
                                f"not an image the model scores (SOP Class {name})")
        bad = [k for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop))
               if not valid_uid(v)]
        if bad:
            return self._reject(study if valid_uid(study) else None, sop or None, sop_class, calling,
                                DATASET_DOES_NOT_MATCH, f"missing or malformed {', '.join(bad)}")
        modality = str(header.get("Modality", "") or "")
        try:
            new = self.spool.store(study, series, sop, raw, {"modality": modality, "calling_ae": calling,
                                                             "sop_class": sop_class})
        except OSError as exc:  # disk full, permissions: the sender keeps the instance and may retry
            log.error("instance %s (series %s): spool write failed: %s", sop, series, exc)
            return self._reject(study, sop, sop_class, calling, OUT_OF_RESOURCES, f"spool write failed ({exc})")
        log.debug("stored %s (series %s) from %s%s", sop, series, calling, "" if new else " (duplicate)")
        self.on_stored(series, new)
        return SUCCESS

    def _reject(self, study: str | None, sop: str | None, sop_class: str, calling: str, status: int,
                reason: str) -> int:
        log.warning("instance %s from %s refused (0x%04X): %s", sop or "?", calling, status, reason)
        self.on_rejected(Rejection(study, sop, sop_class, calling, status, reason))
        return status
