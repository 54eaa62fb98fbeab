"""Model families: one registry that bundles, export, engines and the runtime dispatch on.

In the spirit of open_clip / timm `create_model`: a bundle's `config.json` names its
family (`"family": "mvfa"`; absent means `iqe-clip`, so every existing bundle keeps its
bytes and digest), and everything downstream asks the family for what differs:

    config_from_dict  JSON -> the family's config object (with .to_json(), .digest())
    build             config -> nn.Module (eval-ready, all weights as parameters/buffers)
    torch_graph       (model, precision) -> (module images -> output tuple, output names)
    export            None for the default exporter (iqe.export.onnx_export), else a
                      function with export_model's signature
    label, map_description   how results (the DICOM node's objects) name the model and its map

Both families use the same CLIP towers (iqe/model/clip.py) and blocks (iqe/model/layers.py).
Imports of the families' modules happen lazily, so importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from iqe.errors import InputError

DEFAULT_FAMILY = "iqe-clip"


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], Any]
    torch_graph: Callable[[Any, str], tuple[Any, tuple[str, ...]]]
    export: Callable[..., Any] | None = None
    label: str = ""  # how results name the model (DICOM model names, the node's JSON); default: `name`
    map_description: str = "anomaly map"  # what a result's `map` is (the node's Parametric Map says it)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family (a name may be registered once)."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family '{family.name}' is already registered")
    _FAMILIES[family.name] = family
    return family


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family `name` (InputError listing the known ones otherwise)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown model family '{name}'; known families: {', '.join(list_families())}") from None


def family_label(name: str) -> str:
    """Display name of a family ('IQE-CLIP', 'MVFA'); an unknown name is shown as it is."""
    family = _FAMILIES.get(name)
    return (family.label or family.name) if family else name


def family_name(obj: Any) -> str:
    """Family of a config or a model (`.cfg`); configs without a `family` are iqe-clip."""
    cfg = getattr(obj, "cfg", obj)
    return getattr(cfg, "family", DEFAULT_FAMILY)


def family_of(obj: Any) -> Family:
    return get_family(family_name(obj))


def config_from_dict(data: dict[str, Any]) -> Any:
    """Config object for a bundle's config.json content, dispatched on its `family` key."""
    data = dict(data)
    name = data.pop("family", DEFAULT_FAMILY)
    if not isinstance(name, str):
        raise InputError(f"config: 'family' must be a string, got {type(name).__name__}")
    return get_family(name).config_from_dict(data)


def load_model_config(path: str | Path) -> Any:
    """Read a config.json of any family (InputError on a missing file or bad JSON)."""
    from iqe.model.config import read_config_json

    path = Path(path)
    data = read_config_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config_from_dict(data)


def create_model(cfg: Any) -> Any:
    """A fresh model of the config's family (random weights until a state dict is loaded)."""
    return family_of(cfg).build(cfg)


# -- built-in families ---------------------------------------------------------------------
def _iqe_config(data: dict[str, Any]) -> Any:
    from iqe.model.config import IQEConfig

    return IQEConfig.from_dict(data)


def _iqe_build(cfg: Any) -> Any:
    from iqe.model.iqe import IQEModel

    return IQEModel(cfg)


def _iqe_torch_graph(model: Any, precision: str) -> tuple[Any, tuple[str, ...]]:
    from iqe.export.graphs import HEAD_OUTPUTS, FusedGraph, cast_vision_fp16

    vision = cast_vision_fp16(model) if precision == "fp16" else model
    return FusedGraph(model, vision), tuple(HEAD_OUTPUTS)


def _mvfa_config(data: dict[str, Any]) -> Any:
    from iqe.model.mvfa import MVFAConfig

    return MVFAConfig.from_dict(data)


def _mvfa_build(cfg: Any) -> Any:
    from iqe.model.mvfa import MVFAModel

    return MVFAModel(cfg)


def _mvfa_torch_graph(model: Any, precision: str) -> tuple[Any, tuple[str, ...]]:
    from iqe.model.mvfa_export import torch_graph

    return torch_graph(model, precision)


def _mvfa_export(*args: Any, **kwargs: Any) -> Any:
    from iqe.model.mvfa_export import export_mvfa

    return export_mvfa(*args, **kwargs)


register_family(Family("iqe-clip", "IQE-CLIP (hongh0/IQE-CLIP): image-conditioned prompts + IQM, zero/few-shot fine-tuned",
                       _iqe_config, _iqe_build, _iqe_torch_graph, label="IQE-CLIP",
                       map_description="anomaly map (smoothed)"))
register_family(Family("mvfa", "MVFA (MediaBrain-SJTU/MVFA-AD, CVPR 2024): residual adapters, fixed per-organ text, "
                       "1-NN memory bank", _mvfa_config, _mvfa_build, _mvfa_torch_graph, _mvfa_export, label="MVFA",
                       map_description="anomaly map (zero-shot, or zero+few-shot fusion)"))
