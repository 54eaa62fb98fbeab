"""Export-ready modules: the image encoder, the precomputed text branch, the head, and
the fused image -> outputs graph (REFERENCE.md §2-6).

Design choices made for deployment:
- The text branch bakes the image-independent prefix (keys/values of every position
  before the first CPT token, in every block) in as constants; per image only the r CPT
  positions run through the 12 blocks.
- The head runs the IQM once over all tapped layers (layers folded into the batch).
- `map_smooth` is scipy's gaussian_filter as two separable 1-D convolutions with
  half-sample symmetric ("reflect" in scipy's naming) padding, radius int(4 sigma + 0.5).
- FP16 (`precision="fp16"`) follows the bundle's precision policy (iqe.export.precision):
  FP16 GEMMs (FP32 accumulation) in the vision blocks the policy names, everything else
  float32 — residual stream, LayerNorm, attention logits and softmax, the text branch and
  head (normalisations, exp(prompt_temp) logits, softmaxes, maps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iqe.model.iqe import IQEModel

HEAD_OUTPUTS = ("score", "score_query", "score_text", "score_few", "map", "map_query", "map_text", "map_smooth",
                "map_max")


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian weights (radius int(truncate * sigma + 0.5)), float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def gaussian_smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over the last two axes of [B, H, W] with half-sample symmetric padding.

    Equals scipy.ndimage.gaussian_filter(mode='reflect') per image. The padding is built
    from flipped slices, so it needs only Slice/Concat in ONNX.
    """
    r = kernel.numel() // 2
    x = maps[:, None]
    k = kernel.to(maps.dtype)
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def cast_vision_fp16(model: IQEModel, policy=None) -> IQEModel:
    """A copy of `model` whose vision blocks run the bundle's FP16 precision policy.

    `policy`: an `iqe.export.precision.PrecisionPolicy`; None measures (or reads from the
    cache) the policy of these weights (`policy_for_model`). Raises PrecisionRefused when
    no FP16 policy keeps the model within the fp16 fidelity contract.
    """
    from iqe.export.precision import policy_for_model, with_policy

    return with_policy(model, policy if policy is not None else policy_for_model(model, log=print))


class ImageEncoderGraph(nn.Module):
    """images [B,3,S,S] f32 -> global_feature [B,E] f32, tokens [B,K,1+G*G,W] f32."""

    def __init__(self, model: IQEModel):
        super().__init__()
        self.visual = model.visual

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, taps = self.visual(images)
        return g.float(), torch.stack(taps, dim=1).float()


class TextBranchGraph(nn.Module):
    """global_feature [B,E] -> text [B,2,E]; the prefix keys/values are constants."""

    def __init__(self, model: IQEModel):
        super().__init__()
        self.cpt = model.cpt
        self.text = model.text
        with torch.no_grad():
            prefix = model.text.compute_prefix()
        self.prefix_keys = nn.ParameterList([nn.Parameter(k.clone(), requires_grad=False) for k in prefix.keys])
        self.prefix_values = nn.ParameterList([nn.Parameter(v.clone(), requires_grad=False) for v in prefix.values])

    def forward(self, global_feature: torch.Tensor) -> torch.Tensor:
        from iqe.model.clip import TextPrefix

        prefix = TextPrefix(list(self.prefix_keys), list(self.prefix_values))
        return self.text.forward_prefixed(self.cpt(global_feature), prefix)


class HeadGraph(nn.Module):
    """(global_feature, text, tokens) -> scores [B] and maps [B,S,S] (see HEAD_OUTPUTS)."""

    def __init__(self, model: IQEModel):
        super().__init__()
        self.model = model
        self.register_buffer("kernel", gaussian_kernel(model.cfg.sigma).float(), persistent=False)

    def forward(self, global_feature: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        q0 = m.query_init(global_feature)
        feats = torch.stack([fc(tokens[:, k, 1:]) for k, fc in enumerate(m.patch_adapter)])
        out = m.outputs(*m.logits(q0, text, feats))
        smooth = gaussian_smooth(out["map"], self.kernel)
        return (*(out[k] for k in HEAD_OUTPUTS[:7]), smooth, smooth.flatten(1).amax(dim=1))


class FusedGraph(nn.Module):
    """images [B,3,S,S] -> HEAD_OUTPUTS in one graph."""

    def __init__(self, model: IQEModel, vision_model: IQEModel | None = None):
        super().__init__()
        self.encoder = ImageEncoderGraph(vision_model or model)
        self.text = TextBranchGraph(model)
        self.head = HeadGraph(model)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g, tokens = self.encoder(images)
        return self.head(g, self.text(g), tokens)
