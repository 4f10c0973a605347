"""target_size against a hand-made table and a brute-force oracle; Algorithm-1 variants; flips."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fitv2_jax.data.preprocess import (
    algorithm1,
    crop_side,
    hflip,
    official_size,
    target_size,
    variants,
)

# (height, width, max_tokens) -> (H', W') by hand with m = 16 (SD-VAE x p=2), following the
# official resize_arr (FITV2_FACTS.md §2): exact area S^2 when larger, a side under 16 px scaled
# up to 16, then both sides floored to multiples of 16.
OFFICIAL = [
    ((375, 500, 256), (208, 288)),  # new_w = 295.6, new_h = 221.7 -> 13 x 18
    ((500, 375, 256), (288, 208)),
    ((333, 500, 256), (208, 304)),  # 313.7 x 208.9 -> 13 x 19
    ((1024, 120, 256), (736, 80)),  # 87.6 x 747.8 -> 46 x 5
    ((4000, 3000, 256), (288, 208)),
    ((256, 256, 256), (256, 256)),
    ((512, 512, 256), (256, 256)),
    ((160, 320, 256), (160, 320)),  # under the budget: kept
    ((64, 64, 256), (64, 64)),  # 16 tokens: the minimum, kept
    ((375, 500, 1024), (368, 496)),  # under the 512^2 budget: floored to multiples of 16
    ((480, 640, 1024), (432, 576)),  # FITV2_FACTS: 591.2 x 443.4
    ((1841, 2064, 256), (240, 256)),  # FITV2_FACTS: 271.1 x 241.8
    ((300, 9, 256), (528, 16)),  # FITV2_FACTS: the 9 px side is scaled up to 16
    ((10, 400, 256), (16, 640)),  # likewise the 10 px height: 1 x 40 tokens
    ((16, 16, 256), None),  # 1 token
    ((48, 80, 256), None),  # 15 tokens
    ((5000, 9, 256), None),  # the upscale gives 555 x 1 tokens, over the budget
]
# The token-maximising option: most tokens without a larger aspect error than the official size.
MAX_TOKENS = [
    ((375, 500, 256), (224, 288)),  # 14 x 18 = 252: aspect 0.778 vs 0.75, official 0.722
    ((1841, 2064, 256), (240, 272)),  # 15 x 17 = 255; 16 x 16 would distort more (0.114 vs 0.050)
    ((1024, 120, 256), (736, 80)),  # 47 x 5 has more tokens but a larger aspect error
    ((160, 320, 256), (160, 320)),
    ((300, 9, 256), (528, 16)),  # a side under one unit: the official upscale
]


@pytest.mark.parametrize("args,expected", OFFICIAL)
def test_official_rule_table(args, expected):
    h, w, t = args
    assert target_size(h, w, t, patch_size=2, downsample=8) == expected


@pytest.mark.parametrize("args,expected", MAX_TOKENS)
def test_max_tokens_rule_table(args, expected):
    h, w, t = args
    assert target_size(h, w, t, patch_size=2, downsample=8, rule="max_tokens") == expected


def _aspect_error(hh, ww, h, w):
    return abs(math.log(hh / ww) - math.log(h / w))


def _oracle_tokens(h, w, t, m):
    """Brute force over every size the max_tokens spec allows: sides within one unit of the
    exact-aspect area-t size (or clamped to one unit), never upscaled, aspect error at most the
    official size's (which is itself allowed)."""
    official = official_size(h, w, t, m)
    limit = _aspect_error(*official, h, w)
    s = min(1.0, math.sqrt(t * m * m / (h * w)))
    a, b = h * s / m, w * s / m
    best = (official[0] // m) * (official[1] // m)
    for hh in range(1, h // m + 1):
        for ww in range(1, w // m + 1):
            near_h = abs(hh - a) < 1 or hh == 1 or (b < 1 and ww == 1)
            near_w = abs(ww - b) < 1 or ww == 1 or (a < 1 and hh == 1)
            if near_h and near_w and hh * ww <= t and _aspect_error(hh, ww, h, w) <= limit + 1e-12:
                best = max(best, hh * ww)
    return best


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 3000),
    w=st.integers(1, 3000),
    t=st.sampled_from([16, 64, 200, 256, 1024]),
    p=st.sampled_from([1, 2]),
    down=st.sampled_from([1, 8]),
)
def test_max_tokens_rule_properties(h, w, t, p, down):
    m = p * down
    official = official_size(h, w, t, m)
    out = target_size(h, w, t, p, down, rule="max_tokens")
    if min(official) < m:  # the official upscale of a side under one unit: kept as it is
        assert out == target_size(h, w, t, p, down)
        return
    want = _oracle_tokens(h, w, t, m)
    if not 16 <= want <= t:
        assert out is None
        return
    H, W = out
    assert H % m == 0 and W % m == 0 and (H // m) * (W // m) == want  # as many as allowed
    assert want >= (official[0] // m) * (official[1] // m)  # never fewer than official
    assert _aspect_error(H, W, h, w) <= _aspect_error(*official, h, w) + 1e-12


def test_variants_follow_algorithm_1():
    big = Image.new("RGB", (500, 375))  # both sides > S = 256 -> resize and crop
    vs = variants(big, 256, 2, 8)
    assert set(vs) == {"resize", "crop"}
    assert vs["resize"].size == (288, 208) and vs["crop"].size == (256, 256)
    assert crop_side(256, 2, 8) == 256 and crop_side(1024, 2, 8) == 512
    narrow = Image.new("RGB", (240, 600))  # one side <= S -> resize only
    assert set(variants(narrow, 256, 2, 8)) == {"resize"}
    assert variants(Image.new("RGB", (40, 40)), 256, 2, 8) == {}


def test_center_crop_keeps_the_center():
    # A 300x600 (h x w) image whose middle 300 columns are white: the crop must be all white.
    a = np.zeros((300, 600, 3), np.uint8)
    a[:, 150:450] = 255
    crop = np.asarray(variants(Image.fromarray(a), 256, 2, 8)["crop"])
    assert crop.shape == (256, 256, 3)
    assert crop[:, 3:-3].min() >= 250  # bicubic rings only at the borders of the white band
    assert crop[:, :1].max() < 255 and crop[:, -1:].max() < 255  # and those borders are real


def test_algorithm1_picks_both_variants_and_flips_about_half_the_time():
    a = np.zeros((300, 400, 3), np.uint8)
    a[:, :200] = 255  # the left half is white: shows flips in both variants
    img = Image.fromarray(a)
    rng = np.random.default_rng(0)
    crops = flips = 0
    n = 200
    for _ in range(n):
        out = np.asarray(algorithm1(img, rng, 256, 2, 8))
        crops += out.shape[:2] == (256, 256)
        flips += out[:, -1].mean() > out[:, 0].mean()
    assert 0.35 < crops / n < 0.65 and 0.35 < flips / n < 0.65
    assert algorithm1(Image.new("RGB", (20, 20)), rng, 256, 2, 8) is None


def test_hflip_numpy_and_pil_agree():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(hflip(a), a[:, [2, 1, 0]])
    np.testing.assert_array_equal(np.asarray(hflip(Image.fromarray(a))), a[:, [2, 1, 0]])
