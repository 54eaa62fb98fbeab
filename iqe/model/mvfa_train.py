"""MVFA training with the reference's recipe (train_few.py / train_zero.py; MVFA.md §6).

Frozen CLIP, only the 8 adapters train, two Adam optimisers (seg, det; betas (0.5, 0.999)),
batch 1, shuffled. Loss per level: BCEWithLogits(patch-mean softmax(100 cos(det, T))[:, 1],
label) (the reference feeds the probability as the logit; kept), plus on segmentation sets
focal + dice on softmax(bilinear(100 cos(seg, T))) against the mask (iqe.model.train's
focal_loss / dice_loss, the same loss.py).
- few: the K abnormal (with masks) and K normal picks of the `valid` split (the reference's
  seed file when present), 11x augmented as the bank (masks warped alike); lr 1e-3; the bank
  is rebuilt from the augmented normals after every epoch.
- zero: the `test` splits of the other data sets, each with its own organ's text features
  (stored in the bundle at import); lr 1e-4.
Deviation, on purpose: the reference selects the epoch on the target's test set; here the
epoch is selected on a validation split: the target's `valid` images not used as shots.
Scores for selection follow the reference's test scripts, with their min-max fusion taken
over that validation split; the saved bundle keeps those constants (fusion_source says so).
The reference trains under CUDA autocast; this trainer runs float32.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from iqe.errors import InputError
from iqe.model.bank import augment, bank_features, with_bank
from iqe.model.mvfa import LOGIT_SCALE, ORGAN_NAMES, SEGMENTATION_ORGANS, MVFAModel, normalize_rows
from iqe.model.train import dice_loss, focal_loss, roc_auc


@dataclass
class MVFATrainOptions:
    data: str
    target: str
    setting: str = "few"  # few | zero
    shots: int = 4
    epochs: int = 50
    lr: float | None = None  # default: 1e-3 few, 1e-4 zero (the reference's defaults)
    seed: int = 111
    max_steps_per_epoch: int | None = None


def adapter_loss(model: MVFAModel, image: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None,
                 text: torch.Tensor) -> torch.Tensor:
    """The reference's per-image loss summed over levels (det BCE; + seg focal + dice with a mask)."""
    seg, det = model.encode(image)
    loss = image.new_zeros(())
    for k in range(det.shape[0]):
        p = (LOGIT_SCALE * normalize_rows(det[k, :, 1:])) @ text
        loss = loss + F.binary_cross_entropy_with_logits(p.softmax(dim=-1)[..., 1].mean(dim=-1), label)
    if mask is not None:
        logits = (LOGIT_SCALE * normalize_rows(seg[:, :, 1:])) @ text  # [K, B, L, 2]
        probs = model._upsample(logits).softmax(dim=2)
        for k in range(probs.shape[0]):
            loss = loss + focal_loss(probs[k], mask) + dice_loss(probs[k][:, 1], mask)
    return loss


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / max(float(x.max() - x.min()), 1e-12)


@torch.no_grad()
def evaluate(model: MVFAModel, images: torch.Tensor, labels: np.ndarray, masks: np.ndarray | None) -> dict:
    """The reference test scripts' metrics on a labelled set (test-set min-max fusion over this set)."""
    outs = [model.heads(*model.encode(images[i:i + 4])) for i in range(0, len(images), 4)]
    out = {k: torch.cat([o[k] for o in outs]).numpy() for k in outs[0]}
    metrics: dict = {"ranges": {k: [float(v.min()), float(v.max())] for k, v in out.items()}}
    few = "map_few" in out
    if model.cfg.segmentation:
        fused = 0.5 * _minmax(out["map_zero"]) + 0.5 * _minmax(out["map_few"]) if few else _minmax(out["map_zero"])
        image_scores = fused.reshape(len(fused), -1).max(axis=1) if few else out["score_zero"]
        metrics["image_auc"] = roc_auc(image_scores, labels)
        if masks is not None:
            metrics["pixel_auc"] = roc_auc(fused[:, ::4, ::4].ravel(), masks[:, ::4, ::4].ravel())
    else:
        scores = 0.5 * _minmax(out["score_zero"]) + 0.5 * _minmax(out["score_few"]) if few else out["score_zero"]
        metrics["image_auc"] = roc_auc(scores, labels)
    return metrics


def _selection(m: dict) -> float:
    return sum(v for v in (m.get("image_auc"), m.get("pixel_auc")) if v is not None and np.isfinite(v))


def _load(samples, size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    from iqe.model.data import SampleDataset

    items = [SampleDataset(samples, size)[i] for i in range(len(samples))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]),
            np.array([it["label"].item() for it in items]))


def _splits(opts: MVFATrainOptions):
    from iqe.model.data import few_shot_split, list_split, zero_shot_split

    root = Path(opts.data)
    if opts.setting == "few":
        shots, _ = few_shot_split(root, opts.target, opts.shots, opts.seed)
        used = {s.image for s in shots}
        val = [s for s in list_split(root, opts.target, "valid") if s.image not in used]
    else:
        shots, _ = zero_shot_split(root, opts.target)
        val = list_split(root, opts.target, "valid") if (root / f"{opts.target}_AD" / "valid").is_dir() else []
    if len({s.label for s in val}) < 2:
        raise InputError(f"{root}/{opts.target}_AD/valid: the validation split needs normal and abnormal images "
                         "besides the shots (the test split is never used for model selection)")
    return shots, val


