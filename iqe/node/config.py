"""`node.toml` -> NodeConfig: every setting of the DICOM node, with its default.

    [node]         ae_title, host, port, spool, quiet_period_s, uid_root, http_host, http_port
    [[node.allow]] ae_title, host             calling AE titles (and hosts) that may connect
    [node.tls]     cert, key, ca              optional TLS for the SCP (ca: require client certs)
    [model]        bundle, backend, precision, batch, engine
    [destination]  ae_title, host, port, calling_ae_title, tls_ca   where results are sent (C-STORE)
    [outbox]       retry_initial_s, retry_max_s, timeout_s
    [results]      parametric_map, overlays ("all" | "max" | "none"), series_number

Only what differs from the defaults needs to be written. Unknown keys are an error
naming the key and the known ones, so a typo never silently keeps a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iqe.errors import InputError

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "data" / "demo_bundle"
# A UID root for results when the site has none of its own (pydicom's documented prefix for
# UIDs generated without a registered root). Sites set their own root in [node] uid_root.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass
class AllowEntry:
    """One calling peer allowed to connect."""

    ae_title: str  # calling AE title, exact (trailing spaces ignored)
    host: str = "*"  # peer IP address, or "*" for any host


@dataclass
class TlsConfig:
    """TLS for the SCP; all paths PEM."""

    cert: str  # server certificate chain
    key: str  # server private key
    ca: str | None = None  # CA bundle: when set, clients must present a certificate it signed


@dataclass
class NodeSection:
    ae_title: str = "IQE_NODE"  # our AE title (called AE)
    host: str = "0.0.0.0"  # interface the SCP listens on
    port: int = 11112  # DICOM port
    spool: str = "/var/lib/iqe-node"  # durable spool: instances, outbox, results JSON
    quiet_period_s: float = 10.0  # a series is complete when no instance arrived for this long
    uid_root: str = DEFAULT_UID_ROOT  # root of every UID the node creates (ends with ".")
    http_host: str = "127.0.0.1"  # /healthz, /metrics, POST /series/<uid>/complete
    http_port: int = 9102  # 0 disables the HTTP endpoint
    allow: list[AllowEntry] = field(default_factory=list)  # empty: any calling AE (logged as a warning)
    tls: TlsConfig | None = None  # None: plain TCP


@dataclass
class ModelSection:
    bundle: str = str(DEMO_BUNDLE)  # bundle directory (the embedded demo bundle by default)
    backend: str = "torch"  # torch | onnxruntime | tensorrt
    precision: str = "fp32"  # fp32 | fp16
    batch: int = 8  # slices per inference call
    engine: str | None = None  # engine directory; default: built on demand in IQE_CACHE


@dataclass
class DestinationSection:
    ae_title: str = "ORTHANC"  # called AE title of the PACS receiving results
    host: str = "127.0.0.1"
    port: int = 4242
    calling_ae_title: str | None = None  # default: [node] ae_title
    tls_ca: str | None = None  # CA bundle: connect with TLS and verify the destination


@dataclass
class OutboxSection:
    retry_initial_s: float = 1.0  # first retry delay; doubles per failed attempt
    retry_max_s: float = 300.0  # cap on the retry delay
    timeout_s: float = 30.0  # association / DIMSE timeout towards the destination


@dataclass
class ResultsSection:
    parametric_map: bool = True  # send a Parametric Map of the anomaly map
    overlays: str = "all"  # Secondary Capture overlays: every slice, the highest-scoring one, or none
    series_number: int = 9900  # first series number of result series (SR, +1 PM, +2 SC)


@dataclass
class NodeConfig:
    """The whole node configuration (see the module docstring for the TOML layout)."""

    node: NodeSection = field(default_factory=NodeSection)
    model: ModelSection = field(default_factory=ModelSection)
    destination: DestinationSection | None = None  # None: results stay in the spool (JSON + DICOM files)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    results: ResultsSection = field(default_factory=ResultsSection)

    @property
    def spool(self) -> Path:
        return Path(self.node.spool)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    for name, value in data.items():  # a value of the default's type (ints count as floats)
        default = fields[name].default
        if isinstance(default, (bool, int, float, str)) and not (
                isinstance(value, type(default)) or (type(default) is float and type(value) is int)):
            raise InputError(f"{where} {name}: expected {type(default).__name__}, got {value!r}")
    kwargs: dict[str, Any] = dict(data)
    if cls is NodeSection and "allow" in data:  # the two nested tables of [node]
        if not isinstance(data["allow"], list):
            raise InputError(f"{where}.allow: expected an array of tables ([[node.allow]])")
        kwargs["allow"] = [_build(AllowEntry, v, f"{where}.allow[{i}]") for i, v in enumerate(data["allow"])]
    if cls is NodeSection and "tls" in data:
        kwargs["tls"] = _build(TlsConfig, data["tls"], f"{where}.tls")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise InputError(f"{where}: {exc}") from None


def parse_config(data: dict[str, Any], where: str = "node.toml") -> NodeConfig:
    """Validate a parsed TOML document into a NodeConfig.

    Raises:
        InputError: unknown table or key, missing required key, or a value out of range.
    """
    sections = {"node": NodeSection, "model": ModelSection, "destination": DestinationSection,
                "outbox": OutboxSection, "results": ResultsSection}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise InputError(f"{where}: unknown table(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    cfg = NodeConfig(**{name: _build(cls, data[name], f"{where} [{name}]")
                        for name, cls in sections.items() if name in data})
    _check(cfg, where)
    return cfg


def _check(cfg: NodeConfig, where: str) -> None:
    if cfg.model.backend not in ("torch", "onnxruntime", "tensorrt"):
        raise InputError(f"{where} [model] backend: '{cfg.model.backend}' unknown; known: torch, onnxruntime, tensorrt")
    if cfg.model.precision not in ("fp32", "fp16"):
        raise InputError(f"{where} [model] precision: '{cfg.model.precision}' unknown; known: fp32, fp16")
    if cfg.model.batch < 1:
        raise InputError(f"{where} [model] batch: must be >= 1, got {cfg.model.batch}")
    if cfg.results.overlays not in ("all", "max", "none"):
        raise InputError(f"{where} [results] overlays: '{cfg.results.overlays}' unknown; known: all, max, none")
    root = cfg.node.uid_root
    if not root.endswith(".") or not all(p.isdigit() for p in root[:-1].split(".")) or len(root) > 40:
        raise InputError(f"{where} [node] uid_root: '{root}' is not a UID root like 1.2.826.0.1.3680043.8.498. "
                         f"(digits and dots, ending with '.', at most 40 characters)")
    if cfg.node.quiet_period_s < 0:
        raise InputError(f"{where} [node] quiet_period_s: must be >= 0, got {cfg.node.quiet_period_s}")
    for label, ae in [("[node] ae_title", cfg.node.ae_title)] + (
            [("[destination] ae_title", cfg.destination.ae_title)] if cfg.destination else []):
        if not ae or len(ae) > 16:
            raise InputError(f"{where} {label}: '{ae}' must be 1-16 characters")


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate `node.toml`.

    Raises:
        InputError: the file is missing, not TOML, or not a valid configuration.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(data, str(path))
