"""The native model bundle: a directory with `config.json` + `model.safetensors`.

Writing never destroys user data: a new bundle is written to a temporary directory and
renamed into place; an existing bundle is replaced only with `force` (its bundle files
swapped one by one, weights first and config last, nothing else in the folder touched);
any other existing, non-empty directory is refused.

Content identity (`bundle_sha256`) keys the engine cache and binds engines to the bundle
they were built from. Hashing a ViT-L bundle costs seconds, so digests are memoised by
file identity (path, size, mtime, inode) under IQE_CACHE. torch is imported only by the
functions that need it, so identity checks stay cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from iqe.atomic import atomic_write_text, created_mode, fsync_dir
from iqe.errors import InputError, WeightsError

if TYPE_CHECKING:
    import torch

    from iqe.model.iqe import IQEModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROVENANCE_NAME = "provenance.json"
BUNDLE_FILES = (WEIGHTS_NAME, PROVENANCE_NAME, CONFIG_NAME)  # replacement order: config.json last
DIGEST_MEMO_SIZE = 512  # files whose digests are remembered (bundles, exported graphs, engine artefacts)


def _digest_memo() -> Path:
    return Path(os.environ.get("IQE_CACHE", Path.home() / ".cache" / "iqe")) / "digests.json"


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised by (resolved path, size, mtime_ns, inode).

    A file rewritten in place changes its mtime or size, a replaced one its inode, so a
    stale memo entry is never used. The memo is a cache: unreadable means empty.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo_path = _digest_memo()
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    if key in memo:
        return str(memo[key])
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}  # one entry per file
    memo[key] = digest
    memo = dict(list(memo.items())[-DIGEST_MEMO_SIZE:])  # newest last: drop the oldest
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run a re-hash
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo), durable=False)
    return digest


def is_bundle(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _require_bundle(path: Path) -> None:
    if not is_bundle(path):
        raise InputError(f"{path}: not a model bundle (expected {CONFIG_NAME} and {WEIGHTS_NAME} in a directory)")


def bundle_sha256(path: str | Path) -> str:
    """Content hash of a bundle: sha256 over the sha256 of config.json and of model.safetensors."""
    path = Path(path)
    _require_bundle(path)
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        h.update(cached_sha256(path / name).encode())
    return h.hexdigest()


def bundle_identity(path: str | Path) -> tuple[str, str]:
    """(bundle_sha256, config digest) of a bundle directory, without loading its weights."""
    from iqe.model.families import load_model_config

    path = Path(path)
    return bundle_sha256(path), load_model_config(path / CONFIG_NAME).digest()


def occupied_by(target: Path) -> list[str]:
    """Names in an output folder a writer was given ([] when it does not exist or is empty).

    Raises:
        InputError: `target` exists and is not a directory.
    """
    if not target.exists() and not target.is_symlink():
        return []
    if not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory; choose another --out")
    return sorted(p.name for p in target.iterdir())


def listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_bundle_target(out_dir: str | Path, force: bool = False) -> None:
    """Refuse to write a bundle where it would destroy something.

    Raises:
        InputError: `out_dir` is a file, a non-empty directory that is not a bundle, or a
            bundle while `force` is off.
    """
    out_dir = Path(out_dir)
    entries = occupied_by(out_dir)
    if not entries:
        return
    if not is_bundle(out_dir):
        raise InputError(f"{out_dir}: exists and is not a model bundle (holds {listing(entries)}); nothing was "
                         "written, choose a new or empty directory")
    if not force:
        raise InputError(f"{out_dir}: a model bundle already exists there; pass --force to replace it "
                         f"(only {', '.join(BUNDLE_FILES)} are replaced)")


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


def save_bundle(model: IQEModel, out_dir: str | Path, extra: dict | None = None, force: bool = False) -> Path:
    """Write `model` as a bundle at `out_dir`.

    Args:
        model: the model; its config is written alongside.
        out_dir: target directory: new, empty, or (with `force`) an existing bundle.
        extra: optional JSON-able provenance written to `provenance.json`.
        force: replace an existing bundle's files (other files in the folder stay).
    Returns:
        The bundle path.
    Raises:
        InputError: see `check_bundle_target`; nothing is written then.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    check_bundle_target(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, created_mode(directory=True))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # One metadata entry: safetensors stores the metadata map in arbitrary order, and
        # engine caches key on the file's bytes, so the same weights must give the same file.
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"iqe-bundle": f"config_sha256={model.cfg.digest()}"})
        (tmp / CONFIG_NAME).write_text(model.cfg.to_json() + "\n")
        if extra:
            (tmp / PROVENANCE_NAME).write_text(json.dumps(extra, indent=2) + "\n")
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.is_dir():  # empty, or a bundle with force: swap the bundle files only
            for name in BUNDLE_FILES:
                if (tmp / name).is_file():
                    os.replace(tmp / name, out_dir / name)
                elif name == PROVENANCE_NAME:
                    (out_dir / name).unlink(missing_ok=True)  # the old provenance would describe other weights
            fsync_dir(out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
            fsync_dir(out_dir.parent)
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _require_bundle(path)
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
