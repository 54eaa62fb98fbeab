"""The native model bundle: a directory with `config.json` + `model.safetensors`.

Writing is atomic (temporary directory, then rename) so an interrupted write never
leaves a bundle that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from iqe.errors import InputError, WeightsError
from iqe.model.iqe import IQEModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming every missing/unexpected key and every shape mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: expected {list(expected[k])}, got {list(state[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise WeightsError(f"{source}: " + " | ".join(problems))


def save_bundle(model: IQEModel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `model` as a bundle at `out_dir` (replaced atomically if it exists).

    Args:
        model: the model; its config is written alongside.
        out_dir: target directory.
        extra: optional JSON-able provenance written to `provenance.json`.
    Returns:
        The bundle path.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / CONFIG_NAME).write_text(model.cfg.to_json() + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # One metadata entry: safetensors stores the metadata map in arbitrary order, and
        # engine caches key on the file's bytes, so the same weights must give the same file.
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"iqe-bundle": f"config_sha256={model.cfg.digest()}"})
        if extra:
            (tmp / "provenance.json").write_text(json.dumps(extra, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> IQEModel:
    """Load a bundle directory into an eval-mode IQEModel.

    Raises:
        InputError: not a bundle directory, unreadable weights.
        WeightsError: weights do not match config.json (names each key).
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise InputError(f"{path}: not a model bundle (expected {CONFIG_NAME} and {WEIGHTS_NAME} in a directory)")
    from iqe.model.families import create_model, load_model_config

    cfg = load_model_config(path / CONFIG_NAME)  # any family (config.json's "family", default iqe-clip)
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path / WEIGHTS_NAME}: cannot read weights ({exc})") from None
    model = create_model(cfg)
    check_state_dict(model, state, str(path / WEIGHTS_NAME))
    model.load_state_dict(state)
    return model.to(device).eval()
