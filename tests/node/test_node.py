"""The DICOM node against real components on loopback: dcmtk storescu/echoscu, Orthanc, the node process.

Independent truth for the scores: `iqe score` on the same files (the SR's numbers must
equal it); for delivery and durability: Orthanc's REST API and the spool on disk.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from iqe.bench.data import write_dicom_series
from iqe.cli import main as iqe_main
from iqe.node.config import DEMO_BUNDLE
from tests.node.servers import (PYTHON_PLUGIN, REPO, NodeProcess, Orthanc, echoscu, free_port, node_config,
                                stop_all, storescu, wait_for)

pytestmark = pytest.mark.slow
SCORE_TOL = 1e-5  # SR stores FLOAT (FloatingPointValue) / DS text of the float32 score; equality up to DS rounding


def mr_series(folder: Path, n: int = 3) -> list[Path]:
    """An MR series from pydicom's MR_small (64 x 64), slices along the normal, fresh UIDs."""
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        ds = src.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-83.9, -91.2, 6.6 + 5 * i]
        arr = np.roll(ds.pixel_array, 3 * i, axis=1)
        ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
        paths.append(folder / f"mr{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def enhanced_ct(folder: Path, n: int = 4) -> list[Path]:
    """One multi-frame Legacy Converted Enhanced CT instance (n frames) made from a synthetic series."""
    import highdicom as hd

    frames = [pydicom.dcmread(p) for p in write_dicom_series(folder / "frames", n, size=64, seed=7)]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(frames, series_instance_uid=generate_uid(), series_number=7,
                                                        sop_instance_uid=generate_uid(), instance_number=1)
    (folder / "enhanced").mkdir()
    path = folder / "enhanced" / "enhanced_ct.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return [path]


Key = tuple[str, int | None]  # (SOP Instance UID, 0-based frame of a multi-frame instance, else None)


def iqe_score(folders: list[Path], out: Path) -> list[tuple[dict[Key, float], float]]:
    """One `iqe score` run over folders (one series each): per folder (score by SOP UID and frame, series score)."""
    assert iqe_main(["score", *map(str, folders), "--model", str(DEMO_BUNDLE), "--backend", "torch",
                     "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summaries = [json.loads(line) for line in (out / "series.jsonl").read_text().splitlines()]
    assert len(summaries) == len(folders)
    expected = []
    for summary in summaries:  # in argument order
        mine = [r for r in rows if r.get("series") == summary["series"]]
        sops = [r["SOPInstanceUID"] for r in mine]
        keys = [(sop, sops[:i].count(sop) if sops.count(sop) > 1 else None) for i, sop in enumerate(sops)]
        expected.append(({k: r["score"] for k, r in zip(keys, mine) if "score" in r}, summary["score"]))
    return expected


def sr_numbers(sr: pydicom.Dataset) -> tuple[dict[Key, float], list[float]]:
    """Read an SR with plain pydicom: per-slice anomaly scores by referenced SOP UID and frame, series scores."""
    slices: dict[Key, float] = {}
    series: list[float] = []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "NUM":
                code = item.ConceptNameCodeSequence[0]
                mv = item.MeasuredValueSequence[0]
                value = float(mv.get("FloatingPointValue", mv.NumericValue))
                if code.CodingSchemeDesignator == "99IQE" and code.CodeValue == "IQE0001":
                    ref = [c for c in item.get("ContentSequence", []) if c.ValueType == "IMAGE"][0].ReferencedSOPSequence[0]
                    frame = int(ref.ReferencedFrameNumber) - 1 if "ReferencedFrameNumber" in ref else None
                    slices[(ref.ReferencedSOPInstanceUID, frame)] = value
                elif code.CodingSchemeDesignator == "99IQE" and code.CodeValue == "IQE0002":
                    series.append(value)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return slices, series


def results_by_kind(objects: list[pydicom.Dataset]) -> dict[str, list[pydicom.Dataset]]:
    names = {"1.2.840.10008.5.1.4.1.1.88.34": "sr", "1.2.840.10008.5.1.4.1.1.30": "pm",
             "1.2.840.10008.5.1.4.1.1.7": "sc"}
    out: dict[str, list[pydicom.Dataset]] = {"sr": [], "pm": [], "sc": []}
    for ds in objects:
        if ds.SOPClassUID in names:
            out[names[ds.SOPClassUID]].append(ds)
    return out


def wait_results(orthanc: Orthanc, study_uid: str, sc_count: int, timeout: float = 40.0):
    def ready():
        got = results_by_kind(orthanc.study_objects(study_uid))
        return got if len(got["sr"]) >= 1 and len(got["pm"]) >= 1 and len(got["sc"]) >= sc_count else None
    return wait_for(ready, timeout, f"SR, PM and {sc_count} SC in study {study_uid}", interval=0.3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One node process, its destination Orthanc (started by the first test that needs it) and an
    Orthanc running the plugin; started together and stopped together, so their start-up and
    shutdown times overlap."""
    import site

    root = tmp_path_factory.mktemp("node")
    node_port, http_port = free_port(), free_port()
    # The destination doubles as the PACS of the Lua routing alternative: it sends stable series to the node.
    dest = Orthanc(root / "dest", modalities={"iqe-node": ["IQE_NODE", "127.0.0.1", node_port]},
                   extra={"LuaScripts": [str(REPO / "deploy" / "orthanc" / "route_to_iqe_node.lua")]})
    config = node_config(root / "node", node_port, http_port, dest,
                         allow=[("STORESCU", "127.0.0.1"), ("ORTHANC", "127.0.0.1")])
    plugin_config = node_config(root / "plugin", free_port(), 0, None)
    # A series that became stable before the plugin ran: the plugin must find it in Orthanc's change log.
    before = write_dicom_series(root / "before-plugin", 3, size=64, seed=8)
    plain = Orthanc(root / "plugin-orthanc", aet="PLUGIN").start()
    try:
        assert storescu(plain.dicom_port, before, called="PLUGIN").returncode == 0
        wait_stable(plain, str(pydicom.dcmread(before[0]).StudyInstanceUID))
    finally:
        plain.stop()
    plugin = Orthanc(root / "plugin-orthanc", aet="PLUGIN", extra={
        "Plugins": [PYTHON_PLUGIN], "PythonScript": str(REPO / "deploy" / "orthanc" / "iqe_plugin.py"),
        "IQE": {"SysPath": [*site.getsitepackages(), str(REPO)], "Config": str(plugin_config)}})
    node = NodeProcess(config, http_port).launch()
    plugin.launch()
    state = {"root": root, "dest": dest, "node": node, "port": node_port, "config": config, "plugin": plugin,
             "before_plugin": before}
    try:
        node.wait_ready()
        plugin.wait_ready()
        yield state
    finally:
        stop_all(state["node"], dest, plugin)


def wait_stable(orthanc: Orthanc, study_uid: str) -> None:
    """Until Orthanc calls every series of the study stable (its plugins and Lua have been told)."""
    (study,) = [h["ID"] for h in orthanc.post("/tools/lookup", study_uid.encode()) if h["Type"] == "Study"]
    wait_for(lambda: all(orthanc.get(f"/series/{s}")["IsStable"] for s in orthanc.get(f"/studies/{study}")["Series"]),
             30, f"stable series in study {study_uid}", interval=0.2)


def dest_up(env) -> Orthanc:
    if env["dest"].proc is None:
        env["dest"].start()
    return env["dest"]


def test_ct_and_mr_scored_delivered_after_destination_comes_back(env, tmp_path):
    ct = write_dicom_series(tmp_path / "ct", 5, size=64, seed=1)
    mr = mr_series(tmp_path / "mr", 3)
    enhanced = enhanced_ct(tmp_path / "enh", 4)
    sent = storescu(env["port"], ct + mr + enhanced, extra=("-R",))
    assert sent.returncode == 0, sent.stderr
    node = env["node"]
    # The destination is down: the results wait in the outbox and the node retries.
    wait_for(lambda: node.metric("iqe_node_failures_total") >= 2, 40, "failed delivery attempts")
    assert node.http("/healthz")["outbox_jobs"] >= 1
    dest = dest_up(env)
    expected = iqe_score([ct[0].parent, mr[0].parent, enhanced[0].parent], tmp_path / "score")
    for (files, frames), (expected_slices, expected_series) in zip(((ct, len(ct)), (mr, len(mr)), (enhanced, 4)),
                                                                   expected):
        study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        got = wait_results(dest, study, sc_count=frames)
        assert [len(got[k]) for k in ("sr", "pm", "sc")] == [1, 1, frames]
        slices, series = sr_numbers(got["sr"][0])
        assert set(slices) == set(expected_slices) and len(slices) == frames
        worst = max(abs(slices[k] - expected_slices[k]) for k in slices)
        assert worst <= SCORE_TOL, f"slice scores differ from `iqe score` by up to {worst:.2e}"
        assert series == [pytest.approx(expected_series, abs=SCORE_TOL)]
        for ds in got["sr"] + got["pm"] + got["sc"]:
            assert ds.StudyInstanceUID == study and ds.SeriesInstanceUID != pydicom.dcmread(files[0]).SeriesInstanceUID
        assert int(got["pm"][0].NumberOfFrames) == frames
        assert got["sc"][0].BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSTIC USE" in got["sc"][0].ImageComments
        report = json.loads((env["config"].parent / "spool" / "results" / f"{study}.json").read_text())
        (entry,) = report["series"].values()
        assert entry["score"] == pytest.approx(expected_series, abs=1e-6)
        assert entry["model"]["backend"] == "torch" and len(entry["model"]["bundle_sha256"]) == 20
    assert node.metric("iqe_node_results_sent_total") >= 3 * 2 + len(ct) + len(mr) + 4


def test_corrupt_and_non_image_objects_reported_others_unaffected(env, tmp_path):
    good = write_dicom_series(tmp_path / "good", 3, size=64, seed=2)
    broken = write_dicom_series(tmp_path / "broken", 3, size=64, seed=3)
    ds = pydicom.dcmread(broken[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # well-formed DICOM, pixel data too short for the matrix
    ds.save_as(broken[1], enforce_file_format=True)
    sr = tmp_path / "report.dcm"
    shutil.copy(get_testdata_file("test-SR.dcm"), sr)
    sent = storescu(env["port"], [*broken, sr], extra=("-R", "-v"))
    # The SR gets a failure status (0x0122); storescu stops there, the association ends normally.
    assert sent.returncode != 0
    assert "Received Store Response (Refused: SOPClassNotSupported)" in sent.stderr, sent.stderr
    assert storescu(env["port"], good).returncode == 0
    dest = dest_up(env)
    got = wait_results(dest, str(pydicom.dcmread(good[0]).StudyInstanceUID), sc_count=3)
    assert len(sr_numbers(got["sr"][0])[0]) == 3
    broken_study = str(pydicom.dcmread(broken[0]).StudyInstanceUID)
    got = wait_results(dest, broken_study, sc_count=2)
    slices, _ = sr_numbers(got["sr"][0])
    assert set(slices) == {(str(pydicom.dcmread(p).SOPInstanceUID), None) for p in (broken[0], broken[2])}
    report = json.loads((env["config"].parent / "spool" / "results" / f"{broken_study}.json").read_text())
    (entry,) = report["series"].values()
    assert any("file truncated?" in e for e in entry["errors"]), entry["errors"]  # the runtime names the short pixel data
    sr_study = str(pydicom.dcmread(sr).StudyInstanceUID)
    rejected = json.loads((env["config"].parent / "spool" / "results" / f"{sr_study}.json").read_text())["rejected"]
    assert rejected[0]["status"] == "0x0122" and "not an image the model scores" in rejected[0]["reason"]
    assert env["node"].http("/healthz")["status"] == "ok"


def test_calling_ae_not_on_allow_list_is_rejected(env):
    assert echoscu(env["port"], "STORESCU").returncode == 0
    refused = echoscu(env["port"], "INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr + refused.stdout, refused.stderr
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout


def test_node_killed_mid_series_loses_nothing_and_results_once(env, tmp_path):
    files = write_dicom_series(tmp_path / "killed", 6, size=64, seed=4)
    node = env["node"]
    assert storescu(env["port"], files[:3]).returncode == 0
    node.kill()  # SIGKILL before the quiet period ends: three instances are only in the spool
    node.start()
    assert storescu(env["port"], files[2:]).returncode == 0  # one duplicate included: idempotent
    dest = dest_up(env)
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    got = wait_results(dest, study, sc_count=6)
    time.sleep(1.5)  # a second, duplicate result set would arrive within this time
    got = results_by_kind(dest.study_objects(study))
    assert [len(got[k]) for k in ("sr", "pm", "sc")] == [1, 1, 6]
    assert set(sr_numbers(got["sr"][0])[0]) == {(str(pydicom.dcmread(f).SOPInstanceUID), None) for f in files}
    series_dir = env["config"].parent / "spool" / "series" / str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert len(list(series_dir.glob("*.dcm"))) == 6
    # Series completed before the restart were not produced again.
    sent_jobs = list((env["config"].parent / "spool" / "sent").iterdir())
    assert len({p.name.rsplit("-", 1)[0] for p in sent_jobs}) == len(sent_jobs)


def test_orthanc_lua_routing_sends_stable_series_to_the_node(env, tmp_path):
    """deploy/orthanc/route_to_iqe_node.lua: a series stored into Orthanc is routed, scored, and comes back."""
    dest = dest_up(env)
    files = write_dicom_series(tmp_path / "routed", 3, size=64, seed=6)
    assert storescu(dest.dicom_port, files, called="ORTHANC").returncode == 0
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    got = wait_results(dest, study, sc_count=3)
    wait_stable(dest, study)
    time.sleep(1.0)  # the script has seen our result series become stable: none may have reached the node
    spooled = {p.name for p in (env["config"].parent / "spool" / "series").iterdir()}
    assert not spooled & {str(ds.SeriesInstanceUID) for kind in got.values() for ds in kind}
    got = results_by_kind(dest.study_objects(study))
    assert [len(got[k]) for k in ("sr", "pm", "sc")] == [1, 1, 3]
    assert set(sr_numbers(got["sr"][0])[0]) == {(str(pydicom.dcmread(f).SOPInstanceUID), None) for f in files}


def test_load_concurrent_associations(env, tmp_path):
    """Four storescu processes at once; reports instances/s into the spool (loopback)."""
    series = [write_dicom_series(tmp_path / f"load{i}", 8, size=64, seed=10 + i) for i in range(4)]
    results: list = [None] * len(series)

    def send(i: int) -> None:
        results[i] = storescu(env["port"], series[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(series))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    spool = env["config"].parent / "spool" / "series"
    for files in series:
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert len(list((spool / uid).glob("*.dcm"))) == len(files)
    n = sum(len(s) for s in series)
    print(f"\nload: {n} instances over {len(series)} concurrent associations in {elapsed:.2f} s "
          f"= {n / elapsed:.0f} instances/s (64x64 CT, durable spool, loopback)")


def test_orthanc_plugin_scores_stable_series_in_place(env, tmp_path):
    """Orthanc with the Python plugin: a series stored into it gets its SR, PM and SC in the same Orthanc."""
    orthanc = env["plugin"]
    files = write_dicom_series(tmp_path / "ct", 4, size=64, seed=5)
    sent = storescu(orthanc.dicom_port, files, called="PLUGIN")
    assert sent.returncode == 0, sent.stderr
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    got = wait_results(orthanc, study, sc_count=4, timeout=60)
    ((expected_slices, expected_series),) = iqe_score([files[0].parent], tmp_path / "score")
    slices, series = sr_numbers(got["sr"][0])
    assert set(slices) == set(expected_slices)
    assert max(abs(slices[k] - expected_slices[k]) for k in expected_slices) <= SCORE_TOL
    assert series == [pytest.approx(expected_series, abs=SCORE_TOL)]
    wait_stable(orthanc, study)
    time.sleep(1.0)  # the plugin has seen our result series become stable: it must not have scored them
    got = results_by_kind(orthanc.study_objects(study))
    assert [len(got[k]) for k in ("sr", "pm", "sc")] == [1, 1, 4]
    # Stored and stable before Orthanc was restarted with the plugin: replayed from the change log.
    before = env["before_plugin"]
    got = wait_results(orthanc, str(pydicom.dcmread(before[0]).StudyInstanceUID), sc_count=3)
    assert set(sr_numbers(got["sr"][0])[0]) == {(str(pydicom.dcmread(f).SOPInstanceUID), None) for f in before}