def train_mvfa(model: MVFAModel, opts: MVFATrainOptions, out: str | Path, progress: bool = True) -> dict:
    """Train the adapters of `model` in place; write the best epoch (by validation) as a bundle."""
    from iqe.model.bundle import save_bundle

    if opts.setting not in ("few", "zero"):
        raise InputError(f"setting must be few or zero, got '{opts.setting}'")
    if opts.target not in ORGAN_NAMES:
        raise InputError(f"target '{opts.target}' is not a reference data set ({', '.join(ORGAN_NAMES)})")
    torch.manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    lr = opts.lr or (1e-3 if opts.setting == "few" else 1e-4)
    size = model.cfg.image_size
    model.cfg = dataclasses.replace(model.cfg, segmentation=opts.target in SEGMENTATION_ORGANS)
    train_samples, val_samples = _splits(opts)
    val_images, val_masks, val_labels = _load(val_samples, size)
    val_masks_np = val_masks.numpy() if model.cfg.segmentation else None
    organ_index = {o: i for i, o in enumerate(ORGAN_NAMES)}
    if opts.setting == "few":
        images, masks, labels = _load(train_samples, size)
        normal = images[labels == 0]
        abnormal, abnormal_masks = images[labels == 1], masks[labels == 1][:, None]
        # masks go through the same warps; the reference binarises them at 0.5 before the loss
        aug_masks = (augment(abnormal_masks)[:, 0] > 0.5).float()
        items = [(img, 1.0, m, opts.target) for img, m in zip(augment(abnormal), aug_masks)]
        items += [(img, 0.0, torch.zeros(size, size), opts.target) for img in augment(normal)]
    else:
        items = [(s, float(s.label), None, s.obj) for s in train_samples]
        missing = sorted({s.obj for s in train_samples if not model.organ_text_features[organ_index[s.obj]].any()})
        if missing:
            raise InputError(f"zero-shot training needs the text features of {', '.join(missing)}: "
                             "re-import with `iqe import-reference --family mvfa --all-organs`")
    for p in model.visual.parameters():
        p.requires_grad_(False)
    opt_seg = torch.optim.Adam(model.seg_adapters.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_det = torch.optim.Adam(model.det_adapters.parameters(), lr=lr, betas=(0.5, 0.999))
    best = {"score": -1.0, "epoch": None, "metrics": None, "state": None}
    history = []
    for epoch in range(opts.epochs):
        model.train()
        model.visual.eval()
        order = list(range(len(items)))
        rng.shuffle(order)
        order = order[:opts.max_steps_per_epoch] if opts.max_steps_per_epoch else order
        losses = []
        for i in tqdm(order, desc=f"epoch {epoch + 1}", disable=not progress, leave=False):
            image, label, mask, obj = items[i]
            if opts.setting == "zero":
                sample = image
                image, mask, _ = _load([sample], size)
                mask = mask if sample.has_mask else None
                image = image[0]
            seg_set = obj in SEGMENTATION_ORGANS
            text = model.organ_text_features[organ_index[obj]] if opts.setting == "zero" else model.text_features
            loss = adapter_loss(model, image[None], torch.tensor([label]), mask[None] if (seg_set and mask is not None)
                                else None, text)
            opt_seg.zero_grad()
            opt_det.zero_grad()
            loss.backward()
            if seg_set:
                opt_seg.step()
            opt_det.step()
            losses.append(float(loss.detach()))
        model.eval()
        scored = model
        if opts.setting == "few":
            scored = with_bank(model, bank_features(model, normal), [s.image for s in train_samples if s.label == 0],
                               opts.shots)
        metrics = evaluate(scored, val_images, val_labels, val_masks_np)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                        **{k: v for k, v in metrics.items() if k != "ranges"}})
        if progress:
            print(f"epoch {epoch + 1}: {history[-1]}", file=sys.stderr)
        if _selection(metrics) > best["score"]:
            best = {"score": _selection(metrics), "epoch": epoch + 1, "metrics": metrics,
                    "state": {k: v.detach().clone() for k, v in scored.state_dict().items()}, "cfg": scored.cfg}
    final = MVFAModel(best["cfg"])
    final.load_state_dict(best["state"])
    r = best["metrics"]["ranges"]
    if final.cfg.bank_rows:
        zero, few = ("map_zero", "map_few") if final.cfg.segmentation else ("score_zero", "score_few")
        final.cfg = dataclasses.replace(final.cfg, fusion_zero=r[zero], fusion_few=r[few],
                                        fusion_source=f"validation split ({len(val_samples)} images), epoch {best['epoch']}")
    save_bundle(final.eval(), out, extra={"trained": {"setting": opts.setting, "target": opts.target, "lr": lr,
                                                      "best_epoch": best["epoch"], "history": history,
                                                      "selection": "validation split (not the test set)"}},
                force=True)  # `iqe train` checked --out before training
    return {"best_epoch": best["epoch"], "validation": {k: v for k, v in best["metrics"].items() if k != "ranges"},
            "history": history, "bundle": str(out)}


def train_command(model: MVFAModel, args) -> int:
    """`iqe train --init MVFA_BUNDLE`: the reference's recipe, selection on a validation split."""
    import json

    opts = MVFATrainOptions(data=str(args.data), target=args.target, setting=args.setting, shots=args.shots,
                            epochs=args.epochs, lr=args.lr, seed=args.seed,
                            max_steps_per_epoch=args.max_steps)
    summary = train_mvfa(model, opts, args.out, progress=not args.quiet)
    print(f"best epoch {summary['best_epoch']}: {json.dumps(summary['validation'])} -> {args.out}", file=sys.stderr)
    return 0
