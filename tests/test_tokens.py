"""Token layout: patchify / unpatchify / grid / padding against hand-made arrays and einops."""

import einops
import jax.numpy as jnp
import numpy as np
import pytest

from fitv2_jax.data.tokens import batch_tokens, make_grid, pad_tokens, patchify, unpatchify


def test_patch_feature_order_is_c_p1_p2_by_hand():
    # A 2x4 image, 2 channels, p=2: two patches. Value = 100*c + 10*row + col, so each
    # feature names where it came from.
    H, W, C, p = 2, 4, 2, 2
    img = np.zeros((H, W, C), np.int64)
    for r in range(H):
        for c in range(W):
            for ch in range(C):
                img[r, c, ch] = 100 * ch + 10 * r + c
    tok = patchify(img, p)
    # token 0 = left patch (cols 0-1); order (c, p1, p2): channel 0 rows 0..1 cols 0..1, then ch 1
    assert tok.tolist() == [
        [0, 1, 10, 11, 100, 101, 110, 111],
        [2, 3, 12, 13, 102, 103, 112, 113],
    ]


def test_patchify_matches_einops_official_layout():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 10, 4)).astype(np.float32)
    ref = einops.rearrange(img, "(h p1) (w p2) c -> (h w) (c p1 p2)", p1=2, p2=2)
    np.testing.assert_array_equal(patchify(img, 2), ref)
    # and the inverse is the official SiT unpatchify "b h w (c p1 p2) -> b c (h p1) (w p2)"
    back = einops.rearrange(ref, "(h w) (c p1 p2) -> (h p1) (w p2) c", h=3, w=5, p1=2, p2=2)
    np.testing.assert_array_equal(unpatchify(ref, 3, 5, 2), back)


@pytest.mark.parametrize("shape,p", [((4, 4, 3), 1), ((6, 10, 4), 2), ((8, 4, 3), 4)])
def test_round_trip_exact_numpy_and_jax(shape, p):
    img = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    h, w = shape[0] // p, shape[1] // p
    np.testing.assert_array_equal(unpatchify(patchify(img, p), h, w, p), img)
    jimg = jnp.asarray(img)
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(jimg, p), h, w, p)), img)


def test_patchify_rejects_non_multiple():
    with pytest.raises(ValueError, match="multiple"):
        patchify(np.zeros((5, 4, 3)), 2)


def test_grid_row0_is_column_row1_is_row():
    g = make_grid(2, 3)
    assert g.dtype == np.int32
    assert g.tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]]
    np.testing.assert_array_equal(np.asarray(make_grid(2, 3, jnp)), g)


def test_pad_tokens_and_batch():
    a = np.arange(2 * 4 * 1, dtype=np.float32).reshape(2, 4, 1)  # 1x2 patches at p=2
    b = np.ones((4, 2, 1), np.float32)  # 2x1 patches
    t, g, m = pad_tokens(patchify(a, 2), make_grid(1, 2), 5)
    assert t.shape == (5, 4) and g.shape == (2, 5) and m.tolist() == [1, 1, 0, 0, 0]
    assert not t[2:].any() and not g[:, 2:].any()
    with pytest.raises(ValueError, match="max_len"):
        pad_tokens(patchify(a, 2), make_grid(1, 2), 1)

    batch = batch_tokens([a, b], 2, 4)
    assert batch["x"].shape == (2, 4, 4) and batch["x"].dtype == np.float32
    assert batch["grid"].shape == (2, 2, 4) and batch["grid"].dtype == np.int32
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert batch["size"].tolist() == [[1, 2], [2, 1]]
    assert batch["grid"][1].tolist() == [[0, 0, 0, 0], [0, 1, 0, 0]]
    for img, x, (h, w) in zip([a, b], batch["x"], batch["size"], strict=True):
        np.testing.assert_array_equal(unpatchify(x, h, w, 2), img)

    jb = batch_tokens([jnp.asarray(a), jnp.asarray(b)], 2, 4)
    for k in batch:
        np.testing.assert_array_equal(np.asarray(jb[k]), batch[k])
