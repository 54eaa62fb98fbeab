"""`iqe calibrate` end to end on a tiny bundle, and `iqe score` with and without its calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from iqe.cli import main
from iqe.model.bundle import save_bundle
from iqe.model.synth import write_synthetic_bmad


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    from iqe.model.config import load_config
    from iqe.model.iqe import IQEModel
    from tests.conftest import randomize_

    root = tmp_path_factory.mktemp("cal")
    torch.manual_seed(0)
    bundle = save_bundle(randomize_(IQEModel(load_config("tiny")), seed=3).eval(), root / "bundle")
    data = write_synthetic_bmad(root / "data", objects=("Brain",), n_per_class={"train": 0, "valid": 10, "test": 3})
    return bundle, data


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def _error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_calibrate_then_score(setup, tmp_path, capsys):
    bundle0, data = setup
    bundle = Path(shutil.copytree(bundle0, tmp_path / "bundle"))
    test_images = [str(data / "Brain_AD" / "test" / c / "img") for c in ("good", "Ungood")]
    assert main(["score", "--model", str(bundle), *test_images, "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    plain = _rows(tmp_path / "plain")
    assert len(plain) == 6 and not any("decision" in r for r in plain)

    assert main(["calibrate", str(bundle), "--data", str(data), "--target-sensitivity", "0.8", "--bootstrap", "200",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "wrote entry 'Brain'" in err
    cal = json.loads((bundle / "calibration.json").read_text())
    entry = cal["entries"]["Brain"]
    assert entry["data"]["normal"] == 10 and entry["data"]["abnormal"] == 10 and entry["data"]["failed"] == 0
    assert entry["score_key"] == "map_max" and entry["rule"] == "sensitivity" and entry["requested"] == 0.8
    assert entry["data"]["description"].endswith("Brain_AD/valid")
    plots = sorted(p.name for p in (bundle / "calibration_plots").glob("*.png"))
    if plots:  # matplotlib is an optional extra
        assert plots == ["Brain_histograms.png", "Brain_reliability.png", "Brain_roc.png"]

    assert main(["score", "--model", str(bundle), *test_images, "--out", str(tmp_path / "cal"), "--quiet"]) == 0
    rows = _rows(tmp_path / "cal")
    assert [r["path"] for r in rows] == [r["path"] for r in plain]
    for row, before in zip(rows, plain):
        assert row["map_max"] == before["map_max"]
        assert row["decision"] == ("abnormal" if row["map_max"] >= entry["threshold"] else "normal")
        assert row["operating_point"]["threshold"] == entry["threshold"]
        assert row["operating_point"]["target"] == "Brain"
        assert 0.0 <= row["calibrated_score"] <= 1.0


def test_normals_only_from_a_plain_folder(setup, tmp_path, capsys):
    bundle0, data = setup
    bundle = Path(shutil.copytree(bundle0, tmp_path / "bundle"))
    folder = data / "Brain_AD" / "valid" / "good" / "img"
    assert main(["calibrate", str(bundle), "--data", str(folder), "--normals-only", "--fpr", "0.1", "--target", "MR",
                 "--quiet"]) == 0
    entry = json.loads((bundle / "calibration.json").read_text())["entries"]["MR"]
    assert entry["mode"] == "normals-only" and entry["order_statistic"] == {"k": 10, "n": 10, "beta": [1, 10]}
    # 10 normals at FPR 0.05 is too few: 19 are needed
    assert main(["calibrate", str(bundle), "--data", str(folder), "--normals-only", "--fpr", "0.05", "--quiet"]) == 2
    assert _error(capsys) == (f"iqe calibrate: error: {folder}: 10 normal case(s); a threshold at FPR 0.05 with an "
                              "order-statistics CI needs at least 19 (add 9 more)")


def test_bad_label_sources_fail_clearly(setup, tmp_path, capsys):
    bundle, data = setup
    odd = tmp_path / "odd"
    (odd / "good").mkdir(parents=True)
    (odd / "sick").mkdir()
    assert main(["calibrate", str(bundle), "--data", str(odd), "--quiet"]) == 2
    assert _error(capsys) == f"iqe calibrate: error: {odd}: unexpected folder(s) sick; class folders are good/ and Ungood/"

    nothing = tmp_path / "nothing"
    (nothing / "x").mkdir(parents=True)
    assert main(["calibrate", str(bundle), "--data", str(nothing), "--quiet"]) == 2
    assert _error(capsys) == (f"iqe calibrate: error: {nothing}: no labels found (holds x); expected a CSV of path,label, "
                              "a BMAD root with <Obj>_AD folders, or class folders good/ and Ungood/; for a folder of "
                              "normal images use --normals-only")

    one_class = tmp_path / "one"
    shutil.copytree(data / "Brain_AD" / "valid" / "good", one_class / "good")
    assert main(["calibrate", str(bundle), "--data", str(one_class), "--quiet"]) == 2
    assert _error(capsys) == (f"iqe calibrate: error: {one_class}: no abnormal cases (only normal); a labelled calibration "
                              "needs at least 10 of each class (for normal cases only use --normals-only --fpr RATE)")

    csv = tmp_path / "labels.csv"
    images = sorted((data / "Brain_AD" / "valid" / "good" / "img").glob("*.png"))
    csv.write_text("path,label\n" + "".join(f"{p},normal\n" for p in images[:3]) + f"{images[3]},maybe\n")
    assert main(["calibrate", str(bundle), "--data", str(csv), "--quiet"]) == 2
    assert _error(capsys) == (f"iqe calibrate: error: {csv}:5: label 'maybe' is not one of 0, 1, normal, abnormal, "
                              "good, Ungood")


def test_csv_with_an_unreadable_image_keeps_the_others(setup, tmp_path, capsys):
    bundle0, data = setup
    bundle = Path(shutil.copytree(bundle0, tmp_path / "bundle"))
    valid = data / "Brain_AD" / "valid"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    lines = [f"{p},0" for p in sorted((valid / "good" / "img").glob("*.png"))]
    lines += [f"{p},1" for p in sorted((valid / "Ungood" / "img").glob("*.png"))] + [f"{broken},1"]
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    assert main(["calibrate", str(bundle), "--data", str(csv), "--youden", "--bootstrap", "200", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipped:" in err and "broken.png" in err
    entry = json.loads((bundle / "calibration.json").read_text())["entries"]["default"]
    assert (entry["data"]["normal"], entry["data"]["abnormal"], entry["data"]["failed"]) == (10, 10, 1)
    assert np.isfinite(entry["threshold"])
