"""argparse value types shared by the CLI and the benchmark (validated while parsing),
environment defaults validated like the flags they stand for, and optional-extra checks.

Environment defaults are read after parsing, never while building the parser, so a bad
value (`IQE_BATCH=abc`) cannot break `--help`; it is reported like a bad flag, naming
the variable. Optional extras are checked before any work starts, with the exact
command that installs them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from iqe.errors import InputError

PACKAGE = "iqe-engine"


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type accepting integers >= `minimum`, with a message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def backend_name(text: str) -> str:
    """An argparse type: a registered backend whose library is installed (else its install command)."""
    from iqe.engine.registry import BACKENDS, BackendMissing, require_backend

    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend '{text}'; choose from {', '.join(BACKENDS)}")
    try:
        require_backend(text)
    except BackendMissing as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--backend {text}: ")) from None
    return text


backend_name.__name__ = "backend"


# -- environment defaults ------------------------------------------------------------------
@dataclass(frozen=True)
class EnvDefault:
    """Option `dest` takes its value from `variable` when the flag is not given."""

    dest: str
    variable: str
    parse: Callable[[str], Any]


def apply_env_defaults(args: argparse.Namespace, defaults: Iterable[EnvDefault],
                       environ: dict[str, str] | None = None) -> None:
    """Fill options the command line left unset (None) from the environment.

    Raises:
        InputError: a variable's value would be refused as a flag value; the message names
            the variable, its value and the reason.
    """
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    for d in defaults:
        if getattr(args, d.dest, None) is not None or d.variable not in environ:
            continue
        text = environ[d.variable]
        try:
            setattr(args, d.dest, d.parse(text))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise InputError(f"environment {d.variable}={text!r}: {exc}") from None


# -- optional extras -----------------------------------------------------------------------
# importable module -> the extra that installs it (pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "tensorrt": "tensorrt",
    "matplotlib": "plots",
    "pylibjpeg": "dicom-codecs",
    "openjpeg": "dicom-codecs",
    "libjpeg": "dicom-codecs",
}


def install_command(module: str) -> str:
    extra = EXTRAS.get(module)
    return f"pip install '{PACKAGE}[{extra}]'" if extra else f"pip install {module}"


def module_missing(name: str) -> bool:
    """True when `import name` would fail (a module set to None in sys.modules counts as missing)."""
    if name in sys.modules:
        return sys.modules[name] is None
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def require_modules(modules: Iterable[str], purpose: str) -> None:
    """InputError naming the missing modules and the command that installs them.

    Args:
        modules: importable module names, e.g. ("onnx", "onnxruntime").
        purpose: what needs them, e.g. "iqe export".
    """
    missing = [m for m in modules if module_missing(m)]
    if missing:
        commands = sorted({install_command(m) for m in missing})
        raise InputError(f"{purpose} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed; install with `{'` and `'.join(commands)}`")


def missing_module_message(exc: ModuleNotFoundError) -> str:
    """One line for an optional dependency that was imported without being checked first."""
    name = (exc.name or "?").split(".")[0]
    return f"{name} is not installed; install it with `{install_command(name)}`"
