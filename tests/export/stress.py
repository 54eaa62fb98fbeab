"""Stress checkpoints for the FP16 policy: sharp attention and text temperature 100.

Test and benchmark support. A trained CLIP can have attention far sharper than random
weights give, and IQE-CLIP's learnable prompt_temp can reach CLIP's own logit scale of
100; both amplify FP16 rounding into visible map changes (issue 7).
"""

from __future__ import annotations

import math

import torch

from iqe.model.iqe import IQEModel


def sharpen_(model: IQEModel, qk_scale: dict[int, float], temperature: float = 100.0) -> IQEModel:
    """Scale the q and k in-projections of the given 1-based vision blocks; set exp(prompt_temp)."""
    w = model.cfg.vision.width
    with torch.no_grad():
        for block, s in qk_scale.items():
            attn = model.visual.transformer.resblocks[block - 1].attn
            attn.in_proj_weight[: 2 * w] *= s
            attn.in_proj_bias[: 2 * w] *= s
        model.prompt_temp.fill_(math.log(temperature))
    model.invalidate_text_prefix()
    return model
