"""Model semantics vs independent computations (REFERENCE.md §4-6)."""

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from iqe.model.iqe import OUTPUT_KEYS


def test_output_shapes(tiny_model):
    out = tiny_model(torch.rand(2, 3, 240, 240))
    assert set(out) == set(OUTPUT_KEYS)
    for k in ("score", "score_query", "score_text", "score_few"):
        assert out[k].shape == (2,)
    for k in ("map", "map_query", "map_text"):
        assert out[k].shape == (2, 240, 240)
    g, taps = tiny_model.visual(torch.rand(2, 3, 240, 240))
    assert g.shape == (2, 64) and len(taps) == 4 and taps[0].shape == (2, 290, 64)


def test_prefix_text_branch_equals_full_sequence(tiny_model):
    torch.manual_seed(3)
    cpt = torch.randn(5, 2, 64)
    with torch.no_grad():
        full = tiny_model.text.forward_full(cpt)
        fast = tiny_model.text.forward_prefixed(cpt, tiny_model.text.compute_prefix())
    assert full.shape == (5, 2, 64)
    assert torch.allclose(full.norm(dim=-1), torch.ones(5, 2), atol=1e-6)
    err = (full - fast).abs().max().item()
    assert err <= 1e-5, f"prefix vs full max abs diff {err:.3g}"
    # the two prompts differ ("normal" vs "abnormal"), so the embeddings must too
    assert (full[:, 0] - full[:, 1]).abs().max() > 1e-3


def _bilinear_align_corners(x: np.ndarray, size: int) -> np.ndarray:
    """Plain NumPy bilinear resize with align_corners=True, x [C, g, g]."""
    g = x.shape[-1]
    pos = np.arange(size) * (g - 1) / (size - 1)
    i0 = np.floor(pos).astype(int).clip(0, g - 2)
    t = pos - i0
    rows = x[:, i0] * (1 - t)[None, :, None] + x[:, i0 + 1] * t[None, :, None]
    return rows[:, :, i0] * (1 - t)[None, None, :] + rows[:, :, i0 + 1] * t[None, None, :]


def test_maps_and_scores_match_numpy(tiny_model):
    """Recompute maps and scores from the logits with NumPy and compare."""
    images = torch.rand(2, 3, 240, 240)
    with torch.no_grad():
        lq, lt = (x.double().numpy() for x in tiny_model.logits(*tiny_model.encode(images)))
        out = tiny_model.score(images)

    def softmax(x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def branch(logits):
        score = softmax(logits, -1)[..., 1].mean(-1).sum(0)  # [B]
        maps = []
        for b in range(logits.shape[1]):
            per_layer = [softmax(_bilinear_align_corners(l[b].T.reshape(2, 17, 17), 240), 0)[1] for l in logits]
            maps.append(np.mean(per_layer, axis=0))
        return score, np.stack(maps)

    sq, mq = branch(lq)
    st, mt = branch(lt)
    m = 0.2 * mt + 0.8 * mq
    np.testing.assert_allclose(out["score_query"], sq, atol=1e-5)
    np.testing.assert_allclose(out["score_text"], st, atol=1e-5)
    np.testing.assert_allclose(out["score"], sq + st, atol=1e-5)
    np.testing.assert_allclose(out["score_few"], mt.mean((1, 2)) + mq.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(out["map"], m, atol=1e-5)
    smooth = np.stack([gaussian_filter(x, 8.0) for x in m])
    np.testing.assert_allclose(out["map_smooth"], smooth, atol=1e-5)
    np.testing.assert_allclose(out["map_max"], smooth.reshape(2, -1).max(1), atol=1e-5)


def test_batch_independence(tiny_model):
    images = torch.rand(3, 3, 240, 240)
    together = tiny_model.score(images)
    alone = tiny_model.score(images[1:2])
    for k in ("score", "map"):
        np.testing.assert_allclose(together[k][1:2], alone[k], atol=1e-5)


def test_prefix_cache_follows_weights(tiny_model):
    images = torch.rand(1, 3, 240, 240)
    before = tiny_model.score(images)["score_text"]
    state = tiny_model.state_dict()
    # a random (not constant) shift: LayerNorm would cancel a constant one
    state["text.prompt_proj.bias"] = state["text.prompt_proj.bias"] + torch.randn(64, generator=torch.Generator().manual_seed(0))
    tiny_model.load_state_dict(state)
    after = tiny_model.score(images)["score_text"]
    assert abs(float(after[0] - before[0])) > 1e-6
