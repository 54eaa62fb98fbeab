"""`iqe score` output folders: never mixed with user files, reused cleanly, resumable after a kill.

Most runs here use a cheap stand-in for the model (`infer` below: scores are plain NumPy
means of the input, so expected values are recomputed independently); the CLI tests use
the tiny preset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iqe.cli import main
from iqe.errors import InputError
from iqe.model.bundle import save_bundle
from iqe.model.preprocess import load_image
from iqe.runtime.results import RUN_RECORD, RunOutput, read_results
from iqe.runtime.run import score_to_folder
from iqe.runtime.scoring import iter_input_items, score_stream

SIZE = 240
REPO = Path(__file__).resolve().parents[2]


def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
    score = batch.mean(axis=(1, 2, 3)).astype(np.float64)
    return {"score": score, "map_max": score, "map": batch[:, 0], "map_smooth": batch[:, 1]}


def write_pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def run(inputs, out: Path, resume: bool = False, save_maps: bool = False, overlays: bool = False, batch: int = 3):
    output = RunOutput(out, {"inputs": [str(p) for p in inputs]}, resume=resume, save_maps=save_maps,
                       overlays=overlays)
    return score_to_folder(list(inputs), infer, SIZE, output, batch_size=batch, progress=False)


def expected_score(path: Path) -> float:
    return float(load_image(path, SIZE).mean(dtype=np.float64))


# ----------------------------------------------------------------------------- the folder


def test_out_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    # the "bundle" is an empty folder: the --out check comes first, before any engine is loaded
    (tmp_path / "not-a-bundle").mkdir()
    rc = main(["score", "--model", str(tmp_path / "not-a-bundle"), str(tmp_path), "--out", str(target), "--quiet"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"iqe score: error: --out {target}: is a file, not a folder"
    assert target.read_text() == "mine"


def test_out_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"^--out .*/file/sub: cannot create the folder \(Not a directory\)$"):
        RunOutput(tmp_path / "file" / "sub", {})


def test_folder_with_user_files_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "results.jsonl").write_text("not ours\n")
    with pytest.raises(InputError) as err:
        RunOutput(out, {})
    assert str(err.value) == (f"--out {out}: folder is not empty (notes.txt, results.jsonl) and was not written by "
                              f"`iqe score` (no {RUN_RECORD}); choose a new or empty folder so no file of yours is "
                              f"mixed with or replaced by results")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.jsonl"]
    assert (out / "results.jsonl").read_text() == "not ours\n"


def test_reused_folder_loses_exactly_the_previous_runs_files(tmp_path):
    images = write_pngs(tmp_path / "in", 5)
    out = tmp_path / "out"
    run(images, out, save_maps=True, overlays=True)
    assert len(list((out / "maps").iterdir())) == len(list((out / "overlays").iterdir())) == 5
    (out / "notes.txt").write_text("mine")  # a user file put beside the results
    (out / "maps" / "mine.npz").write_bytes(b"x")  # and one inside an output folder
    run(images[:2], out, overlays=True)  # second run: two images, overlays only
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD, "maps", "notes.txt", "overlays", "results.jsonl"]
    assert [p.name for p in (out / "maps").iterdir()] == ["mine.npz"]
    rows = read_results(out)
    assert [r["path"] for r in rows] == [str(p) for p in images[:2]]
    assert sorted(out.joinpath("overlays").iterdir()) == sorted(out / r["overlay"] for r in rows)
    assert all("maps" not in r for r in rows)


# ----------------------------------------------------------------------------- streaming


def test_rows_are_on_disk_after_each_batch(tmp_path):
    images = write_pngs(tmp_path / "in", 7)
    out = tmp_path / "out"
    seen = []
    with RunOutput(out, {}) as output:
        for batch in score_stream(iter_input_items(images, SIZE), infer, 3, prefetch=False):
            output.write(batch)
            seen.append(len(read_results(out)))
    assert seen == [3, 6, 7]
    rows = read_results(out)
    assert [r["item"] for r in rows] == list(range(7))
    for row, p in zip(rows, images):
        assert row["file"] == str(p) and row["score"] == pytest.approx(expected_score(p), abs=1e-6)


def test_a_failing_batch_costs_only_its_bad_item(tmp_path):
    images = write_pngs(tmp_path / "in", 6)
    poisoned = load_image(images[4], SIZE)

    def fragile(batch: np.ndarray) -> dict[str, np.ndarray]:
        if any(np.array_equal(x, poisoned) for x in batch):
            raise TypeError("cannot handle this one")
        return infer(batch)

    results = [r for b in score_stream(iter_input_items(images, SIZE), fragile, 3, prefetch=False) for r in b]
    assert [r.path for r in results] == [str(p) for p in images]
    assert [r.error for r in results] == [None] * 4 + [
        f"{images[4]}: inference failed (TypeError: cannot handle this one)", None]
    assert results[3].scores["score"] == pytest.approx(expected_score(images[3]), abs=1e-6)  # same batch, scored


def test_resume_skips_finished_rows_and_retries_errors(tmp_path, monkeypatch):
    import iqe.runtime.images

    images = write_pngs(tmp_path / "in", 6)
    out = tmp_path / "out"
    run(images, out)
    rows = (out / "results.jsonl").read_text().splitlines()
    bad = json.loads(rows[1])
    bad.pop("score")
    bad["error"] = "made up"
    # as a killed run leaves it: two whole rows (one an error) and a torn third
    (out / "results.jsonl").write_text(rows[0] + "\n" + json.dumps(bad) + "\n" + rows[2][:17])
    decoded = []
    real = iqe.runtime.images.pil_to_tensor_array
    monkeypatch.setattr(iqe.runtime.images, "pil_to_tensor_array", lambda im, size: decoded.append(1) or real(im, size))
    report = run(images, out, resume=True)
    assert (report.resumed, report.scored, report.failed) == (1, 5, 0)
    assert len(decoded) == 5  # the finished image is not decoded again
    got = read_results(out)
    assert sorted(r["path"] for r in got) == [str(p) for p in images]  # each once
    for r in got:
        assert r["score"] == pytest.approx(expected_score(Path(r["path"])), abs=1e-6)


def test_resume_with_other_options_is_refused(tmp_path):
    images = write_pngs(tmp_path / "in", 2)
    out = tmp_path / "out"
    run(images, out)
    with pytest.raises(InputError) as err:
        RunOutput(out, {"inputs": [str(images[0])]}, resume=True)
    assert str(err.value) == (f"--resume: inputs differs from the run recorded in {out} ({[str(p) for p in images]!r} "
                              f"then, {[str(images[0])]!r} now); resume with the same inputs and options, or drop "
                              f"--resume to start over")


# ----------------------------------------------------------------------------- killed runs

_SLOW_RUN = """
import sys, time
import numpy as np
from iqe.runtime.results import RunOutput
from iqe.runtime.run import score_to_folder

