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

from iqe.export.fidelity import MAP_OUTPUTS, DriftReport, compare
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

    def __init__(self):
        super().__init__()
        self.output: torch.Tensor | None = None  # set per batch by PolicyEvaluator._run

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output


def _model_outputs(model: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """What the gate judges: the model's `score()` (raw outputs + smoothed map and its max)."""
    return {k: np.asarray(v) for k, v in model.score(images).items()}


class PolicyEvaluator:
    """Outputs of `model` under candidate policies on fixed images, float32 prefix replayed.

    One float32 pass over all images records every block's output per image; a candidate
    then runs only from its first FP16 block on, on the images asked for (any subset, any
    order, `batch` at a time), and stops as soon as `stop(rows done, outputs so far)` says
    the verdict is known: a failing candidate usually costs one batch, not the whole set.

    Args:
        model: float32 model of a family with `visual.transformer.resblocks` (batch-first
            blocks) and `score()` (not modified outside `outputs`).
        images: [N,3,S,S] float32.
        batch: images per forward (the unit of early stopping).
    """

    def __init__(self, model: nn.Module, images: np.ndarray, batch: int = 4):
        self.model = model.float().eval()
        self.batch = batch
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.blocks = list(model.visual.transformer.resblocks)
        self.recorded: list[list[torch.Tensor]] = [[] for _ in self.blocks]  # [block][image] outputs [1, L, D]
        self.evaluations = 0
        self.forwards = 0.0  # image forwards spent, in whole-model units (replayed blocks are free)
        apply_policy(self.model, None)
        hooks = [b.register_forward_hook(self._recorder(i)) for i, b in enumerate(self.blocks)]
        try:
            self.reference = self._run(0, list(range(len(images))))[1]
        finally:
            for h in hooks:
                h.remove()

    def __len__(self) -> int:
        return len(self.images)

    def _recorder(self, i: int):
        def hook(module, args, output):
            self.recorded[i].extend(output.detach().split(1))
        return hook

    def _run(self, start: int, rows: list[int], stop: Callable[[list[int], dict], bool] | None = None
             ) -> tuple[list[int], dict[str, np.ndarray]]:
        resblocks = self.model.visual.transformer.resblocks
        replays = [_Replay() for _ in range(start)]
        for i, r in enumerate(replays):
            resblocks[i] = r
        parts: list[dict[str, np.ndarray]] = []
        done: list[int] = []
        try:
            with torch.no_grad():
                for k in range(0, len(rows), self.batch):
                    chunk = rows[k:k + self.batch]
                    for i, r in enumerate(replays):
                        r.output = torch.cat([self.recorded[i][j] for j in chunk])
                    parts.append(_model_outputs(self.model, self.images[chunk]))
                    done += chunk
                    self.forwards += len(chunk) * (1 - start / max(1, len(self.blocks)))
                    if stop is not None and len(done) < len(rows) and stop(done, _concat(parts)):
                        break
        finally:
            for i in range(start):
                resblocks[i] = self.blocks[i]
        return done, _concat(parts)

    def reference_of(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        return {k: v[list(rows)] for k, v in self.reference.items()}

    def outputs(self, blocks: dict[int, list[str]], rows: Sequence[int] | None = None,
                stop: Callable[[list[int], dict], bool] | None = None) -> tuple[list[int], dict[str, np.ndarray]]:
        """(rows evaluated, outputs on them) with `blocks` (1-based -> op classes) in emulated FP16.

        `rows`: image indices in evaluation order (default: all, in order).
        """
        rows = list(range(len(self))) if rows is None else list(rows)
        used = [b for b, ops in blocks.items() if ops]
        if not used:
            return rows, self.reference_of(rows)
        self.evaluations += 1
        apply_policy(self.model, PrecisionPolicy(blocks), emulate=True)
        try:
            return self._run(min(used) - 1, rows, stop)
        finally:
            apply_policy(self.model, None)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}


def check_badness(c) -> float:
    """How far past (> 1) or inside (< 1) its limit one check is."""
    if c.kind == "max":
        return c.value / c.limit if c.limit > 0 else (0.0 if c.value == 0 else np.inf)
    gap, allowed = 1.0 - (c.value if np.isfinite(c.value) else 0.0), 1.0 - c.limit
    return gap / allowed if allowed > 0 else (0.0 if gap <= 0 else np.inf)


def badness(report: DriftReport) -> float:
    """How far past (> 1) or inside (< 1) its limits the worst check of a report is."""
    return max([float(check_badness(c)) for c in report.checks], default=0.0)


def _monotone(c) -> bool:
    """Checks that can only get worse with more images (per-image maxima / minima, flips)."""
    return c.metric.startswith(("per-image", "decision flips")) or (c.metric == "max abs" and c.output in MAP_OUTPUTS)


def per_image_difficulty(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                         tolerance: float = 1.0) -> np.ndarray:
    """Per image, how close a candidate comes to the fp16 contract's per-image limits.

    max(map max abs / its limit, (1 - map correlation) / (1 - its limit)), plus the rank
    (0..1) of the image's score change: images whose score moves most are where a ranking
    flips first.
    """
    from iqe.export.fidelity import contract_for, per_image_corr

    c = contract_for("fp16")
    n = len(reference["score"])
    a, b = np.asarray(reference["map"], np.float32), np.asarray(candidate["map"], np.float32)
    per_abs = np.abs(a - b).reshape(n, -1).max(axis=1) / (c.map_abs * tolerance)
    gap = (1.0 - np.nan_to_num(per_image_corr(a, b), nan=0.0)) / ((1.0 - c.map_corr) * tolerance)
    moved = np.abs(np.asarray(reference["score"], np.float64) - np.asarray(candidate["score"], np.float64))
    return np.maximum(per_abs, gap) + np.argsort(np.argsort(moved)) / max(1, n)


def choose_fp16_policy(model: nn.Module, images: np.ndarray, names: list[str] | None = None,
                       tolerance: float = 1.0, threshold: tuple[str, float] | None = None, margin: float = 0.5,
                       max_evaluations: int = 16, sensitivity_images: int = 4, sweep_images: int | None = 8,
                       source: str = "", batch: int = 4, rounds: int = 4,
                       log: Callable[[str], None] | None = None,
                       keep: dict[str, Any] | None = None) -> tuple[PrecisionPolicy | None, DriftReport]:
    """The FP16 policy with the most FP16 FLOPs that passes the fp16 gate on `images`.

    The sweep aims at `margin` x the limits (badness <= margin, default half the room), so
    that the real FP16 kernels of ONNX Runtime / TensorRT, which round slightly differently
    from the emulation, still pass when the chosen graph is verified.

    Cost decides whether a ViT-L export finishes on a CPU, so the search spends full passes
    only where they decide something:
    1. float32 on every image (recorded: each candidate replays it up to its first FP16
       block), then every GEMM in FP16 on every image — done if that passes the gate;
       otherwise it tells which images are hardest (`per_image_difficulty`);
    2. per-block sensitivity on the `sensitivity_images` hardest images;
    3. bisection over the blocks ordered by sensitivity, then op-class refinement (MLP
       GEMMs first), judged on a working set of the `sweep_images` hardest images (None:
       all), each candidate stopped at the first batch where a per-image check (map max
       abs, map correlation, decision flips) already fails;
    4. the gate: the chosen policy on every image. Where it fails, the images that failed
       join the working set and the search runs again with at most as many FP16 blocks
       (`rounds` times, then on all images): no policy is accepted without the full gate.

    Args:
        keep: filled with "reference" (float32) and "candidate" (chosen policy, emulated)
            outputs on all images, in image order, for the caller's verification to reuse.
    Returns:
        (policy, its emulated drift report on all images), or (None, the drift report of
        the best candidate tried) when even the least sensitive single block fails.
    """
    log = log or (lambda msg: None)
    cfg = model.cfg
    layers = cfg.vision.layers
    n_all = len(images)
    names = names or [str(i) for i in range(n_all)]
    ev = PolicyEvaluator(model, images, batch=batch)
    every = list(range(n_all))
    everything = {b: list(FP16_OPS) for b in range(1, layers + 1)}
    difficulty = np.zeros(n_all)
    seen: dict[str, tuple[list[int], dict[str, np.ndarray]]] = {}  # candidate -> (rows, outputs)
    rejected: dict[str, DriftReport] = {}  # candidates that failed the gate -> that report
    last: dict[str, Any] = {}  # rows and outputs of the latest judged candidate

    def key_of(blocks: dict[int, list[str]]) -> str:
        return json.dumps(sorted((b, sorted(o)) for b, o in blocks.items() if o))

    def report(blocks: dict[int, list[str]], rows: Sequence[int], got: dict[str, np.ndarray]) -> DriftReport:
        # Judged over every calibration image, the ones not evaluated (yet) at their float32
        # outputs: per-image checks see only the evaluated ones, and a score's Spearman counts
        # the rank swaps a moved image makes among all images — on a working set of 8 alone,
        # one swap would read as Spearman 0.976, a drift 64 images never show.
        rows = list(rows)
        full = {k: v.copy() for k, v in ev.reference.items() if k in got}
        for k in full:
            full[k][rows] = got[k]
        rep = compare(ev.reference, full, "fp16", names, tolerance, threshold=threshold,
                      reference_name="torch fp32", candidate_name="torch fp16 (emulated)")
        if len(rows) < n_all:
            rep.notes.append(f"evaluated on {len(rows)} of {n_all} images (the rest at their float32 outputs)")
        rep.extra["fp16_flop_fraction"] = fp16_flop_fraction(cfg, blocks)
        rep.extra["evaluated_images"] = len(rows)
        return rep

    def judge(blocks: dict[int, list[str]], rows: Sequence[int], early: bool = True) -> DriftReport:
        """The candidate's report on `rows` (hardest first; outputs already computed are reused)."""
        if key_of(blocks) in rejected:  # failed the gate on every image: never passes on a subset
            return rejected[key_of(blocks)]
        rows = sorted(rows, key=lambda i: (-difficulty[i], i))
        old_rows, old = seen.get(key_of(blocks), ([], {}))
        have = {i: k for k, i in enumerate(old_rows)}
        todo = [i for i in rows if i not in have]

        def merged(done: list[int], got: dict[str, np.ndarray]) -> tuple[list[int], dict[str, np.ndarray]]:
            reuse = [i for i in rows if i in have]
            if not reuse:
                return done, got
            idx = [have[i] for i in reuse]
            return reuse + done, {k: np.concatenate([old[k][idx], got[k]]) if done else old[k][idx] for k in old}

        def stop(done: list[int], got: dict[str, np.ndarray]) -> bool:
            r = report(blocks, *merged(done, got))
            return early and any(_monotone(c) and check_badness(c) > margin for c in r.checks)

        done, got = ev.outputs(blocks, todo, stop) if todo else ([], {})
        all_rows, all_got = merged(done, got)
        if done:
            difficulty[done] = np.maximum(difficulty[done], per_image_difficulty(ev.reference_of(done), got, tolerance))
        rep = report(blocks, all_rows, all_got)
        last["rows"], last["outputs"] = all_rows, all_got
        if done and ok(rep):
            # Only passing candidates are judged again (the gate) or kept; a ViT-L sweep's maps
            # are ~120 MB per candidate, so the last few are all that is held.
            seen[key_of(blocks)] = (old_rows + done, {k: np.concatenate([old[k], got[k]]) if old else got[k]
                                                      for k in got})
            for stale in list(seen)[:-2]:
                del seen[stale]
        if len(all_rows) < len(rows):
            rep.extra["stopped_early"] = True
        return rep

    def ok(rep: DriftReport) -> bool:
        return rep.passed and badness(rep) <= margin

    def hardest(k: int | None) -> list[int]:
        return sorted(every, key=lambda i: (-difficulty[i], i))[:k if k else n_all]

    naive = judge(everything, every, early=False)
    log(f"all {layers} blocks FP16 on {n_all} images: badness {badness(naive):.3g}")
    chosen: dict[int, list[str]] | None = everything if ok(naive) else None
    chosen_rep = naive
    sensitivity: dict[int, float] = {}
    working = sorted(hardest(sweep_images))
    whole_blocks = layers - 1

    def order() -> list[int]:
        return sorted(sensitivity, key=lambda b: (sensitivity[b], b))

    def search(rows: list[int], hi: int) -> tuple[dict[int, list[str]] | None, DriftReport | None]:
        """(the most-FP16 candidate that passes on `rows`, its report) or (None, None); <= `hi` whole blocks."""
        ranked, start = order(), ev.evaluations
        lo, lo_rep = 0, None
        while lo < hi and ev.evaluations - start <= max_evaluations:
            mid = (lo + hi + 1) // 2
            r = judge({b: list(FP16_OPS) for b in ranked[:mid]}, rows)
            if ok(r):
                lo, lo_rep = mid, r
            else:
                hi = mid - 1
        found, found_rep = {b: list(FP16_OPS) for b in ranked[:lo]}, lo_rep
        for b in ranked[lo:]:
            for ops in (list(MLP_OPS), ["qkv"], ["out_proj"], ["attn_v"]):
                if ev.evaluations - start > max_evaluations:
                    break
                trial = {**found, b: found.get(b, []) + ops}
                r = judge(trial, rows)
                if ok(r):
                    found, found_rep = trial, r
        return (found, found_rep) if found_rep is not None else (None, None)

    if chosen is None:
        sens_rows = hardest(min(sensitivity_images, n_all))
        for b in range(1, layers + 1):
            sensitivity[b] = badness(judge({b: list(FP16_OPS)}, sens_rows, early=False))
        log(f"per-block sensitivity on the {len(sens_rows)} hardest images: "
            + ", ".join(f"{b}:{sensitivity[b]:.2g}" for b in order()))
        for attempt in range(rounds + 1):
            if attempt == rounds:
                working = every
            found, found_rep = search(working, whole_blocks)
            if found is None:
                break
            gate = found_rep if len(working) == n_all else judge(found, every)
            log(f"chosen on {len(working)} images ({PrecisionPolicy(found, fp16_flop_fraction(cfg, found)).describe()}), "
                f"gate on all {n_all}: badness {badness(gate):.3g}" + (" (stopped early)" if gate.extra.get("stopped_early") else ""))
            if ok(gate):
                chosen, chosen_rep = found, gate
                break
            chosen_rep = rejected[key_of(found)] = gate
            # Grow the working set: the hardest images outside it (per-image checks) and the
            # ones whose score the rejected candidate moved most (the ranking check).
            k = max(1, (sweep_images or n_all) // 2)
            outside = [i for i in hardest(None) if i not in working][:k]
            moved = np.abs(np.asarray(last["outputs"]["score"], np.float64) -
                           np.asarray(ev.reference["score"], np.float64)[last["rows"]])
            movers = [last["rows"][j] for j in np.argsort(-moved) if last["rows"][j] not in working][:k]
            working = sorted(set(working) | set(outside) | set(movers))
            whole_blocks = sum(1 for ops in found.values() if set(ops) == set(FP16_OPS))
        if chosen is None:
            single = judge({order()[0]: list(FP16_OPS)}, every, early=False)
            chosen_rep = single if badness(single) < badness(chosen_rep) else chosen_rep
            chosen_rep.notes.append("no FP16 policy passes: even the least sensitive block alone drifts too far"
                                    if badness(single) > margin else "no FP16 policy found passes the gate on every image")
            return None, chosen_rep
    if keep is not None:
        rows, got = seen.get(key_of(chosen)) or ev.outputs(chosen)
        order_rows = np.argsort(rows, kind="stable")
        keep["reference"] = ev.reference
        keep["candidate"] = {k: v[order_rows] for k, v in got.items()}
    log(f"chosen: {PrecisionPolicy(chosen, fp16_flop_fraction(cfg, chosen)).describe()}")
    policy = PrecisionPolicy(
        blocks={b: ops for b, ops in chosen.items() if ops},
        fp16_flop_fraction=round(fp16_flop_fraction(cfg, chosen), 4),
        calibration={"images": n_all, "source": source},
        sweep={"images": len(working), "evaluations": ev.evaluations,
               "image_forwards": round(ev.forwards, 1), "sensitivity_images": min(sensitivity_images, n_all),
               "margin": margin, "sensitivity": {str(b): round(s, 4) for b, s in sensitivity.items()},
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
