"""Bundle writers never destroy user data; content digests are memoised safely."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from iqe.cli import main
from iqe.errors import InputError
from iqe.model.bundle import cached_sha256, load_bundle, save_bundle
from tests.conftest import randomize_


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_new_and_empty_targets_are_written(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "new" / "bundle", tmp_path / "empty"):
        save_bundle(tiny_model, target, extra={"note": 1})
        assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "provenance.json"]
        assert _state_equal(load_bundle(target), tiny_model)
    assert (tmp_path / "new" / "bundle").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary folder left


def test_folder_with_user_files_is_refused_and_untouched(tiny_model, tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "scan.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(InputError) as err:
        save_bundle(tiny_model, target, force=True)  # --force replaces bundles only
    assert str(err.value) == (f"{target}: exists and is not a model bundle (holds notes.txt, scan.dcm); nothing was "
                              "written, choose a new or empty directory")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "scan.dcm"]
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError) as err:
        save_bundle(tiny_model, tmp_path / "file")
    assert str(err.value) == f"{tmp_path / 'file'}: exists and is not a directory; choose another --out"


def test_existing_bundle_needs_force_and_only_its_files_are_replaced(tiny_model, tmp_path):
    target = save_bundle(tiny_model, tmp_path / "bundle", extra={"v": 1})
    (target / "README.txt").write_text("keep me")
    other = randomize_(type(tiny_model)(tiny_model.cfg), seed=7).eval()
    with pytest.raises(InputError) as err:
        save_bundle(other, target)
    assert str(err.value) == (f"{target}: a model bundle already exists there; pass --force to replace it (only "
                              "model.safetensors, provenance.json, config.json are replaced)")
    assert _state_equal(load_bundle(target), tiny_model)
    save_bundle(other, target, force=True)
    assert _state_equal(load_bundle(target), other)
    assert (target / "README.txt").read_text() == "keep me"
    assert not (target / "provenance.json").exists()  # the old provenance described the old weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_cli_writers_check_out_before_working(tiny_model, tmp_path, capsys):
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.png").write_bytes(b"png")
    clip, ckpt = tmp_path / "clip.pt", tmp_path / "ckpt.pth"
    clip.write_bytes(b"not read")  # refused before the weights are read
    ckpt.write_bytes(b"not read")
    assert main(["import-reference", "--clip", str(clip), "--checkpoint", str(ckpt), "--out", str(target)]) == 2
    message = (f"{target}: exists and is not a model bundle (holds keep.png); nothing was written, choose a new or "
               "empty directory")
    assert capsys.readouterr().err == f"iqe import-reference: error: {message}\n"
    assert main(["train", "--data", str(tmp_path), "--target", "Brain", "--out", str(target), "--quiet"]) == 2
    assert capsys.readouterr().err == f"iqe train: error: {message}\n"
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    assert main(["train", "--data", str(tmp_path), "--target", "Brain", "--out", str(bundle), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"iqe train: error: {bundle}: a model bundle already exists there; pass --force "
                                       "to replace it (only model.safetensors, provenance.json, config.json are "
                                       "replaced)\n")
    assert sorted(p.name for p in target.iterdir()) == ["keep.png"]


def test_export_out_is_checked(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from iqe.cli import DEMO_BUNDLE

    target = tmp_path / "mine"
    target.mkdir()
    (target / "a.txt").write_text("x")
    assert main(["export", str(DEMO_BUNDLE), "--out", str(target), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"iqe export: error: --out {target}: exists and is not an engine folder (holds "
                                       "a.txt); nothing was written, choose a new or empty folder\n")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]


def test_cached_digest_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IQE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    assert cached_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    memo = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert list(memo.values()) == [hashlib.sha256(b"a" * 1000).hexdigest()]
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, rewritten in place
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cached_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    (tmp_path / "cache" / "digests.json").write_text("{broken")  # a damaged memo is only a cache miss
    assert cached_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
