"""RoPE extrapolation rules by name (paper §3, FITV2_FACTS.md §3), and the model set up for a size.

    rule = resolve_rule("auto", config.model, h, w)      # the paper's choice for an h x w grid
    model = model_for_size(config.model, h, w, rule)     # FiT with RoPE set for that grid

h, w are in patches. A rule maps onto the model's RoPE fields with the test grid as
max_pe_len_h/w and the training grid side as ori_max_pe_len (sqrt(context_size): 16 for the
256-token models):
"""

from __future__ import annotations

import math

from fitv2_jax.models.fit import FiT
from fitv2_jax.utils.errors import UserError

EXTRAPOLATION_RULES: dict[str, dict] = {
    "none": dict(custom_freqs="normal"),
    "pi": dict(custom_freqs="linear", decouple=False),
    "ntk": dict(custom_freqs="ntk-aware", decouple=False),
    "ntk-by-parts": dict(custom_freqs="ntk-by-parts", decouple=False),
    "yarn": dict(custom_freqs="yarn", decouple=False),
    "vision-pi": dict(custom_freqs="linear", decouple=True),
    "vision-ntk": dict(custom_freqs="ntk-aware", decouple=True),
    "vision-ntk-by-parts": dict(custom_freqs="ntk-by-parts", decouple=True),
    "vision-yarn": dict(custom_freqs="yarn", decouple=True),
    "ntk+attn-scale": dict(custom_freqs="ntk-aware-pro2", decouple=False),
    "vision-ntk+attn-scale": dict(custom_freqs="ntk-aware-pro2", decouple=True),
    "vision-ntk+attn-scale-side": dict(custom_freqs="ntk-aware-pro1", decouple=True),
}
__doc__ += "\n".join(f"  {k:<28}{v}" for k, v in EXTRAPOLATION_RULES.items()) + "\n"


# Rule names that pick a rule per model and size: the paper's text, or the official README.
CHOOSERS = ("auto", "official")


def check_rule(rule: str, allow_auto: bool = True) -> str:
    if rule in EXTRAPOLATION_RULES or (allow_auto and rule in CHOOSERS):
        return rule
    names = (list(CHOOSERS) if allow_auto else []) + list(EXTRAPOLATION_RULES)
    raise UserError(f"unknown RoPE extrapolation rule {rule!r}; choose one of {', '.join(names)}")


def in_distribution(model_cfg, h: int, w: int) -> bool:
    """A patch grid is in distribution when it has at most `context_size` tokens (the paper's
    split: 256x256, 160x320 and 128x384 are in, 320x320, 224x448 and 160x480 are out)."""
    return h * w <= int(model_cfg.get("context_size", 256))


def rule_of_config(model_cfg) -> str | None:
    """The rule name whose RoPE settings the config trains with (None: plain RoPE)."""
    freqs = model_cfg.get("custom_freqs", "normal")
    if freqs == "normal":
        return None
    decouple = bool(model_cfg.get("decouple", False))
    for name, spec in EXTRAPOLATION_RULES.items():
        if spec["custom_freqs"] == freqs and spec.get("decouple", decouple) == decouple:
            return name
    raise UserError(f"config.model.custom_freqs={freqs!r} matches no extrapolation rule")


def official_rule(model_cfg, h: int, w: int) -> str:
    """The official README's commands (sample_fitv2_ddp.py, static RoPE, ori_max_pe_len 16):
    no interpolation on the training grid (256x256), `dynntk --decouple` (VisionNTK) for other
    grids within the context (160x320), `ntkpro2 --decouple` (VisionNTK + attention scale)
    beyond it (320x320); the high-resolution models `dynntk --decouple` at every size."""
    trained = rule_of_config(model_cfg)
    if trained is not None:
        return trained
    side = int(
        model_cfg.get("ori_max_pe_len") or math.isqrt(int(model_cfg.get("context_size", 256)))
    )
    if h <= side and w <= side:
        return "none"
    return "vision-ntk" if in_distribution(model_cfg, h, w) else "vision-ntk+attn-scale"


def resolve_rule(rule: str | None, model_cfg, h: int, w: int) -> str:
    """'auto' (or None) -> the paper's text: a model trained with a RoPE rule (high-resolution
    post-training) keeps it at every size; otherwise 'none' in distribution and
    'vision-ntk+attn-scale' beyond the training context. 'official' -> `official_rule`, which
    differs from the paper's text at in-distribution grids off 16x16 (160x320: VisionNTK)."""
    if rule == "official":
        return official_rule(model_cfg, h, w)
    if rule not in (None, "auto"):
        return check_rule(rule, allow_auto=False)
    trained = rule_of_config(model_cfg)
    if trained is not None:
        return trained
    return "none" if in_distribution(model_cfg, h, w) else "vision-ntk+attn-scale"


def model_for_size(
    model_cfg, h: int, w: int, rule: str = "none", ori_max_pe_len: int | None = None
) -> FiT:
    """The model with RoPE set for an (h, w)-patch test grid under an extrapolation rule."""
    check_rule(rule, allow_auto=False)
    cfg = dict(model_cfg)
    ori = (
        ori_max_pe_len
        or cfg.get("ori_max_pe_len")
        or int(math.isqrt(int(cfg.get("context_size", 256))))
    )
    cfg.update(EXTRAPOLATION_RULES[rule])
    if cfg["custom_freqs"] != "normal":
        cfg.update(max_pe_len_h=h, max_pe_len_w=w, ori_max_pe_len=int(ori))
    cfg["online_rope"] = False
    return FiT(**cfg)
