"""PACS-side inference node: DICOM in (C-STORE), DICOM results back (SR, Parametric Map, SC overlays).

    config.py           node.toml -> NodeConfig
    scp.py              C-ECHO / C-STORE SCP, allow-list, TLS, TCP_NODELAY
    spool.py            durable spool, series grouping (quiet period / trigger)
    runtime_adapter.py  the one door into the runtime and engine (scoring, runner, model identity)
    dicom_results.py    SR (TID 1500), Parametric Map, Secondary Capture overlays, JSON (highdicom)
    pipeline.py         one complete series -> results (shared with the Orthanc plugin)
    outbox.py           persistent outbox, C-STORE SCU with retry + exponential backoff
    service.py          the wiring, /healthz and /metrics

Deployment: docs/node.md; Orthanc plugin and routing in deploy/orthanc/.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_node(args: argparse.Namespace) -> int:
    """Run the DICOM inference node: receive series, score them, send SR / Parametric Map / SC results back."""
    import logging

    from iqe.errors import InputError
    from iqe.node.config import load_config

    try:
        from iqe.node.service import run_node
    except ImportError as exc:
        raise InputError(f"`iqe node` needs the node extra: pip install 'iqe-engine[node]' ({exc})") from None

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # both log every association, DIMSE message and copied module at INFO
        for noisy in ("pynetdicom", "highdicom"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.check:
        cfg = load_config(args.config)
        print(f"{args.config}: ok (AE {cfg.node.ae_title} on port {cfg.node.port}, spool {cfg.node.spool})")
        return 0
    return run_node(args.config)


def register(add) -> None:
    """Add `iqe node` to the CLI."""
    p = add("node", cmd_node)
    p.add_argument("--config", type=Path, required=True, help="node.toml (see docs/node.md)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--verbose", action="store_true", help="debug logging (one line per instance)")
