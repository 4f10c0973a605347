"""target_size against a hand-made table and a brute-force oracle; Algorithm-1 variants; flips."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fitv2_jax.data.preprocess import algorithm1, crop_side, hflip, target_size, variants

# (height, width, max_tokens) -> (H', W') worked out by hand with m = 16 (SD-VAE x p=2):
# exact-aspect area-T size a x b units, each side floor or ceil, most tokens <= T.
TABLE = [
    ((375, 500, 256), (224, 288)),  # a=13.86 b=18.48 -> 14x18 = 252 tokens
    ((500, 375, 256), (288, 224)),
    ((333, 500, 256), (208, 304)),  # a=13.06 b=19.61 -> 13x19 = 247 (13x20, 14x19 > 256)
    ((1024, 120, 256), (752, 80)),  # a=46.74 b=5.48 -> 47x5 = 235 (46x6, 47x6 > 256)
    ((4000, 3000, 256), (288, 224)),  # a=18.48 b=13.86 -> 18x14
    ((256, 256, 256), (256, 256)),
    ((512, 512, 256), (256, 256)),
    ((160, 320, 256), (160, 320)),  # under budget: kept, never upscaled
    ((64, 64, 256), (64, 64)),  # 16 tokens: the minimum, kept
    ((375, 500, 1024), (368, 496)),  # under the 512^2 budget: floor to multiples of 16
    ((16, 16, 256), None),  # 1 token
    ((48, 80, 256), None),  # 15 tokens
    ((10, 400, 256), None),  # a side under 16 px
]


@pytest.mark.parametrize("args,expected", TABLE)
def test_table_of_imagenet_like_sizes(args, expected):
    h, w, t = args
    assert target_size(h, w, t, patch_size=2, downsample=8) == expected


def _oracle_tokens(h, w, t, m, min_tokens=16):
    """Brute force over every size the spec allows: most tokens among sides within one unit
    of the exact-aspect area-t size (a side forced to 1 unit lets the other fill the budget)."""
    hmax, wmax = h // m, w // m
    if hmax < 1 or wmax < 1:
        return None
    s = min(1.0, math.sqrt(t * m * m / (h * w)))
    a, b = h * s / m, w * s / m
    best = 0
    hs = [hh for hh in range(1, hmax + 1) if abs(hh - a) < 1 or hh == 1]
    ws = [ww for ww in range(1, wmax + 1) if abs(ww - b) < 1 or ww == 1 or ww == min(wmax, t)]
    hs += [min(hmax, t)]
    for hh in hs:
        for ww in ws:
            near_h = abs(hh - a) < 1 or (a < 1 and hh == 1) or (b < 1 and ww == 1)
            near_w = abs(ww - b) < 1 or (b < 1 and ww == 1) or (a < 1 and hh == 1)
            if near_h and near_w and hh * ww <= t:
                best = max(best, hh * ww)
    return best if best >= min_tokens else None


@settings(max_examples=250, deadline=None)
@given(
    h=st.integers(1, 3000),
    w=st.integers(1, 3000),
    t=st.sampled_from([16, 64, 200, 256, 1024]),
    p=st.sampled_from([1, 2]),
    down=st.sampled_from([1, 8]),
)
def test_target_size_properties(h, w, t, p, down):
    m = p * down
    out = target_size(h, w, t, p, down)
    want = _oracle_tokens(h, w, t, m)
    if want is None:
        assert out is None
        return
    H, W = out
    assert H % m == 0 and W % m == 0  # grid-aligned
    assert H <= h and W <= w  # never upscaled
    assert (H // m) * (W // m) <= t  # within the budget
    assert (H // m) * (W // m) == want  # as large as the spec allows
    # Never worse than the official floor rounding (sides floored after the area rescale).
    s = min(1.0, math.sqrt(t * m * m / (h * w)))
    official = math.floor(h * s / m) * math.floor(w * s / m)
    assert (H // m) * (W // m) >= official
    # Aspect: each side is within one unit of the exact-aspect size unless clamped to 1 unit.
    a, b = h * s / m, w * s / m
    if a >= 1 and b >= 1:
        assert abs(H / m - a) < 1 and abs(W / m - b) < 1


def test_variants_follow_algorithm_1():
    big = Image.new("RGB", (500, 375))  # both sides > S = 256 -> resize and crop
    vs = variants(big, 256, 2, 8)
    assert set(vs) == {"resize", "crop"}
    assert vs["resize"].size == (288, 224) and vs["crop"].size == (256, 256)
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
