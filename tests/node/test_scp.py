"""Intake without a model: the SCP, the spool and the configuration, in-process, on loopback."""

from __future__ import annotations

import subprocess

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from iqe.bench.data import write_dicom_series
from iqe.errors import InputError
from iqe.node.config import AllowEntry, NodeSection, TlsConfig, parse_config
from iqe.node.scp import StoreSCP, is_allowed
from iqe.node.spool import Spool
from tests.node.servers import DCMTK_ENV, ECHOSCU, free_port


@pytest.fixture
def scp(tmp_path):
    spool = Spool(tmp_path / "spool")
    events: dict[str, list] = {"stored": [], "rejected": []}
    cfg = NodeSection(host="127.0.0.1", port=free_port(), spool=str(tmp_path / "spool"),
                      allow=[AllowEntry("STORESCU", "127.0.0.1")])
    server = StoreSCP(cfg, spool, lambda uid, new: events["stored"].append((uid, new)),
                      events["rejected"].append)
    server.start()
    yield server, spool, events
    server.stop()


def _send(port: int, datasets: list[pydicom.Dataset], aet: str = "STORESCU") -> list[int]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="IQE_NODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_duplicates_are_idempotent_and_instances_land_durably(scp, tmp_path):
    server, spool, events = scp
    files = write_dicom_series(tmp_path / "ct", 2, size=32)
    datasets = [pydicom.dcmread(f) for f in files]
    assert _send(server.cfg.port, [datasets[0], datasets[1], datasets[0]]) == [0, 0, 0]
    series = str(datasets[0].SeriesInstanceUID)
    stored = sorted(p.name for p in (spool.series_root / series).glob("*.dcm"))
    assert stored == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets)
    assert [new for _, new in events["stored"]] == [True, True, False]
    back = pydicom.dcmread(spool.series_root / series / f"{datasets[1].SOPInstanceUID}.dcm")
    assert back.PixelData == datasets[1].PixelData
    assert not list((spool.series_root / series).glob(".*.tmp"))  # no temporary file left behind


def test_instance_without_series_uid_gets_failure_status_and_report(scp, tmp_path):
    server, spool, events = scp
    ds = pydicom.dcmread(write_dicom_series(tmp_path / "ct", 1, size=32)[0])
    del ds.SeriesInstanceUID
    assert _send(server.cfg.port, [ds]) == [0xA900]
    (rejection,) = events["rejected"]
    assert rejection.reason == "missing or malformed SeriesInstanceUID"
    assert rejection.study_uid == ds.StudyInstanceUID
    assert spool.instance_count() == 0


def test_allow_list_checks_calling_ae_and_host():
    allow = [AllowEntry("PACS", "10.0.0.5"), AllowEntry("MODALITY")]
    assert is_allowed(allow, "PACS", "10.0.0.5")
    assert not is_allowed(allow, "PACS", "127.0.0.1")  # right AE title, wrong host
    assert is_allowed(allow, "MODALITY  ", "192.168.1.9")  # any host; DICOM pads AE titles with spaces
    assert not is_allowed(allow, "OTHER", "10.0.0.5")
    assert is_allowed([], "ANYONE", "1.2.3.4")


def test_right_ae_title_from_wrong_host_is_rejected(tmp_path):
    cfg = NodeSection(host="127.0.0.1", port=free_port(), allow=[AllowEntry("STORESCU", "10.9.9.9")])
    server = StoreSCP(cfg, Spool(tmp_path / "spool"), lambda *a: None, lambda r: None)
    server.start()
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title="IQE_NODE")
        assert assoc.is_rejected
    finally:
        server.stop()


def test_tls_echo_with_dcmtk(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cfg = NodeSection(host="127.0.0.1", port=free_port(), tls=TlsConfig(str(cert), str(key)),
                      allow=[AllowEntry("ECHOSCU")])
    server = StoreSCP(cfg, Spool(tmp_path / "spool"), lambda *a: None, lambda r: None)
    server.start()
    try:
        tls = subprocess.run([ECHOSCU, "+tla", "+cf", str(cert), "-aet", "ECHOSCU", "-aec", "IQE_NODE",
                              "127.0.0.1", str(cfg.port)], capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
        assert tls.returncode == 0, tls.stderr
        plain = subprocess.run([ECHOSCU, "-to", "5", "-aet", "ECHOSCU", "-aec", "IQE_NODE", "127.0.0.1",
                                str(cfg.port)], capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
        assert plain.returncode != 0  # plain DICOM to a TLS port never associates
    finally:
        server.stop()


def test_quiet_period_and_trigger(tmp_path):
    spool = Spool(tmp_path / "spool", durable=False)
    files = write_dicom_series(tmp_path / "ct", 2, size=16)
    for f in files:
        ds = pydicom.dcmread(f)
        spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, f.read_bytes())
    series = str(ds.SeriesInstanceUID)
    newest = spool._last[series]
    assert spool.pending(10.0, now=newest + 9.9) == []
    assert [s.series_uid for s in spool.pending(10.0, now=newest + 9.9, force={series})] == [series]
    (pending,) = spool.pending(10.0, now=newest + 10.0)
    assert pending.instances == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    spool.mark_scored(pending, "job")
    assert spool.pending(0.0) == []
    other = generate_uid()
    spool.store(ds.StudyInstanceUID, series, other, files[0].read_bytes())  # a late instance: a new set to score
    (late,) = spool.pending(0.0)
    assert other in late.instances and late.digest != pending.digest


def test_config_errors_name_the_key():
    with pytest.raises(InputError, match=r"node.toml \[node\]: unknown key\(s\) quiet_period; known: ae_title"):
        parse_config({"node": {"quiet_period": 3}})
    with pytest.raises(InputError, match=r"unknown table\(s\) modle; known: node, model"):
        parse_config({"modle": {}})
    with pytest.raises(InputError, match=r"node.toml \[node\] port: expected int, got '11112'"):
        parse_config({"node": {"port": "11112"}})
    with pytest.raises(InputError, match=r"uid_root: '1.2.3' is not a UID root"):
        parse_config({"node": {"uid_root": "1.2.3"}})
    cfg = parse_config({"node": {"allow": [{"ae_title": "PACS", "host": "10.0.0.5"}]},
                        "destination": {"ae_title": "ORTHANC", "port": 4242}})
    assert cfg.node.allow == [AllowEntry("PACS", "10.0.0.5")] and cfg.destination.port == 4242


def test_cli_check_and_missing_config(tmp_path, capsys):
    from iqe.cli import main

    assert main(["node", "--config", str(tmp_path / "nope.toml")]) == 2
    assert f"iqe node: error: {tmp_path / 'nope.toml'}: no such configuration file" in capsys.readouterr().err
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nae_title = "TEST_NODE"\nport = 11113\n')
    assert main(["node", "--config", str(cfg), "--check"]) == 0
    assert "ok (AE TEST_NODE on port 11113" in capsys.readouterr().out
