"""Import of the reference's files: OpenAI CLIP weights + an IQE-CLIP checkpoint.

The one converter for foreign checkpoints (REFERENCE.md §2, §8). It recognises the
layouts by their characteristic keys, infers every size it can from tensor shapes the
way OpenAI's `build_model` does, reproduces the reference's load-time numerics (CLIP
conv/linear/attention/projection weights rounded through float16; the 336-px positional
table resized with antialiased bicubic) and maps names onto `IQEModel`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from iqe.errors import InputError, WeightsError
from iqe.model.bundle import check_state_dict
from iqe.model.config import IQEConfig, IQMConfig, TextConfig, VisionConfig
from iqe.model.iqe import IQEModel

# CLIP tensors that the reference's loader passes through float16 (open_clip's
# convert_weights_to_lp on Conv/Linear/MultiheadAttention and the projections).
_FP16_ROUNDED = re.compile(
    r"(conv1\.weight|attn\.in_proj_(weight|bias)|attn\.out_proj\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias)"
    r"|^visual\.proj|^text_projection)$"
)
# Entries of OpenAI archives that are metadata, not weights.
_CLIP_META_KEYS = {"input_resolution", "context_length", "vocab_size"}
# Known reference entries that inference does not use.
_UNUSED_CLIP_KEYS = {"logit_scale"}
_UNUSED_CKPT_KEYS = {"prompt_text_projection"}
_CKPT_PROMPT_KEYS = ("prompt_embeddings", "deep_prompt_embeddings", "prompt_proj.", "prompt_norm.")
_CKPT_REQUIRED = ("trainable_linearlayer", "New_Lan_Embed", "iqm", "query_tokens", "query_linear")


def _strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_clip_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read OpenAI-format CLIP weights: a TorchScript archive or a plain state dict.

    Raises:
        InputError: unreadable file, or not a CLIP ViT state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such CLIP weights file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # jit.load is deprecated; OpenAI ships archives
            state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception:  # not a TorchScript archive: a pickled state dict
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{path}: neither a TorchScript archive nor a torch state dict ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = _strip_module_prefix(state)
    if "visual.proj" not in state or "visual.conv1.weight" not in state:
        raise InputError(f"{path}: not an OpenAI CLIP ViT state dict (no 'visual.proj' / 'visual.conv1.weight')")
    return {k: v for k, v in state.items() if k not in _CLIP_META_KEYS}


def read_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an IQE-CLIP checkpoint saved by the reference's training scripts.

    Raises:
        InputError: unreadable file or not the reference layout (names the missing entries).
    """
    ckpt = load_torch_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    missing = [k for k in _CKPT_REQUIRED if k not in ckpt]
    if missing:
        raise WeightsError(f"{path}: not an IQE-CLIP reference checkpoint; missing entries: {', '.join(missing)}")
    return ckpt


def load_torch_checkpoint(path: str | Path) -> Any:
    """torch.load on CPU, tensors only (InputError for a missing or unreadable file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot read torch checkpoint ({exc})") from None


def resize_positional_embedding(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a [1 + g*g, W] ViT positional table to [1 + grid*grid, W].

    The class row is kept; the grid is resized with bicubic, antialias=True,
    align_corners=False (open_clip's resize_pos_embed, used by the reference).
    A table already at `grid` is returned unchanged.
    """
    rows, width = table.shape
    if rows == grid * grid + 1:
        return table
    old = round((rows - 1) ** 0.5)
    if old * old + 1 != rows:
        raise WeightsError(f"visual.positional_embedding: {rows} rows is not 1 + a square grid")
    img = table[1:].reshape(1, old, old, width).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(grid * grid, width).to(table.dtype)
    return torch.cat([table[:1], img], dim=0)


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({m.group(1) for k in state if (m := pat.match(k))})


