"""Per-bundle FP16 precision policy, chosen by measurement on calibration images.

A policy names, per vision block, which GEMMs run in FP16 (`iqe.model.layers.FP16_OPS`:
FP16 inputs and weights, FP32 accumulation). Everything else stays float32: the residual
stream, LayerNorm, the attention logits and softmax, GELU, the patch embedding, and
everything after the taps (text branch, IQM head, maps). The same policy object drives
the torch backend (explicit casts in `iqe.model.layers`), the ONNX graph that ONNX
Runtime runs, and the strongly typed TensorRT network built from that ONNX (precision
lives in the graph's types).

Choosing it (`choose_fp16_policy`), Polygraphy-style:
1. every GEMM of every block in FP16; done if the gate passes;
2. else a per-block sensitivity sweep (one block in FP16 at a time);
3. bisection on the blocks ordered by sensitivity: the longest harmless prefix goes FP16;
4. per op class refinement of the remaining blocks (MLP GEMMs first: 2/3 of a block's FLOPs).
Candidates are evaluated in PyTorch by emulating FP16 rounding (cast to half and back) in
float32 arithmetic, so the sweep runs on any CPU; the residual stream before the first
FP16 block is replayed from the float32 run instead of recomputed. The chosen policy is
then exported for real and verified in ONNX Runtime by the caller.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iqe.export.fidelity import DriftReport, compare
from iqe.model.layers import FP16_OPS, FP32, BlockPrecision

POLICY_FORMAT = 1
MLP_OPS = ("mlp_fc", "mlp_proj")


@dataclass
class PrecisionPolicy:
    """FP16 GEMMs per vision block (1-based block number -> op classes); the rest is float32."""

    blocks: dict[int, list[str]] = field(default_factory=dict)
    fp16_flop_fraction: float = 0.0  # of the vision tower's multiply-adds
    calibration: dict[str, Any] = field(default_factory=dict)  # images, source
    sweep: dict[str, Any] = field(default_factory=dict)  # evaluations, per-block sensitivity, gate numbers
    format: int = POLICY_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = {str(k): sorted(v, key=FP16_OPS.index) for k, v in sorted(self.blocks.items())}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrecisionPolicy":
        data = dict(data)
        blocks = {int(k): list(v) for k, v in data.pop("blocks", {}).items()}
        unknown = {op for ops in blocks.values() for op in ops} - set(FP16_OPS)
        if unknown:
            from iqe.errors import InputError

            raise InputError(f"precision policy: unknown op class(es) {sorted(unknown)}; known: {', '.join(FP16_OPS)}")
        return cls(blocks=blocks, **data)

    @classmethod
    def everything(cls, layers: int) -> "PrecisionPolicy":
        """Every GEMM of every block in FP16 (the naive policy, the sweep's upper bound)."""
        return cls({b: list(FP16_OPS) for b in range(1, layers + 1)})

    def describe(self) -> str:
        full = [b for b, ops in sorted(self.blocks.items()) if set(ops) == set(FP16_OPS)]
        part = {b: ops for b, ops in sorted(self.blocks.items()) if ops and set(ops) != set(FP16_OPS)}
        text = f"FP16 GEMMs in blocks {_ranges(full) or 'none'}"
        if part:
            text += "; partly in " + ", ".join(f"{b} ({'+'.join(ops)})" for b, ops in part.items())
        return text + f" ({100 * self.fp16_flop_fraction:.0f}% of vision FLOPs)"


def _ranges(values: Sequence[int]) -> str:
    out, values = [], sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


# -- FLOPs -------------------------------------------------------------------------------------
def vision_macs(cfg) -> tuple[dict[str, int], int]:
    """(multiply-adds per block by op class, total multiply-adds of the vision tower) per image."""
    v = cfg.vision
    n, w = cfg.grid * cfg.grid + 1, v.width
    per_block = {"qkv": 3 * n * w * w, "logits": n * n * w, "attn_v": n * n * w, "out_proj": n * w * w,
                 "mlp_fc": 4 * n * w * w, "mlp_proj": 4 * n * w * w}
    patch = 3 * v.patch_size**2 * w * cfg.grid**2
    total = patch + v.layers * sum(per_block.values()) + w * cfg.embed_dim
    return per_block, total


def fp16_flop_fraction(cfg, blocks: dict[int, list[str]]) -> float:
    per_block, total = vision_macs(cfg)
    return sum(per_block[op] for ops in blocks.values() for op in ops) / total


# -- applying ------------------------------------------------------------------------------------
def apply_policy(model: nn.Module, policy: PrecisionPolicy | None, emulate: bool = False) -> nn.Module:
    """Set every vision block's precision from `policy` (None: all float32), in place; returns `model`."""
    blocks = model.visual.transformer.resblocks
    bad = [b for b in (policy.blocks if policy else {}) if not 1 <= b <= len(blocks)]
    if bad:
        from iqe.errors import InputError

        raise InputError(f"precision policy names block(s) {bad}; the vision tower has {len(blocks)}")
    for i, block in enumerate(blocks, start=1):
        ops = frozenset(policy.blocks.get(i, ())) if policy else frozenset()
        block.precision = BlockPrecision(ops, emulate) if ops else FP32
    return model


def with_policy(model: nn.Module, policy: PrecisionPolicy | None) -> nn.Module:
    """A copy of `model` whose vision blocks run `policy` with real FP16 casts (torch and export)."""
    return apply_policy(copy.deepcopy(model), policy, emulate=False)


# -- calibration images --------------------------------------------------------------------------
def synthetic_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`n` realistic model inputs from iqe.model.synth (organs, half with lesions): (images, names, labels)."""
    from PIL import Image

    from iqe.model.preprocess import pil_to_tensor_array
    from iqe.model.synth import DEFAULT_OBJECTS, synth_image

    images, names, labels = [], [], []
    for i in range(n):
        obj, abnormal = DEFAULT_OBJECTS[i % len(DEFAULT_OBJECTS)], bool((i // len(DEFAULT_OBJECTS)) % 2)
        img, _ = synth_image(obj, abnormal, np.random.default_rng([seed, i]))
        images.append(pil_to_tensor_array(Image.fromarray(img), size))
        names.append(f"synthetic/{obj}_{'Ungood' if abnormal else 'good'}_{i:03d}")
        labels.append(int(abnormal))
    return np.stack(images) if images else np.zeros((0, 3, size, size), np.float32), names, np.array(labels)


def calibration_images(calib: str | Path | None, n: int, size: int, seed: int = 0
                       ) -> tuple[np.ndarray, list[str], np.ndarray | None, str]:
    """Images for the sweep and the gate: the user's (`calib` folder, read through the runtime) or synthetic.

    Returns (images [N,3,S,S], names, labels or None, source description).
    """
    if calib is None:
        images, names, labels = synthetic_images(n, size, seed)
        return images, names, labels, f"synthetic ({n} images, iqe.model.synth seed {seed})"
    from iqe.errors import InputError
    from iqe.runtime.scoring import iter_input_items

    images, names = [], []
    for item in iter_input_items([calib], size):
        if item.image is not None:
            images.append(item.image)
            names.append(item.key)
        if len(images) == n:
            break
    if not images:
        raise InputError(f"--calib {calib}: no readable image in it (PNG/JPEG/TIFF, DICOM, NIfTI)")
    return np.stack(images).astype(np.float32), names, None, f"{calib} ({len(images)} images)"


# -- evaluating candidates -----------------------------------------------------------------------
class _Replay(nn.Module):
    """Stands in for a float32 block before the first FP16 block: returns its recorded output."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = outputs
        self.batch = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.outputs[self.batch]


class PolicyEvaluator:
    """Outputs of `model` under candidate policies on fixed images, float32 prefix replayed.

    Args:
        model: float32 IQEModel (not modified outside `outputs`).
        images: [N,3,S,S] float32.
        batch: images per forward.
    """

    def __init__(self, model: nn.Module, images: np.ndarray, batch: int = 8, progress: Callable[[str], None] | None = None):
        self.model = model.float().eval()
        self.batches = [torch.from_numpy(images[i:i + batch]) for i in range(0, len(images), batch)]
        self.blocks = list(model.visual.transformer.resblocks)
        self.recorded: list[list[torch.Tensor]] = [[] for _ in self.blocks]  # [block][batch] outputs
        self.evaluations = 0
        self.progress = progress
        apply_policy(self.model, None)
        hooks = [b.register_forward_hook(self._recorder(i)) for i, b in enumerate(self.blocks)]
        try:
            self.reference = self._run(start=0)
        finally:
            for h in hooks:
                h.remove()

    def _recorder(self, i: int):
        def hook(module, args, output):
            self.recorded[i].append(output.detach())
        return hook

    def _run(self, start: int) -> dict[str, np.ndarray]:
        resblocks = self.model.visual.transformer.resblocks
        replays = [_Replay(self.recorded[i]) for i in range(start)]
        for i, r in enumerate(replays):
            resblocks[i] = r
        parts = []
        try:
            with torch.no_grad():
                for j, images in enumerate(self.batches):
                    for r in replays:
                        r.batch = j
                    # forward(), not score(): the smoothed map follows from `map`, and
                    # skipping the Gaussian keeps a sweep step cheap.
                    parts.append({k: v.numpy() for k, v in self.model(images).items()})
        finally:
            for i in range(start):
                resblocks[i] = self.blocks[i]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def outputs(self, blocks: dict[int, list[str]]) -> dict[str, np.ndarray]:
        """Outputs with `blocks` (1-based -> op classes) in emulated FP16."""
        used = [b for b, ops in blocks.items() if ops]
        if not used:
            return self.reference
        self.evaluations += 1
        apply_policy(self.model, PrecisionPolicy(blocks), emulate=True)
        try:
            return self._run(start=min(used) - 1)
        finally:
            apply_policy(self.model, None)


def badness(report: DriftReport) -> float:
    """How far past (> 1) or inside (< 1) its limits the worst check of a report is."""
    worst = 0.0
    for c in report.checks:
        if c.kind == "max":
            r = c.value / c.limit if c.limit > 0 else (0.0 if c.value == 0 else np.inf)
        else:
            gap, allowed = 1.0 - (c.value if np.isfinite(c.value) else 0.0), 1.0 - c.limit
            r = gap / allowed if allowed > 0 else (0.0 if gap <= 0 else np.inf)
        worst = max(worst, float(r))
    return worst


def choose_fp16_policy(model: nn.Module, images: np.ndarray, names: list[str] | None = None,
                       tolerance: float = 1.0, threshold: tuple[str, float] | None = None, margin: float = 0.5,
                       max_evaluations: int = 16, sensitivity_images: int = 8, sweep_images: int | None = None,
                       source: str = "", batch: int = 8,
                       log: Callable[[str], None] | None = None) -> tuple[PrecisionPolicy | None, DriftReport]:
    """The FP16 policy with the most FP16 FLOPs that passes the fp16 gate on `images`.

    The sweep aims at `margin` x the limits (badness <= margin, default half the room), so
    that the real FP16 kernels of ONNX Runtime / TensorRT, which round slightly differently
    from the emulation, still pass when the chosen graph is verified. The per-block
    sensitivity is ranked on the first `sensitivity_images` images only (a ranking, not a
    verdict); every verdict uses all images, at most `max_evaluations` of them after the
    first, so a ViT-L sweep costs tens of full passes, not hundreds. With `sweep_images`,
    candidates are judged on the first `sweep_images` images only (the caller then gates
    the chosen policy on all of them, as the export's verification does): a ViT-L sweep on
    16 images instead of 64 costs a quarter, and the margin keeps room for the rest.

    Returns:
        (policy, its emulated drift report), or (None, the drift report of the best
        candidate tried) when even the least sensitive single block fails.
    """
    log = log or (lambda msg: None)
    cfg = model.cfg
    layers = cfg.vision.layers
    all_images = images
    subset = sweep_images is not None and sweep_images < len(images)
    ev = PolicyEvaluator(model, images[:sweep_images] if subset else images, batch=batch)
    small = ev if sensitivity_images >= len(ev.reference["score"]) else \
        PolicyEvaluator(model, images[:sensitivity_images], batch)
    evaluators = [ev]

    def judge(blocks: dict[int, list[str]], on: PolicyEvaluator) -> DriftReport:
        rep = compare(on.reference, on.outputs(blocks), "fp16", names[:len(on.reference["score"])] if names else None,
                      tolerance, threshold=threshold, reference_name="torch fp32",
                      candidate_name="torch fp16 (emulated)")
        rep.extra["fp16_flop_fraction"] = fp16_flop_fraction(cfg, blocks)
        return rep

    def ok(rep: DriftReport) -> bool:
        return rep.passed and badness(rep) <= margin

    everything = {b: list(FP16_OPS) for b in range(1, layers + 1)}
    sensitivity: dict[int, float] = {}

    def search(on: PolicyEvaluator) -> tuple[dict[int, list[str]] | None, DriftReport]:
        """(the most-FP16 passing candidate or None, its report / the best failing one) judged on `on`."""
        rep = judge(everything, on)
        log(f"all {layers} blocks FP16 on {len(on.reference['score'])} images: badness {badness(rep):.3g}")
        if ok(rep):
            return everything, rep
        if not sensitivity:
            for b in range(1, layers + 1):
                sensitivity[b] = badness(judge({b: list(FP16_OPS)}, small))
            log("per-block sensitivity: " + ", ".join(f"{b}:{sensitivity[b]:.2g}" for b in order()))
        best_rep, ranked = rep, order()
        # Bisection: the longest prefix of the ranking that passes (k blocks in FP16).
        lo, hi, lo_rep = 0, layers - 1, None  # the all-blocks case failed above
        while lo < hi and on.evaluations <= max_evaluations:
            mid = (lo + hi + 1) // 2
            r = judge({b: list(FP16_OPS) for b in ranked[:mid]}, on)
            if ok(r):
                lo, lo_rep = mid, r
            else:
                hi = mid - 1
        chosen, chosen_rep = {b: list(FP16_OPS) for b in ranked[:lo]}, lo_rep
        # Refinement: op classes of the remaining blocks, least sensitive first, MLP first.
        for b in ranked[lo:]:
            for ops in (list(MLP_OPS), ["qkv"], ["out_proj"], ["attn_v"]):
                if on.evaluations > max_evaluations:
                    break
                trial = {**chosen, b: chosen.get(b, []) + ops}
                r = judge(trial, on)
                if ok(r):
                    chosen, chosen_rep = trial, r
        if chosen_rep is None:
            if on.evaluations < max_evaluations + 1:
                best_rep = judge({ranked[0]: list(FP16_OPS)}, on)
            best_rep.notes.append("no FP16 policy passes: even the least sensitive block alone drifts too far")
            return None, best_rep
        return chosen, chosen_rep

    def order() -> list[int]:
        return sorted(sensitivity, key=lambda b: (sensitivity[b], b))

    chosen, chosen_rep = search(ev)
    if subset and chosen is not None:
        # The gate on the final policy uses every calibration image; where the subset's
        # choice does not hold on all of them, the search runs again on all of them.
        full = PolicyEvaluator(model, all_images, batch=batch)
        evaluators.append(full)
        rep = judge(chosen, full)
        log(f"chosen on {len(ev.reference['score'])} images, on all {len(all_images)}: badness {badness(rep):.3g}")
        chosen, chosen_rep = (chosen, rep) if ok(rep) else search(full)
    if chosen is None:
        return None, chosen_rep
    log(f"chosen: {PrecisionPolicy(chosen, fp16_flop_fraction(cfg, chosen)).describe()}")
    policy = PrecisionPolicy(
        blocks={b: ops for b, ops in chosen.items() if ops},
        fp16_flop_fraction=round(fp16_flop_fraction(cfg, chosen), 4),
        calibration={"images": len(all_images), "source": source},
        sweep={"images": len(ev.reference["score"]), "evaluations": sum(e.evaluations for e in evaluators), "sensitivity_evaluations": small.evaluations if small is not ev else 0,
               "sensitivity_images": min(sensitivity_images, len(all_images)), "margin": margin,
               "sensitivity": {str(b): round(s, 4) for b, s in sensitivity.items()},
               "emulated": chosen_rep.summary()},
    )
    chosen_rep.extra["policy"] = policy.to_dict()["blocks"]
    return policy, chosen_rep


# -- the torch backend: one policy per bundle, cached by weights ------------------------------------
def weights_digest(model: nn.Module) -> str:
    """sha256 over the state dict's names and bytes (keys a policy to exact weights)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def policy_for_model(model: nn.Module, calib_images: int = 64, log: Callable[[str], None] | None = None
                     ) -> PrecisionPolicy:
    """The bundle's FP16 policy: read from the cache ($IQE_CACHE/policies) or measured now and cached.

    Raises:
        PrecisionRefused: no FP16 policy passes the gate for these weights.
    """
    from iqe.atomic import atomic_write_text

    root = Path(os.environ.get("IQE_CACHE", Path.home() / ".cache" / "iqe")) / "policies"
    path = root / f"{weights_digest(model)}.fp16.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("policy") is None:
            raise PrecisionRefused(data["refusal"])
        return PrecisionPolicy.from_dict(data["policy"])
    images, names, _, source = calibration_images(None, calib_images, model.cfg.image_size)
    policy, rep = choose_fp16_policy(model, images, names, source=source, log=log)
    root.mkdir(parents=True, exist_ok=True)
    if policy is None:
        msg = refusal_message(rep)
        atomic_write_text(path, json.dumps({"policy": None, "refusal": msg}) + "\n")
        raise PrecisionRefused(msg)
    atomic_write_text(path, json.dumps({"policy": policy.to_dict()}, indent=2) + "\n")
    return policy


def read_policy(path: str | Path) -> PrecisionPolicy:
    """A policy JSON: PrecisionPolicy.to_dict(), or an export record's `precision_policy`."""
    from iqe.errors import InputError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable policy JSON ({exc})") from None
    data = data.get("precision_policy") or data.get("policy") or data
    if not isinstance(data, dict) or "blocks" not in data:
        raise InputError(f"{path}: no precision policy in it (expected a 'blocks' mapping)")
    return PrecisionPolicy.from_dict(data)


def refusal_message(rep: DriftReport) -> str:
    lines = [f"--precision fp16 refused: no FP16 policy keeps this model within the fp16 contract on "
             f"{rep.images} calibration images (best candidate: {rep.summary_line()})"]
    lines += [f"  {c.line()}" for c in rep.failures()]
    lines.append("  use --precision fp32, or --tolerance to accept more drift")
    return "\n".join(lines)


from iqe.errors import InputError as _InputError  # noqa: E402


class PrecisionRefused(_InputError):
    """No precision policy passes the gate: the engine is refused rather than served drifted."""
