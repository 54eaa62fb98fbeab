"""The README's main job, on the embedded demo bundle (in-process, same code path as `iqe demo`)."""

import json
import re
from pathlib import Path

import pytest

from iqe.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_readme_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    main_cmd = re.search(r"<!-- main-command -->\n```\n(.+)\n```", readme).group(1)
    test_cmd = re.search(r"<!-- test-command -->\n```\n(.+)\n```", readme).group(1)
    assert main_cmd.endswith("iqe demo --out iqe-demo")
    assert "pytest" in test_cmd
    assert "<!-- test-command -->" in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("IQE_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "iqe demo: backend onnxruntime" in printed
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["images"] == 24 and summary["backend"].startswith("onnxruntime")
    # the shipped bundle's documented validation: lesions are localised
    assert summary["pixel_auc"] > 0.7
    rows = (tmp_path / "demo" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 24 and all("score" in json.loads(r) for r in rows)
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == 6