def infer_config(
    clip: dict[str, torch.Tensor],
    ckpt: dict[str, Any],
    features: list[int],
    iqm_json: dict[str, Any] | None,
    image_size: int = 240,
) -> IQEConfig:
    """Architecture sizes read off tensor shapes; IQM heads from the reference's JSON."""
    try:
        vision = VisionConfig(
            width=clip["visual.conv1.weight"].shape[0],
            layers=_count_blocks(clip, "visual.transformer.resblocks."),
            patch_size=clip["visual.conv1.weight"].shape[-1],
        )
        text = TextConfig(
            width=clip["ln_final.weight"].shape[0],
            layers=_count_blocks(clip, "transformer.resblocks."),
            context_length=clip["positional_embedding"].shape[0],
            vocab_size=clip["token_embedding.weight"].shape[0],
        )
        embed_dim = clip["text_projection"].shape[1]
        iqm_state = ckpt["iqm"]
        iqm_defaults = IQMConfig()
        iqm = IQMConfig(
            hidden_size=iqm_state["layernorm.weight"].shape[0],
            num_attention_heads=int((iqm_json or {}).get("num_attention_heads", iqm_defaults.num_attention_heads)),
            num_hidden_layers=_count_blocks(iqm_state, "encoder.layer."),
            intermediate_size=iqm_state["encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            layer_norm_eps=float((iqm_json or {}).get("layer_norm_eps", iqm_defaults.layer_norm_eps)),
        )
        prompt_len = ckpt["New_Lan_Embed"]["prompt_query"].shape[1]
        deep_len = ckpt["prompt_embeddings"].shape[1]
        deep_layers = ckpt["deep_prompt_embeddings"].shape[0]
    except KeyError as exc:
        raise WeightsError(f"cannot infer the architecture: missing key {exc}") from None
    n_adapters = _count_blocks(ckpt["trainable_linearlayer"], "fc.")
    if n_adapters != len(features):
        raise WeightsError(
            f"checkpoint has {n_adapters} patch adapters (trainable_linearlayer.fc.*) but --features "
            f"lists {len(features)} layers ({features})"
        )
    if iqm_json:
        for key, ours in (("hidden_size", iqm.hidden_size), ("num_hidden_layers", iqm.num_hidden_layers),
                          ("intermediate_size", iqm.intermediate_size)):
            if key in iqm_json and int(iqm_json[key]) != ours:
                raise WeightsError(f"IQM config {key}={iqm_json[key]} but the checkpoint's tensors say {ours}")
    name = "imported"
    return IQEConfig(
        name=name, image_size=image_size, embed_dim=embed_dim, vision=vision, text=text, iqm=iqm,
        features=list(features), prompt_len=prompt_len, deep_prompt_len=deep_len, deep_prompt_layers=deep_layers,
    ).validate()


def convert_reference(clip: dict[str, torch.Tensor], ckpt: dict[str, Any], cfg: IQEConfig) -> dict[str, torch.Tensor]:
    """Map reference names onto IQEModel's state dict keys, with the reference's numerics.

    Raises:
        WeightsError: unknown entries in either file (named).
    """
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in clip.items():
        value = value.detach().float()
        if _FP16_ROUNDED.search(key):
            value = value.half().float()
        if key in _UNUSED_CLIP_KEYS:
            continue
        if key == "visual.positional_embedding":
            value = resize_positional_embedding(value, cfg.grid)
        if key.startswith("visual."):
            out[key] = value
        elif key.startswith(("transformer.", "token_embedding.", "ln_final.")) or key in (
            "positional_embedding", "text_projection"):
            out[f"text.{key}"] = value
        else:
            unexpected.append(f"CLIP:{key}")
    for key, value in ckpt.items():
        if isinstance(value, dict):
            continue
        if key in _UNUSED_CKPT_KEYS or key in _CKPT_REQUIRED:
            continue
        if key.startswith(_CKPT_PROMPT_KEYS):
            out[f"text.{key}"] = value.detach().float()
        else:
            unexpected.append(f"checkpoint:{key}")
    groups = {
        "trainable_linearlayer": lambda k: re.sub(r"^fc\.", "patch_adapter.", k),
        "iqm": lambda k: f"iqm.{k}",
        "query_linear": lambda k: f"query_init.{k}",
        "New_Lan_Embed": lambda k: {"prompt_query": "cpt.tokens", "prompt_temp": "prompt_temp"}.get(
            k, k.replace("prompt_linear1.", "cpt.")),
    }
    for group, rename in groups.items():
        for key, value in ckpt[group].items():
            out[rename(key)] = value.detach().float()
    out["query_init.tokens"] = ckpt["query_tokens"].detach().float()
    if unexpected:
        raise WeightsError(f"unexpected keys: {', '.join(sorted(unexpected))}")
    return out


def import_reference(
    clip_path: str | Path,
    checkpoint_path: str | Path,
    features: list[int] | None = None,
    iqm_config_path: str | Path | None = None,
    image_size: int = 240,
) -> IQEModel:
    """Build an IQEModel from the reference's two files.

    Args:
        clip_path: OpenAI CLIP weights (TorchScript archive or state dict).
        checkpoint_path: IQE-CLIP checkpoint (torch.save dict, REFERENCE §8).
        features: 1-based vision blocks the checkpoint was trained with (default 6,12,18,24).
        iqm_config_path: the reference's IQM JSON (for `num_attention_heads`); default 8 heads.
        image_size: evaluation resolution (240 in the reference).
    Raises:
        InputError / WeightsError with the key and both shapes on any mismatch.
    """
    clip = read_clip_weights(clip_path)
    ckpt = read_reference_checkpoint(checkpoint_path)
    iqm_json = None
    if iqm_config_path is not None:
        try:
            iqm_json = json.loads(Path(iqm_config_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{iqm_config_path}: cannot read IQM config ({exc})") from None
    cfg = infer_config(clip, ckpt, features or [6, 12, 18, 24], iqm_json, image_size)
    state = convert_reference(clip, ckpt, cfg)
    model = IQEModel(cfg)
    check_state_dict(model, state, f"{clip_path} + {checkpoint_path}")
    model.load_state_dict(state)
    return model.eval()
