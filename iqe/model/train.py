"""Training (REFERENCE.md §7): frozen CLIP, trainable heads and text prompts.

Trainable: patch adapter, query init, CPT (its `prompt_temp` in its own group at lr 0.01),
IQM and the text tower's `prompt_*` parameters. Adam(betas 0.5, 0.999). Loss per tapped
layer and per branch (query, text): BCE-with-logits on the patch score (the reference
feeds the probability in as the logit) + focal and dice on the 2-channel map where masks
exist. Checkpoints are written every epoch (atomically) and `resume=True` continues; the
best epoch by validation (image AUC + pixel AUC) is written as a bundle.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch.utils.data import DataLoader
from tqdm import tqdm

from iqe.errors import InputError
from iqe.model.bundle import save_bundle
from iqe.model.data import SampleDataset, few_shot_split, group_batches, zero_shot_split
from iqe.model.iqe import IQEModel, smooth_outputs

CKPT_NAME = "train_state.pt"


@dataclass
class TrainOptions:
    data: str  # BMAD root
    target: str  # target object, e.g. "Brain"
    setting: str = "zero"  # zero | few
    shots: int = 4  # K for few-shot
    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-4  # the reference's code (the paper says 1e-3)
    temp_lr: float = 0.01  # prompt_temp's own group
    seed: int = 42
    val_batch_size: int = 16
    max_steps_per_epoch: int | None = None  # cap for quick runs
    history: list[dict] = field(default_factory=list)


# -- losses (reference loss.py semantics) ------------------------------------------------
def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on 2-channel probability maps [B,2,H,W] vs a 0/1 mask [B,H,W].

    As the reference: one-hot targets clamped to [smooth, 1 - smooth], pt = <onehot, p> + smooth.
    """
    p = probs.permute(0, 2, 3, 1).reshape(-1, 2)
    onehot = F.one_hot(target.reshape(-1).long(), 2).float().clamp(smooth, 1.0 - smooth)
    pt = (onehot * p).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean Dice (smooth 1) of the anomaly channel [B,H,W] vs mask [B,H,W]."""
    n = target.shape[0]
    p, t = prob.reshape(n, -1), target.reshape(n, -1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return 1 - dice.sum() / n


def training_loss(model: IQEModel, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                  has_mask: torch.Tensor) -> torch.Tensor:
    """Sum over tapped layers and both branches of BCE (+ focal + dice where masks exist)."""
    with torch.no_grad():
        g, taps = model.visual(images)
    q0 = model.query_init(g)
    text = model.text.forward_prefixed(model.cpt(g), model.text_prefix())
    feats = torch.stack([fc(t[:, 1:]) for fc, t in zip(model.patch_adapter, taps)])
    loss = images.new_zeros(())
    seg = has_mask.bool()
    for logits in model.logits(q0, text, feats):
        patch_scores = logits.softmax(dim=-1)[..., 1].mean(dim=-1)  # [K, B]
        for k in range(patch_scores.shape[0]):
            # The reference passes the probability as the logit; kept for parity of training.
            loss = loss + F.binary_cross_entropy_with_logits(patch_scores[k], labels)
        if seg.any():
            kk, b, n, _ = logits.shape
            grid = model.cfg.grid
            up = F.interpolate(logits[:, seg].permute(0, 1, 3, 2).reshape(-1, 2, grid, grid),
                               size=model.cfg.image_size, mode="bilinear", align_corners=True).softmax(dim=1)
            up = up.view(kk, int(seg.sum()), 2, model.cfg.image_size, model.cfg.image_size)
            for k in range(kk):
                loss = loss + focal_loss(up[k], masks[seg]) + dice_loss(up[k][:, 1], masks[seg])
    return loss


# -- metrics --------------------------------------------------------------------------------
def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties averaged); NaN if one class."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model: IQEModel, samples, batch_size: int = 16, progress: bool = False) -> dict[str, float]:
    """Image AUC of `score` (and pixel AUC of `map_smooth` where masks exist)."""
    model.eval()
    loader = DataLoader(SampleDataset(samples, model.cfg.image_size), batch_size=batch_size, shuffle=False)
    scores, max_scores, labels, pix_scores, pix_labels = [], [], [], [], []
    for batch in tqdm(loader, desc="validate", leave=False, disable=not progress):
        out = smooth_outputs({k: v.numpy() for k, v in model(batch["image"]).items()}, model.cfg.sigma)
        scores.append(out["score"])
        max_scores.append(out["map_max"])
        labels.append(batch["label"].numpy())
        sel = batch["has_mask"].numpy().astype(bool) | (batch["label"].numpy() == 0)
        if batch["has_mask"].any():
            pix_scores.append(out["map_smooth"][sel][:, ::4, ::4].ravel())  # every 4th pixel keeps it fast
            pix_labels.append(batch["mask"].numpy()[sel][:, ::4, ::4].ravel())
    labels = np.concatenate(labels)
    metrics = {"image_auc": roc_auc(np.concatenate(scores), labels),
               # the paper's image score (max of the smoothed map), reported beside the reference code's
               "image_auc_map_max": roc_auc(np.concatenate(max_scores), labels)}
    if pix_scores:
        metrics["pixel_auc"] = roc_auc(np.concatenate(pix_scores), np.concatenate(pix_labels))
    return metrics


def _selection_score(m: dict[str, float]) -> float:
    return sum(v for v in (m.get("image_auc"), m.get("pixel_auc")) if v is not None and np.isfinite(v))


def trainable_parameters(model: IQEModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(main group, prompt_temp group); freezes everything else (the CLIP towers)."""
    main, temp = [], []
    for name, param in model.named_parameters():
        is_text_prompt = name.startswith("text.prompt_") or name.startswith("text.deep_prompt_")
        trainable = not name.startswith(("visual.", "text.")) or is_text_prompt
        param.requires_grad_(trainable)
        if name == "prompt_temp":
            temp.append(param)
        elif trainable:
            main.append(param)
    return main, temp