def infer(batch):
    time.sleep(0.3)
    score = batch.mean(axis=(1, 2, 3)).astype(np.float64)
    return {"score": score, "map": batch[:, 0], "map_smooth": batch[:, 1]}

inputs, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
output = RunOutput(out, {"inputs": [inputs]}, resume=resume, save_maps=True)
report = score_to_folder([inputs], infer, 240, output, batch_size=2, progress=False)
sys.exit(128 + report.interrupted if report.interrupted else 0)
"""


def _start(script: Path, folder: Path, out: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(script), str(folder), str(out), mode], env=env,
                            stderr=subprocess.PIPE, text=True)


def _interrupt_after(proc: subprocess.Popen, out: Path, rows: int, how: signal.Signals) -> tuple[int, str]:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.jsonl").is_file() and len(read_results(out)) >= rows:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(how)
    rc = proc.wait(timeout=60)
    return rc, proc.stderr.read() if proc.stderr else ""


@pytest.mark.slow
def test_killed_run_keeps_finished_rows_and_resumes(tmp_path):
    """SIGTERM (clean stop after the batch), then SIGKILL of the resumed run, then a resume that completes."""
    images = write_pngs(tmp_path / "in", 16)
    out = tmp_path / "out"
    script = tmp_path / "slow_run.py"
    script.write_text(_SLOW_RUN)

    rc, stderr = _interrupt_after(_start(script, tmp_path / "in", out, "new"), out, 4, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert "SIGTERM: finishing the batch in flight, then stopping" in stderr
    first = read_results(out)
    assert 4 <= len(first) < 16 and len(first) % 2 == 0  # whole batches of 2
    assert all(line.endswith("}") for line in (out / "results.jsonl").read_text().splitlines())

    rc, stderr = _interrupt_after(_start(script, tmp_path / "in", out, "resume"), out, len(first) + 2, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    second = read_results(out)
    assert len(first) < len(second) < 16 and [r["path"] for r in second[:len(first)]] == [r["path"] for r in first]

    done = _start(script, tmp_path / "in", out, "resume")
    assert done.wait(timeout=180) == 0, done.stderr.read() if done.stderr else ""
    final = read_results(out)
    assert sorted(r["path"] for r in final) == [str(p) for p in images]  # each exactly once
    assert sorted(r["item"] for r in final) == list(range(16))
    assert sorted(p.name for p in (out / "maps").iterdir()) == [f"{i:06d}.npz" for i in range(16)]
    for r in final:
        assert r["score"] == pytest.approx(expected_score(Path(r["path"])), abs=1e-6)
        assert (out / r["maps"]).is_file()


def test_cli_resume_after_interruption(tiny_model, tmp_path):
    images = write_pngs(tmp_path / "in", 5)
    bundle = save_bundle(tiny_model, tmp_path / "bundle")
    out = tmp_path / "out"
    args = ["score", "--model", str(bundle), str(tmp_path / "in"), "--out", str(out), "--quiet", "--batch", "2"]
    assert main(args) == 0
    complete = {r["path"]: r for r in read_results(out)}
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # killed mid-write
    assert main([*args, "--resume"]) == 0
    again = read_results(out)
    assert sorted(r["path"] for r in again) == sorted(complete)
    for r in again:
        assert r["score"] == pytest.approx(complete[r["path"]]["score"], abs=1e-6)
    assert main([*args, "--resume", "--save-maps"]) == 2  # options must match the recorded run


def test_stop_is_honoured_between_chunks_of_unreadable_items():
    from iqe.runtime.items import SliceItem

    items = [SliceItem(f"bad{i}.dcm", f"bad{i}.dcm", None, error=f"bad{i}.dcm: not DICOM") for i in range(10)]
    chunks = list(score_stream(items, infer, 3, stop=lambda: True, prefetch=False))
    assert [[r.path for r in c] for c in chunks] == [["bad0.dcm", "bad1.dcm", "bad2.dcm"]]
    chunks = list(score_stream(items, infer, 3, prefetch=False))
    assert [len(c) for c in chunks] == [3, 3, 3, 1] and all(r.error for c in chunks for r in c)
