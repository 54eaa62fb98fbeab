"""Model configuration: dataclasses <-> JSON, presets scanned from `presets/`.

A bundle's `config.json` lists only what differs from these defaults; the defaults are
the paper's ViT-L/14-336 setting evaluated at 240 px (REFERENCE.md).
`load_config(name_or_path)` is the single entry point: a preset name or a JSON file path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iqe.errors import InputError

PRESET_DIR = Path(__file__).parent / "presets"

# The two prompts of the reference, tokenized with CLIP's BPE (REFERENCE §4). They are
# fixed strings, so the ids are data rather than a tokenizer dependency.
NORMAL_PROMPT_IDS = [49406, 320, 1125, 539, 320, 5967, 27, 347, 1874, 91, 29, 269, 49407]
ABNORMAL_PROMPT_IDS = [49406, 320, 1125, 539, 320, 40934, 27, 347, 1874, 91, 29, 269, 49407]
END_TOKEN_ID = 49407


@dataclass
class VisionConfig:
    width: int = 1024  # transformer width W
    layers: int = 24  # residual blocks
    patch_size: int = 14  # conv stem kernel = stride
    heads: int | None = None  # None -> width // 64, as OpenAI's build_model


@dataclass
class TextConfig:
    width: int = 768  # transformer width
    layers: int = 12  # residual blocks
    heads: int | None = None  # None -> width // 64
    context_length: int = 77  # token positions
    vocab_size: int = 49408  # BPE vocabulary


@dataclass
class IQMConfig:
    hidden_size: int = 768  # query width (= embed_dim)
    num_attention_heads: int = 8  # not inferable from weights: comes from the reference's JSON
    num_hidden_layers: int = 4  # IQM layers
    intermediate_size: int = 3072  # feed-forward width
    layer_norm_eps: float = 1e-12  # BERT-style LayerNorm epsilon


class JsonConfig:
    """to_json / digest for a model config dataclass with `to_dict()` (every family's config)."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def digest(self) -> str:
        """sha256 of the canonical JSON: identifies the architecture in engine manifests."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class IQEConfig(JsonConfig):
    name: str = "vit-l-14-336"  # preset name or a free label
    image_size: int = 240  # input side; the reference evaluates at 240 px
    embed_dim: int = 768  # CLIP joint embedding width
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    iqm: IQMConfig = field(default_factory=IQMConfig)
    features: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # 1-based vision blocks read
    prompt_len: int = 2  # r: class-based prompt tokens per prompt
    deep_prompt_len: int = 1  # n: deep prompt tokens
    deep_prompt_layers: int = 11  # D: blocks receiving fresh deep prompts (= text layers - 1)
    alpha: float = 0.8  # weight of the query map in `map`
    sigma: float = 8.0  # Gaussian smoothing of `map` (scipy.ndimage.gaussian_filter)
    normal_prompt_ids: list[int] = field(default_factory=lambda: list(NORMAL_PROMPT_IDS))
    abnormal_prompt_ids: list[int] = field(default_factory=lambda: list(ABNORMAL_PROMPT_IDS))

    # -- derived sizes -------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patch grid side (17 at 240 px / patch 14; trailing pixels are unused)."""
        return self.image_size // self.vision.patch_size

    @property
    def vision_heads(self) -> int:
        return self.vision.heads or self.vision.width // 64 or 1

    @property
    def text_heads(self) -> int:
        return self.text.heads or self.text.width // 64 or 1

    @property
    def end_position(self) -> int:
        """Index p of the end token in the prompts; the CPT tokens replace it."""
        return self.normal_prompt_ids.index(END_TOKEN_ID)

    def validate(self) -> "IQEConfig":
        """Check cross-field invariants; raises InputError naming the field."""
        problems = []
        if self.text.width != self.embed_dim:
            problems.append(f"text.width ({self.text.width}) must equal embed_dim ({self.embed_dim})")
        if self.iqm.hidden_size != self.embed_dim:
            problems.append(f"iqm.hidden_size ({self.iqm.hidden_size}) must equal embed_dim ({self.embed_dim})")
        if self.iqm.hidden_size % self.iqm.num_attention_heads:
            problems.append("iqm.hidden_size must be a multiple of iqm.num_attention_heads")
        if any(not 1 <= k <= self.vision.layers for k in self.features):
            problems.append(f"features {self.features} must lie in 1..{self.vision.layers}")
        if self.deep_prompt_layers != self.text.layers - 1:
            problems.append(
                f"deep_prompt_layers ({self.deep_prompt_layers}) must be text.layers - 1 "
                f"({self.text.layers - 1}); the reference supports only that deep setting"
            )
        if len(self.normal_prompt_ids) != len(self.abnormal_prompt_ids):
            problems.append("normal and abnormal prompts must have the same token count")
        elif self.abnormal_prompt_ids.index(END_TOKEN_ID) != self.end_position:
            problems.append("end token must sit at the same index in both prompts")
        if self.end_position + self.prompt_len + self.deep_prompt_len > self.text.context_length:
            problems.append("prompt does not fit the text context length")
        if problems:
            raise InputError(f"config '{self.name}': " + "; ".join(problems))
        return self

    # -- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IQEConfig":
        """Build from a (possibly partial) dict; unknown keys are an error, not ignored."""
        return _from_dict(cls, data, "config").validate()


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    nested = {"vision": VisionConfig, "text": TextConfig, "iqm": IQMConfig}
    for key, value in data.items():
        if key in nested and cls is IQEConfig:
            if not isinstance(value, dict):
                raise InputError(f"{where}.{key}: expected an object, got {type(value).__name__}")
            value = _from_dict(nested[key], value, f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> IQEConfig:
    """Return the config of a preset name or of a JSON file / bundle directory.

    A string with a path separator or a .json suffix is always treated as a path, never
    matched to a preset.

    Raises:
        InputError: unknown preset (lists the known ones) or unreadable/invalid JSON.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    looks_like_path = "/" in text or text.endswith(".json") or path.exists()
    if not looks_like_path:
        preset = PRESET_DIR / f"{text}.json"
        if not preset.exists():
            raise InputError(f"unknown model preset '{text}'; known presets: {', '.join(list_presets())}")
        path = preset
    return IQEConfig.from_dict(read_config_json(path))


def read_config_json(path: Path) -> Any:
    """JSON content of a config file (InputError for a missing file or invalid JSON)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from None