def _augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-shot augmentation: random flips and 90-degree rotations of image and mask together."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    images, masks = torch.rot90(images, k, dims=(-2, -1)), torch.rot90(masks, k, dims=(-2, -1))
    if flip:
        images, masks = images.flip(-1), masks.flip(-1)
    return images, masks


def train(model: IQEModel, opts: TrainOptions, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train `model` in place and write the best bundle to `out`.

    Args:
        model: initial model (an imported bundle, or a preset with random CLIP for tests).
        opts: data, target, setting and hyper-parameters.
        out: bundle directory; the resumable state goes to `<out>.train/`.
        resume: continue from `<out>.train/train_state.pt` if present.
    Returns:
        Summary with the best epoch and its validation metrics.
    Raises:
        InputError: bad data root/target/setting.
    """
    if opts.setting not in ("zero", "few"):
        raise InputError(f"--setting must be 'zero' or 'few', got '{opts.setting}'")
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    if opts.setting == "zero":
        train_samples, val_samples = zero_shot_split(opts.data, opts.target)
    else:
        train_samples, val_samples = few_shot_split(opts.data, opts.target, opts.shots, seed=opts.seed)
    out = Path(out)
    state_dir = out.with_name(out.name + ".train")
    state_dir.mkdir(parents=True, exist_ok=True)
    main, temp = trainable_parameters(model)
    optimizer = torch.optim.Adam([{"params": main, "lr": opts.lr}, {"params": temp, "lr": opts.temp_lr}],
                                 lr=opts.lr, betas=(0.5, 0.999))
    start_epoch, best = 0, {"score": -1.0, "epoch": None, "metrics": None}
    ckpt_path = state_dir / CKPT_NAME
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, opts.history = state["epoch"] + 1, state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])
    generator = torch.Generator().manual_seed(opts.seed)
    dataset = SampleDataset(train_samples, model.cfg.image_size)
    for epoch in range(start_epoch, opts.epochs):
        model.train()
        model.visual.eval()  # frozen tower: no dropout anyway, but keep it in eval
        if opts.setting == "zero":
            batches = group_batches(train_samples, opts.batch_size, seed=opts.seed + epoch)
        else:
            order = torch.randperm(len(train_samples), generator=generator).tolist()
            batches = [order[j:j + opts.batch_size] for j in range(0, len(order), opts.batch_size)]
        if opts.max_steps_per_epoch:
            batches = batches[: opts.max_steps_per_epoch]
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{opts.epochs}", unit="batch", disable=not progress)
        for batch_indices in bar:
            items = [dataset[i] for i in batch_indices]
            images = torch.stack([it["image"] for it in items])
            masks = torch.stack([it["mask"] for it in items])
            if opts.setting == "few":
                images, masks = _augment(images, masks, generator)
            labels = torch.stack([it["label"] for it in items]).float()
            has_mask = torch.tensor([bool(it["has_mask"]) for it in items])
            loss = training_loss(model, images, labels, masks, has_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        metrics = evaluate(model, val_samples, opts.val_batch_size, progress=progress)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, **metrics}
        opts.history.append(record)
        if progress:
            tqdm.write("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if _selection_score(metrics) > best["score"]:
            best = {"score": _selection_score(metrics), "epoch": epoch + 1, "metrics": metrics}
            save_bundle(model, out, extra={"trained_with": "iqe train", "options": asdict(opts) | {"history": None},
                                           "best_epoch": epoch + 1, "validation": metrics},
                        force=True)  # replaces this run's earlier best; `iqe train` checked --out before training
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best,
                    "history": opts.history, "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, ckpt_path)
    model.eval()
    summary = {"best_epoch": best["epoch"], "validation": best["metrics"], "history": opts.history, "bundle": str(out)}
    (state_dir / "history.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
