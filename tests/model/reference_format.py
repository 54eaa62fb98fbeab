"""Write the reference's two files (OpenAI CLIP weights + IQE checkpoint) from an IQEModel.

Test support only: lays tensors out under the reference's names (REFERENCE.md §8) so the
importer can be exercised on files in the real formats.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from iqe.model.iqe import IQEModel


def round_clip_to_fp16_(model: IQEModel) -> IQEModel:
    """Make the CLIP towers fp16-representable, like OpenAI's released weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("visual.", "text.")) and "prompt" not in name:
                p.copy_(p.half().float())
    model.invalidate_text_prefix()
    return model


def reference_state(model: IQEModel, clip_dtype=torch.float16) -> tuple[dict, dict]:
    """(OpenAI CLIP state dict, reference checkpoint dict) holding `model`'s weights."""
    clip, ckpt = {}, {"trainable_linearlayer": {}, "New_Lan_Embed": {}, "iqm": {}, "query_linear": {}}
    for key, value in model.state_dict().items():
        v = value.detach().clone()
        if key.startswith("visual."):
            clip[key] = v.to(clip_dtype)
        elif key.startswith("text.") and "prompt" in key:
            ckpt[key[len("text."):]] = nn.Parameter(v)
        elif key.startswith("text."):
            clip[key[len("text."):]] = v.to(clip_dtype)
        elif key.startswith("patch_adapter."):
            ckpt["trainable_linearlayer"]["fc." + key[len("patch_adapter."):]] = v
        elif key.startswith("iqm."):
            ckpt["iqm"][key[len("iqm."):]] = v
        elif key == "query_init.tokens":
            ckpt["query_tokens"] = nn.Parameter(v)
        elif key.startswith("query_init."):
            ckpt["query_linear"][key[len("query_init."):]] = v
        elif key == "cpt.tokens":
            ckpt["New_Lan_Embed"]["prompt_query"] = v
        elif key.startswith("cpt."):
            ckpt["New_Lan_Embed"]["prompt_linear1." + key[len("cpt."):]] = v
        elif key == "prompt_temp":
            ckpt["New_Lan_Embed"]["prompt_temp"] = v
        else:
            raise AssertionError(f"unmapped key {key}")
    clip["logit_scale"] = torch.tensor(4.6052)
    width = model.cfg.text.width
    ckpt["prompt_text_projection"] = nn.Parameter(torch.randn(width, model.cfg.embed_dim))
    return clip, ckpt


class _Holder(nn.Module):
    """A scriptable module tree whose state_dict() has exactly the given flat keys."""

    def forward(self) -> int:
        return 0


def _as_module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    root = _Holder()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    return root


def write_reference_files(model: IQEModel, folder: Path, jit: bool = False, clip_dtype=torch.float16,
                          pos_table: torch.Tensor | None = None) -> tuple[Path, Path]:
    """Save clip weights (plain state dict or TorchScript archive) and the checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    clip, ckpt = reference_state(model, clip_dtype)
    if pos_table is not None:
        clip["visual.positional_embedding"] = pos_table.to(clip_dtype)
    clip_path = folder / ("clip_jit.pt" if jit else "clip.pt")
    if jit:
        torch.jit.save(torch.jit.script(_as_module_tree(clip)), str(clip_path))
    else:
        torch.save(clip, clip_path)
    ckpt_path = folder / "iqe.pth"
    torch.save(ckpt, ckpt_path)
    return clip_path, ckpt_path
