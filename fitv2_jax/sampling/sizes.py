"""Image sizes: parsing 'HxW' lists, pixel sides that fit the model, and the plan for each size.

    plans = plan_sizes(config, "256x256,320x320", rule="auto", cfg_scale="1.5,320x320=1.65")
    plans[1]  # SizePlan(height=320, width=320, h=20, w=20, rule='vision-ntk+attn-scale', cfg_scale=1.65)

Sizes are HEIGHTxWIDTH in pixels and must be multiples of patch size x VAE downsampling (16 for
the SD-VAE latent configs; the patch size for pixel-space configs, config.latent=False).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from fitv2_jax.sampling.rules import check_rule, resolve_rule
from fitv2_jax.utils.errors import UserError

Size = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class SizePlan:
    """What to sample at one size: pixels (height, width), patches (h, w), RoPE rule, CFG scale."""

    height: int
    width: int
    h: int
    w: int
    rule: str
    cfg_scale: float

    @property
    def name(self) -> str:
        return size_name(self.height, self.width)

    @property
    def tokens(self) -> int:
        return self.h * self.w


def parse_size(text: str) -> Size:
    """'256x320' -> (height 256, width 320) in pixels."""
    parts = str(text).strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"size {text!r} is not HEIGHTxWIDTH in pixels, e.g. 256x256 or 160x320")
    return int(parts[0]), int(parts[1])


def size_name(height: int, width: int) -> str:
    return f"{height}x{width}"


def parse_sizes(sizes: str | Sequence) -> list[Size]:
    """'256x256,160x320' or ['256x256', (160, 320)] -> [(256, 256), (160, 320)] (duplicates
    dropped, order kept)."""
    items = sizes.split(",") if isinstance(sizes, str) else list(sizes)
    out = [parse_size(s) if isinstance(s, str) else tuple(int(v) for v in s) for s in items
           if not (isinstance(s, str) and not s.strip())]  # fmt: skip
    if not out:
        raise UserError("no sizes given: pass e.g. --sizes 256x256,160x320")
    return list(dict.fromkeys(out))


def parse_per_size(
    value, sizes: Sequence[Size], convert: Callable, what: str
) -> dict[Size, object]:
    """One value for every size ('1.5', 1.5) or per size ('256x256=1.5,320x320=1.65', or a dict
    {'256x256': 1.5}); sizes left out get the value of an entry without '=', or None."""
    if isinstance(value, dict):
        items = [(parse_size(k) if isinstance(k, str) else tuple(k), v) for k, v in value.items()]
        default = None
    else:
        items, default = [], None
        for item in str(value).split(","):
            if "=" in item:
                size_text, v = item.split("=", 1)
                items.append((parse_size(size_text), v.strip()))
            elif item.strip():
                default = item.strip()
    out = {}
    for size, v in items:
        if size not in sizes:
            raise UserError(f"{what}: {size_name(*size)} is not one of the requested sizes "
                            f"{', '.join(size_name(*s) for s in sizes)}")  # fmt: skip
        out[size] = v
    result = {}
    for s in sizes:
        v = out.get(s, default)
        try:
            result[s] = None if v is None else convert(v)
        except ValueError as e:
            raise UserError(f"{what}: {v!r} for {size_name(*s)} is not valid ({e})") from e
    return result


def nearest_valid(value: int, multiple: int) -> tuple[int, int]:
    lo = max(multiple, value // multiple * multiple)
    return lo, lo + multiple


def patches_for(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Pixel size -> (h, w) in patches; `multiple` = patch size x VAE downsampling (16 for latents).

    Anything not a positive multiple is a UserError naming the nearest valid sizes.
    """
    bad = [(n, v) for n, v in (("height", height), ("width", width)) if v <= 0 or v % multiple]
    if bad:
        hints = ", ".join(
            f"{n} {v}: use {' or '.join(map(str, nearest_valid(v, multiple)))}" for n, v in bad
        )
        raise UserError(
            f"image sides must be multiples of {multiple} (patch size x VAE downsampling); {hints}"
        )
    return height // multiple, width // multiple


def is_latent(config) -> bool:
    """Latent-space config (decode with the VAE) unless `config.latent` says otherwise; the
    default follows the channels: 3 = pixels, anything else = VAE latents."""
    if "latent" in config:
        return bool(config.latent)
    return int(config.model.in_channels) != 3


def size_multiple(config, vae=None) -> int:
    """Pixel sides must be multiples of patch size x VAE downsampling (16 for SD latents).

    The downsampling comes from the loaded VAE, else `config.vae_downsample`, else 8."""
    p = int(config.model.patch_size)
    if not is_latent(config):
        return p
    if vae is not None:
        return p * int(vae.module.downsample_factor)
    return p * int(config.get("vae_downsample", 8))


def plan_sizes(config, sizes, rule="auto", cfg_scale=1.5, vae=None) -> list[SizePlan]:
    """The per-size plan: rule and cfg_scale are one value or per size (see parse_per_size);
    rule 'auto' resolves to the paper's rule for each size, 'official' to the official
    README's; cfg_scale 'official' is the README's scale for this model
    (config.sampling.official_cfg_scale)."""
    sizes = parse_sizes(sizes)
    multiple = size_multiple(config, vae)
    rules = parse_per_size(rule, sizes, lambda r: check_rule(str(r)), "--rule")
    official = float(config.get("sampling", {}).get("official_cfg_scale", 1.5))
    cfgs = parse_per_size(cfg_scale, sizes, lambda v: official if v == "official" else float(v),
                          "--cfg_scale")  # fmt: skip
    plans = []
    for size in sizes:
        if cfgs[size] is None or rules[size] is None:
            what = "--cfg_scale" if cfgs[size] is None else "--rule"
            raise UserError(f"{what} gives no value for {size_name(*size)}")
        if not math.isfinite(float(cfgs[size])):
            raise UserError(f"--cfg_scale {cfgs[size]} for {size_name(*size)}: give a finite scale")
        h, w = patches_for(*size, multiple)
        plans.append(SizePlan(*size, h, w, resolve_rule(rules[size], config.model, h, w),
                              float(cfgs[size])))  # fmt: skip
    return plans
