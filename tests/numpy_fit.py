"""A plain-numpy FiT forward pass over an OFFICIAL state dict: the test oracle for the Flax model.

Written from the semantics verified against the official PyTorch code (see FITV2_FACTS.md §1),
sharing no code with fitv2_jax: weights are read by their official key names, tokens are
(B, N, C), everything is float64. Covers the options the tests exercise: FiTv2 (qk layernorm,
AdaLN-LoRA, SwiGLU 2/3) and FiT v1 (full adaLN, SwiGLU 4D, learn_sigma), every RoPE rule.
"""

from __future__ import annotations

import math

import numpy as np


def _linear(sd, name, x):
    y = x @ sd[name + ".weight"].astype(np.float64).T
    if name + ".bias" in sd:
        y = y + sd[name + ".bias"]
    return y


def _layernorm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def _silu(x):
    return x / (1 + np.exp(-x))


def _rope_freqs(cfg, size):
    """Returns (freqs_h, freqs_w) of shape (B, D/4) and the magnitude factor (B,)."""
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    d = head_dim // 2
    theta = cfg.get("rope_theta", 10000.0)
    rule = cfg.get("custom_freqs", "normal")
    expo = np.arange(0, d, 2) / d
    base = 1.0 / theta**expo
    batch = size.shape[0]
    if rule == "normal":
        return np.tile(base, (batch, 1)), np.tile(base, (batch, 1)), np.ones(batch)
    ori = cfg["ori_max_pe_len"]
    if cfg.get("online_rope"):
        lh, lw = size[:, 0].astype(np.float64), size[:, 1].astype(np.float64)
    else:
        lh = np.full(batch, float(cfg["max_pe_len_h"]))
        lw = np.full(batch, float(cfg["max_pe_len_w"]))
    longest = np.maximum(lh, lw)
    if cfg.get("decouple"):
        sh, sw = np.maximum(lh / ori, 1), np.maximum(lw / ori, 1)
    else:
        sh = sw = np.maximum(longest / ori, 1)

    def ramp(lo_rot, hi_rot):
        def f(r):
            return d * math.log(ori / (r * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = max(math.floor(f(lo_rot)), 0), min(math.ceil(f(hi_rot)), d - 1)
        if lo == hi:
            hi += 0.001
        return np.clip((np.arange(d // 2) - lo) / (hi - lo), 0, 1)

    def per_axis(s):
        s = s[:, None]
        linear = base / s
        ntk = 1.0 / (theta * s ** (d / (d - 2))) ** expo
        if rule == "linear":
            return linear
        if rule.startswith("ntk-aware"):
            return ntk
        if rule == "ntk-by-parts":
            w = 1 - ramp(1.25, 0.75)
            f = linear * (1 - w) + ntk * w
            w = 1 - ramp(16, 2)
            return f * (1 - w) + base * w
        if rule == "yarn":
            w = 1 - ramp(32, 1)
            return linear * (1 - w) + base * w
        raise ValueError(rule)

    factor = np.ones(batch)
    if rule == "yarn":
        s = np.maximum(longest / ori, 1)
        factor = np.where(s <= 1, 1.0, 0.1 * np.log(s) + 1)
    elif rule == "ntk-aware-pro1":
        factor = np.where(2 * longest <= ori, 1.0, np.sqrt(np.log(2 * longest) / np.log(ori)))
    elif rule == "ntk-aware-pro2":
        area = lh * lw
        factor = np.where(2 * area <= ori**2, 1.0, np.sqrt(np.log(2 * area) / np.log(ori**2)))
    return per_axis(sh), per_axis(sw), factor


def _rotate(x, cos, sin):
    """x: (B, H, N, Dh); cos/sin: (B, 1, N, Dh) per channel (pairs repeated)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = np.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * cos + rot * sin


def _mlp(sd, prefix, x, swiglu):
    if swiglu:
        return _linear(
            sd,
            prefix + ".fc2",
            _silu(_linear(sd, prefix + ".fc1_g", x)) * _linear(sd, prefix + ".fc1_x", x),
        )
    h = _linear(sd, prefix + ".fc1", x)
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return _linear(sd, prefix + ".fc2", h)


def forward(sd: dict, cfg: dict, x, t, y, grid, mask, size=None):
    """Official FiT forward (eval mode). x: (B, N, p*p*C); returns (B, N, p*p*C_out) float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x, np.float64)
    mask = np.asarray(mask, np.float64)
    d, heads = cfg["hidden_size"], cfg["num_heads"]
    hd = d // heads
    s = cfg.get("time_shifting", 1)
    t = np.minimum(s * np.asarray(t, np.float64) / (1 + (s - 1) * np.asarray(t, np.float64)), 1.0)

    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], -1)
    c = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", temb)))
    c = c + sd["y_embedder.embedding_table.weight"][np.asarray(y)]
    h = _linear(sd, "x_embedder.proj", x)

    batch = x.shape[0]
    size = np.asarray(size if size is not None else np.zeros((batch, 2))).reshape(batch, -1)[:, :2]
    fh, fw, factor = _rope_freqs(cfg, size)
    ang_h = grid[:, 1][..., None] * fh[:, None, :]
    ang_w = grid[:, 0][..., None] * fw[:, None, :]
    ang = np.concatenate([np.repeat(ang_h, 2, -1), np.repeat(ang_w, 2, -1)], -1)  # (B, N, Dh)
    cos = (np.cos(ang) * factor[:, None, None])[:, None]
    sin = (np.sin(ang) * factor[:, None, None])[:, None]

    lora = cfg.get("adaln_type", "normal") == "lora"
    g = _linear(sd, "global_adaLN_modulation.1", _silu(c)) if lora else 0.0
    same = mask[:, None, :, None] == mask[:, None, None, :]
    swiglu = cfg.get("use_swiglu", False)
    qk_norm = cfg.get("q_norm") == "layernorm"
    n = x.shape[1]
    for i in range(cfg["depth"]):
        p = f"blocks.{i}."
        mod = _silu(c)
        if lora:
            mod = _linear(sd, p + "adaLN_modulation.2", _linear(sd, p + "adaLN_modulation.1", mod))
        else:
            mod = _linear(sd, p + "adaLN_modulation.1", mod)
        sh1, sc1, g1, sh2, sc2, g2 = np.split(mod + g, 6, -1)
        a = _layernorm(h) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = (
            _linear(sd, p + "attn.qkv", a).reshape(batch, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        )
        q, k, v = qkv
        if qk_norm:
            q, k = _layernorm(q), _layernorm(k)
            if cfg.get("qk_norm_weight"):
                q, k = q * sd[p + "attn.q_norm.weight"], k * sd[p + "attn.k_norm.weight"]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cfg.get("add_rel_pe_to_v"):
            v = _rotate(v, cos, sin)
        logits = np.where(same, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        o = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, n, d) * mask[..., None]
        h = h + g1[:, None] * _linear(sd, p + "attn.proj", o)
        m = _layernorm(h) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * _mlp(sd, p + "mlp", m, swiglu)
    shift, scale = np.split(_linear(sd, "final_layer.adaLN_modulation.1", _silu(c)), 2, -1)
    out = _linear(sd, "final_layer.linear", _layernorm(h) * (1 + scale[:, None]) + shift[:, None])
    return out * mask[..., None]


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official FiT state dict for the options above (torch (out, in) weights)."""
    d, p, c_in = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
    c_out = 2 * c_in if cfg.get("learn_sigma") else c_in
    hidden = int(d * cfg.get("mlp_ratio", 4.0))
    swiglu = cfg.get("use_swiglu", False)
    if swiglu and not cfg.get("use_swiglu_large", False):
        hidden = hidden * 2 // 3
    shapes = {
        "x_embedder.proj.weight": (d, p * p * c_in),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (cfg["num_classes"] + 1, d),
        "final_layer.linear.weight": (p * p * c_out, d),
        "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    lora = cfg.get("adaln_type", "normal") == "lora"
    if lora:
        shapes["global_adaLN_modulation.1.weight"] = (6 * d, d)
        shapes["global_adaLN_modulation.1.bias"] = (6 * d,)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,)})
        shapes.update({b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)})
        if cfg.get("q_norm") == "layernorm" and cfg.get("qk_norm_weight"):
            hd = d // cfg["num_heads"]
            shapes.update({b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,)})
        names = ["fc1_g", "fc1_x"] if swiglu else ["fc1"]
        for n in names:
            shapes.update({b + f"mlp.{n}.weight": (hidden, d), b + f"mlp.{n}.bias": (hidden,)})
        shapes.update({b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
        if lora:
            r = cfg["adaln_lora_dim"]
            shapes.update(
                {b + "adaLN_modulation.1.weight": (r, d), b + "adaLN_modulation.1.bias": (r,)}
            )
            shapes.update(
                {
                    b + "adaLN_modulation.2.weight": (6 * d, r),
                    b + "adaLN_modulation.2.bias": (6 * d,),
                }
            )
        else:
            shapes.update(
                {
                    b + "adaLN_modulation.1.weight": (6 * d, d),
                    b + "adaLN_modulation.1.bias": (6 * d,),
                }
            )
    return shapes


def random_state_dict(cfg: dict, seed: int = 0, scale: float = 0.15) -> dict[str, np.ndarray]:
    """Random values in EVERY tensor (the official init zeroes the output layers)."""
    rng = np.random.default_rng(seed)
    return {
        k: (scale * rng.standard_normal(s)).astype(np.float32)
        for k, s in official_shapes(cfg).items()
    }
