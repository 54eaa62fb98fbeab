"""calibration.json round trip through a bundle folder, entry selection and annotate()."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iqe.calibration import CALIBRATION_NAME, annotate, load_calibration, select_entry
from iqe.calibration.fit import fit_entry, save_entry
from iqe.errors import InputError


def _entry(target: str, shift: float = 2.0, rule: str = "sensitivity", requested: float | None = 0.9, seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(0, 1, 40), rng.normal(shift, 1, 40)]
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    if rule == "fpr":
        scores, labels = scores[:40], labels[:40]
    entry = fit_entry(scores, labels, target=target, score_key="map_max", rule=rule, requested=requested,
                      resamples=200, data={"source": "unit test"})
    return entry, scores, labels


def test_round_trip_and_decisions(tmp_path):
    entry, scores, labels = _entry("Brain")
    path = save_entry(tmp_path, entry, content_key="abc")
    assert path == tmp_path / CALIBRATION_NAME
    cal = load_calibration(tmp_path)
    assert cal["format"] == "iqe-calibration/1" and cal["bundle"] == {"content_key": "abc"}
    stored = cal["entries"]["Brain"]
    assert stored == json.loads(json.dumps(entry))  # everything survives JSON
    assert stored["data"] == {"source": "unit test", "normal": 40, "abnormal": 40}
    assert stored["mode"] == "labelled" and stored["created"].endswith("Z")
    # sensitivity 0.9 on 40 abnormals: at most 4 below the threshold, by the sample's own count
    assert np.sum(scores[labels == 1] >= stored["threshold"]) >= 36
    for s in scores:
        row = annotate({"path": "x.png", "score": 0.0, "map_max": float(s)}, cal)
        assert row["decision"] == ("abnormal" if s >= stored["threshold"] else "normal")
        assert 0.0 <= row["calibrated_score"] <= 1.0
        op = row["operating_point"]
        assert (op["threshold"], op["score_key"], op["target"], op["mode"]) == (stored["threshold"], "map_max", "Brain", "labelled")
        assert op["sensitivity"]["ci95"] == stored["metrics"]["sensitivity"]["ci95"]
    # calibrated probability is monotone in the raw score
    probs = [annotate({"map_max": float(s)}, cal)["calibrated_score"] for s in np.sort(scores)]
    assert np.all(np.diff(probs) >= 0)


def test_entries_merge_per_target_and_reset_for_another_model(tmp_path):
    save_entry(tmp_path, _entry("Brain")[0], content_key="abc")
    save_entry(tmp_path, _entry("CT", rule="fpr", requested=0.1)[0], content_key="abc")
    cal = load_calibration(tmp_path)
    assert sorted(cal["entries"]) == ["Brain", "CT"]
    assert cal["entries"]["CT"]["mode"] == "normals-only"
    save_entry(tmp_path, _entry("Liver")[0], content_key="other-weights")
    assert sorted(load_calibration(tmp_path)["entries"]) == ["Liver"]


def test_entry_selection():
    cal = {"entries": {"Brain": {"k": 1}, "CT": {"k": 2}}}
    assert select_entry(cal, {"modality": "ct"}) == {"k": 2}
    assert select_entry(cal, {"target": "brain", "modality": "CT"}) == {"k": 1}
    assert select_entry(cal, {"modality": "MR"}) is None  # two entries, no match: no guess
    assert select_entry(cal, {}, target="Liver") is None
    assert select_entry({"entries": {"Brain": {"k": 1}}}, {"modality": "MR"}) == {"k": 1}  # the only entry
    assert select_entry({"entries": {"default": {"k": 3}, "CT": {"k": 2}}}, {"modality": "MR"}) == {"k": 3}
    assert select_entry(None, {}) is None


def test_annotate_leaves_rows_it_cannot_decide(tmp_path):
    save_entry(tmp_path, _entry("Brain")[0])
    cal = load_calibration(tmp_path)
    for row in ({"path": "a", "error": "unreadable"}, {"path": "b", "score": 1.0}, {"path": "c", "map_max": None}):
        assert annotate(row, cal) == row
    assert annotate({"map_max": 1.0}, None) == {"map_max": 1.0}


def test_absent_and_corrupt_files(tmp_path):
    assert load_calibration(tmp_path) is None
    (tmp_path / CALIBRATION_NAME).write_text("{not json")
    with pytest.raises(InputError, match=r"calibration.json: unreadable calibration \(.*\); rerun `iqe calibrate`$"):
        load_calibration(tmp_path)
    (tmp_path / CALIBRATION_NAME).write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match=r"calibration.json: not an iqe-calibration/1 file; rerun `iqe calibrate`$"):
        load_calibration(tmp_path)


def test_normals_only_entry_uses_percentiles_and_refuses_labels(tmp_path):
    entry, scores, _ = _entry("MR", rule="fpr", requested=0.05)
    assert entry["normalisation"]["method"] == "normal-percentile"
    save_entry(tmp_path, entry)
    cal = load_calibration(tmp_path)
    top = annotate({"map_max": float(scores.max())}, cal)
    assert top["decision"] == "abnormal" and top["calibrated_score"] == pytest.approx(1.0)
    # fraction of the normals scoring below the median is ~0.5
    assert annotate({"map_max": float(np.median(scores))}, cal)["calibrated_score"] == pytest.approx(0.5, abs=0.03)
    with pytest.raises(InputError, match=r"^x: --normals-only got 1 abnormal case\(s\); drop --normals-only to use the labels$"):
        fit_entry(scores, np.r_[np.zeros(39, int), 1], target="MR", score_key="map_max", rule="fpr", requested=0.05,
                  source="x")
