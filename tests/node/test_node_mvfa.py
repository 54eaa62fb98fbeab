"""The DICOM node serving an MVFA bundle (zero-shot + few-shot bank), on loopback.

storescu -> node process -> destination Orthanc, as in test_node.py. Independent truth:
`iqe score --save-maps` on the same files with the same bundle; the series is written at
the model's image size, so the Parametric Map's frames are the map itself (no resize).
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from iqe.bench.data import write_dicom_series
from iqe.cli import main as iqe_main
from tests.model.test_mvfa_export import small_mvfa
from tests.node.servers import NodeProcess, Orthanc, free_port, node_config, stop_all, storescu
from tests.node.test_node import sr_numbers, wait_results

pytestmark = pytest.mark.slow
SLICES = 3


def test_node_serves_mvfa_sr_pm_overlays_from_its_outputs(tmp_path):
    from iqe.model.bundle import save_bundle

    bundle = save_bundle(small_mvfa(), tmp_path / "mvfa")  # 112 px, bank: map = fused zero/few-shot map
    series = write_dicom_series(tmp_path / "ct", SLICES, size=112, seed=4)
    dest = Orthanc(tmp_path / "dest")
    port, http_port = free_port(), free_port()
    config = node_config(tmp_path / "node", port, http_port, dest)
    config.write_text(config.read_text().replace("[model]\n", f'[model]\nbundle = "{bundle}"\n'))
    node = NodeProcess(config, http_port)
    node.launch()
    dest.launch()
    try:
        node.wait_ready()
        dest.wait_ready()
        sent = storescu(port, series)
        assert sent.returncode == 0, sent.stderr
        assert iqe_main(["score", str(series[0].parent), "--model", str(bundle), "--backend", "torch", "--save-maps",
                         "--out", str(tmp_path / "score"), "--quiet"]) == 0
        study = str(pydicom.dcmread(series[0]).StudyInstanceUID)
        got = wait_results(dest, study, sc_count=SLICES, timeout=60)
    finally:
        stop_all(node, dest)
    rows = {r["SOPInstanceUID"]: r for r in map(json.loads, (tmp_path / "score" / "results.jsonl").read_text().splitlines())}
    assert [len(got[k]) for k in ("sr", "pm", "sc")] == [1, 1, SLICES]
    slices, series_scores = sr_numbers(got["sr"][0])
    assert {sop: slices[(sop, None)] for sop, _ in slices} == pytest.approx({s: r["score"] for s, r in rows.items()},
                                                                           abs=1e-5)
    assert series_scores == [pytest.approx(max(r["score"] for r in rows.values()), abs=1e-5)]
    # The Parametric Map holds MVFA's map (the fused one), frame by frame in the PM's source order.
    pm = got["pm"][0]
    frames = pm.pixel_array.reshape(SLICES, 112, 112)
    maps = {sop: np.load(tmp_path / "score" / r["maps"])["map"] for sop, r in rows.items()}
    refs = [fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for fg in pm.PerFrameFunctionalGroupsSequence]
    assert sorted(refs) == sorted(maps)
    for frame, sop in zip(frames, refs):
        np.testing.assert_allclose(frame, maps[sop], atol=1e-5)
        branches = np.load(tmp_path / "score" / rows[sop]["maps"])  # identity fusion constants: the bank is used
        np.testing.assert_allclose(maps[sop], 0.5 * branches["map_zero"] + 0.5 * branches["map_few"], atol=1e-5)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTExplanation == "MVFA anomaly map (zero-shot, or zero+few-shot fusion)"
    assert pm.ManufacturerModelName == "MVFA small"
    report = json.loads((config.parent / "spool" / "results" / f"{study}.json").read_text())
    (entry,) = report["series"].values()
    assert entry["model"]["family"] == "mvfa"
    by_sop = {s["sop_instance_uid"]: s for s in entry["slices"]}
    for sop, r in rows.items():  # the raw branch scores travel in the JSON result
        assert by_sop[sop]["score_zero"] == pytest.approx(r["score_zero"], abs=1e-5)
        assert by_sop[sop]["score_few"] == pytest.approx(r["score_few"], abs=1e-5)
    assert all(sc.BurnedInAnnotation == "YES" for sc in got["sc"])
