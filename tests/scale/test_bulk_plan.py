"""`iqe bulk` planning without Ray: manifests, units in `iqe score` order, one-line errors."""

from __future__ import annotations

import json

import pytest

from iqe.errors import InputError
from iqe.runtime.bulk import plan_units, read_manifest
from iqe.runtime.scoring import discover_in_order
from tests.conftest import write_test_images


def test_manifest_formats_list_the_same_paths(tmp_path):
    imgs = write_test_images(tmp_path / "a" / "imgs")
    rel = [f"a/imgs/{p.name}" for p in imgs]
    (tmp_path / "m.txt").write_text("# archive\n" + "\n".join(rel) + "\n\n")
    (tmp_path / "m.csv").write_text("id,path\n" + "".join(f"{i},{r}\n" for i, r in enumerate(rel)))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": r}) + "\n" for r in rel))
    want = [str(p) for p in imgs]
    for name in ("m.txt", "m.csv", "m.jsonl"):
        assert read_manifest(tmp_path / name) == want, name
    units = plan_units([tmp_path / "m.txt", tmp_path / "missing.png"])
    assert [u["path"] for u in units] == [str(s.path) for s in discover_in_order(want + [tmp_path / "missing.png"])]
    assert [u["seq"] for u in units] == list(range(5))
    assert units[-1]["kind"] == "error" and units[-1]["error"].endswith("missing.png: no such file or folder")


def test_bad_manifests_name_the_file_and_line(tmp_path):
    (tmp_path / "m.csv").write_text("file\nx.png\n")
    with pytest.raises(InputError) as e:
        read_manifest(tmp_path / "m.csv")
    assert str(e.value) == f"{tmp_path / 'm.csv'}: manifest CSV needs a 'path' column"
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"}\n["b.png"]\n')
    with pytest.raises(InputError) as e:
        read_manifest(tmp_path / "m.jsonl")
    assert str(e.value) == f"{tmp_path / 'm.jsonl'}:2: expected a JSON object with a 'path'"


def test_bulk_without_a_bundle_is_a_one_line_error(tmp_path, capsys):
    from iqe.cli import main

    assert main(["bulk", str(tmp_path), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"iqe bulk: error: {tmp_path / 'nope'}: not a bundle (config.json missing)"
