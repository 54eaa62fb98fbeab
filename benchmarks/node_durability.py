"""Kill/restart durability: series sent to the node while the node or the destination is SIGKILLed
at random moments; afterwards every instance must be in the spool and every series must have
exactly one result set in the destination.

    python benchmarks/node_durability.py [--rounds 20] [--seed 0]

Each round sends one series (3-8 CT slices, 128x128) with dcmtk `storescu` in the background
and kills, at a random moment within the next 0-4 s, either the node (then restarts it) or
the destination Orthanc (then restarts it on the same ports, after its PID has exited). A
send that did not complete is repeated, as a real sender would (duplicates are answered
with success and not stored twice). Prints per-round events and the final counts.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from iqe.bench.data import write_dicom_series  # noqa: E402
from tests.node.servers import (DCMTK_ENV, STORESCU, NodeProcess, Orthanc, free_port, node_config,  # noqa: E402
                                stop_all, storescu, wait_for)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="iqe-node-durability-") as tmp:
        root = Path(tmp)
        node_port, http_port = free_port(), free_port()
        dest = Orthanc(root / "dest", modalities={"iqe": ["IQE_NODE", "127.0.0.1", node_port]}).start()
        node = NodeProcess(node_config(root / "node", node_port, http_port, dest), http_port).start()
        sent: dict[str, list[str]] = {}  # series UID -> SOP Instance UIDs
        studies: dict[str, str] = {}
        t0 = time.time()
        try:
            for r in range(args.rounds):
                files = write_dicom_series(root / f"s{r}", rng.randint(3, 8), size=128, seed=r)
                first = pydicom.dcmread(files[0])
                sent[str(first.SeriesInstanceUID)] = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
                studies[str(first.SeriesInstanceUID)] = str(first.StudyInstanceUID)
                proc = subprocess.Popen([STORESCU, "-aet", "STORESCU", "-aec", "IQE_NODE", "127.0.0.1",
                                         str(node_port), *map(str, files)], env=DCMTK_ENV,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                delay, victim = rng.uniform(0, 4), rng.choice(["node", "destination"])
                time.sleep(delay)
                if victim == "node":
                    node.kill()
                    node.start()
                else:
                    dest.kill()
                    dest.start()
                complete = proc.wait() == 0
                if not complete:
                    assert storescu(node_port, files).returncode == 0, f"round {r}: resend failed"
                print(f"round {r:2d}: {len(files)} slices, killed the {victim} after {delay:.1f} s, "
                      f"send {'completed' if complete else 'cut off and repeated'}", flush=True)

            def delivered() -> bool:
                return all(sum(1 for ds in dest.study_objects(studies[s]) if ds.SOPClassUID == SR_CLASS) >= 1
                           for s in sent)

            wait_for(delivered, 300, "one SR per series in the destination", interval=1.0)
            time.sleep(3)  # any duplicate result set would be sent within this time
            lost = duplicated = 0
            for series, sops in sent.items():
                spooled = {p.stem for p in (root / "node" / "spool" / "series" / series).glob("*.dcm")}
                lost += len(set(sops) - spooled)
                srs = [ds for ds in dest.study_objects(studies[series]) if ds.SOPClassUID == SR_CLASS]
                duplicated += len(srs) - 1
            print(f"{args.rounds} rounds in {time.time() - t0:.0f} s: {sum(map(len, sent.values()))} instances sent, "
                  f"{lost} lost; {len(sent)} series, {duplicated} duplicate result sets")
            return 0 if lost == 0 and duplicated == 0 else 1
        finally:
            stop_all(node, dest)


if __name__ == "__main__":
    sys.exit(main())
