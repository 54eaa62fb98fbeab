"""`iqe score` end to end: contract files, order, per-file errors, exit codes."""

import json

import numpy as np
import pytest

from iqe.cli import main
from iqe.model.bundle import save_bundle
from iqe.model.preprocess import load_image
from tests.conftest import write_test_images


@pytest.fixture
def bundle(tiny_model, tmp_path):
    return save_bundle(tiny_model, tmp_path / "bundle")


def test_score_contract_and_bad_inputs(tiny_model, bundle, tmp_path):
    images = write_test_images(tmp_path / "imgs")
    corrupt = tmp_path / "imgs" / "zz_corrupt.png"
    corrupt.write_bytes(images[0].read_bytes()[:200])  # truncated PNG
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "nope.png"
    out = tmp_path / "out"
    rc = main(["score", "--model", str(bundle), str(images[2]), str(tmp_path / "imgs"), str(tmp_path / "empty"),
               str(missing), "--out", str(out), "--save-maps", "--batch", "3", "--quiet"])
    assert rc == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    # arguments keep their order; a folder expands sorted
    expected_order = [str(images[2])] + [str(p) for p in images] + [str(corrupt), str(tmp_path / "empty"), str(missing)]
    assert [r["path"] for r in rows] == expected_order
    errors = {r["path"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {str(corrupt), str(tmp_path / "empty"), str(missing)}
    assert "zz_corrupt.png: cannot decode image" in errors[str(corrupt)]
    assert "empty folder" in errors[str(tmp_path / "empty")]
    assert "no such file" in errors[str(missing)]
    ok = [r for r in rows if "error" not in r]
    assert all({"score", "score_query", "score_text", "map_max"} <= set(r) for r in ok)
    # scores equal a direct model call on the same preprocessed pixels (batching changes nothing)
    direct = tiny_model.score(__import__("torch").from_numpy(np.stack([load_image(p, 240) for p in images])))
    by_path = {r["path"]: r for r in ok}
    for i, p in enumerate(images):
        assert by_path[str(p)]["score"] == pytest.approx(float(direct["score"][i]), abs=1e-5)
        assert by_path[str(p)]["map_max"] == pytest.approx(float(direct["map_max"][i]), abs=1e-5)
    assert [r["item"] for r in rows] == list(range(len(rows)))
    assert all(r["file"] == r["path"] for r in rows)  # plain files: the key is the file
    assert "maps" not in str(errors) and all("maps" not in r for r in rows if "error" in r)
    for i, p in enumerate(images):
        with np.load(out / by_path[str(p)]["maps"]) as m:
            assert m["map"].shape == (240, 240) and m["map"].dtype == np.float32
            np.testing.assert_allclose(m["map"], direct["map"][i], atol=1e-5)
            np.testing.assert_allclose(m["map_smooth"], direct["map_smooth"][i], atol=1e-5)


def test_nothing_scorable_is_an_error(bundle, tmp_path, capsys):
    rc = main(["score", "--model", str(bundle), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "nothing could be scored" in capsys.readouterr().err


def test_bad_bundle_message(tmp_path, capsys):
    rc = main(["score", "--model", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_import_reference_cli(tiny_model, tmp_path, capsys):
    from tests.model.reference_format import round_clip_to_fp16_, write_reference_files

    clip, ckpt = write_reference_files(round_clip_to_fp16_(tiny_model), tmp_path / "ref")
    iqm = tmp_path / "iqm.json"
    iqm.write_text(json.dumps({"num_attention_heads": 2}))
    rc = main(["import-reference", "--clip", str(clip), "--checkpoint", str(ckpt), "--iqm-config", str(iqm),
               "--features", "1,2,3,4", "--out", str(tmp_path / "b")])
    assert rc == 0 and (tmp_path / "b" / "model.safetensors").is_file()
    rc = main(["import-reference", "--clip", str(clip), "--checkpoint", str(ckpt), "--out", str(tmp_path / "c")])
    # the default 6,12,18,24 does not fit a 4-block tiny ViT: a clear error, no bundle
    assert rc == 2 and "features [6, 12, 18, 24] must lie in 1..4" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
