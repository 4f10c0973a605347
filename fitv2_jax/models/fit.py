"""FiT / FiTv2: the flexible-resolution diffusion transformer, as a Flax Linen module.

    model = FiT(**config.model)
    out = model.apply({"params": params}, x, t, y, grid, mask, size=None, train=False)

x: (B, N, p*p*C) patchified tokens (per token (c, p1, p2) order), t: (B,) float in [0, 1],
y: (B,) int labels (num_classes = null class), grid: (B, 2, N) int (row 0 = w index, row 1 =
h index), mask: (B, N) 0/1 (or segment ids for packed sequences), size: (B, 2) (h, w) in patches
for online RoPE. Returns (B, N, p*p*C_out), zero on padded tokens.

The fields are the official `network_config.params` names, so an official YAML's params can be
passed straight in (`from_official_params`). Fields marked "accepted for compatibility" do not
change the network here: `use_sit` (our token layout is always (B, N, C), the SiT layout),
`use_checkpoint` (use `remat_policy`), `pretrain_ckpt`/`ignore_keys`/`finetune` (training-time
loading and freezing live in fitv2_jax.training), `abs_pos_embed` (FiT has none).
Compute options of our own: dtype, param_dtype, remat_policy, attention_backend, scan_unroll,
gather_attention_once (under an FSDP mesh, each block's q/k/v and output-projection kernels are
all-gathered once in the forward and the backward reuses them: depth x 4 D^2 compute-dtype values
more per device when the blocks are not recomputed, fewer gathers; with the kernels stored flat,
FSDP without remat already gathers them once, and the option no longer pays there; README);
and clamp_time: the official code clamps t at 1 after time shifting, which is right for the
rectified-flow models (t in [0, 1]; dopri5 overshoots past 1) but would pin FiT v1's DDPM steps
(0..999) at 1, so FiT v1 configs turn it off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fitv2_jax.models.attention import Attention, resolve_backend, saves_probs
from fitv2_jax.models.layers import (
    GeluMlp,
    LabelEmbedder,
    Linear,
    Modulation,
    Norm,
    SwiGLU,
    TimestepEmbedder,
    modulate,
    per_token,
)
from fitv2_jax.models.rope import RopeConfig, rope_cos_sin
from fitv2_jax.parallel.platform import tpu_device_kind

# "projections": the backward recomputes only elementwise work (norms, modulation, q/k norm,
# RoPE, gating) from the saved projection outputs and the attention's output and log-sum-exp
# (named in models.softmax_attention; splash recomputes its forward). The CPU configs' choice:
# fewer, smaller residual stacks to fill and copy (demo train step +3-5%); on TPU full remat
# estimates faster (FiTv2-XL v5p-64: 91.7 ms vs 74.9 ms).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "projections": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
    ),
}


def mlp_hidden_size(
    hidden_size: int, mlp_ratio: float, use_swiglu: bool, swiglu_large: bool
) -> int:
    """FFN width: int(D * ratio), and 2/3 of it for the (non-large) SwiGLU of FiTv2."""
    hidden = int(hidden_size * mlp_ratio)
    if use_swiglu and not swiglu_large:
        hidden = hidden * 2 // 3
    return hidden


class FiTBlock(nn.Module):
    """One transformer block with adaLN-Zero modulation; (x, None) in and out for nn.scan."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    use_swiglu: bool
    use_swiglu_large: bool
    norm_type: str
    q_norm: str | None
    k_norm: str | None
    qk_norm_weight: bool
    qkv_bias: bool
    ffn_bias: bool
    adaln_bias: bool
    adaln_type: str
    adaln_lora_dim: int | None
    use_rope: bool
    add_rel_pe_to_v: bool
    attention_backend: str
    gather_attention_once: bool
    attention_saves_probs: bool
    dtype: Any

    @nn.compact
    def __call__(self, x, c, segment_ids, cos, sin, global_adaln, seg_index):
        d = self.hidden_size
        mod = Modulation(hidden_size=d, chunks=6, kind=self.adaln_type,
                         lora_dim=self.adaln_lora_dim, use_bias=self.adaln_bias, dtype=self.dtype,
                         name="adaLN_modulation")(c)  # fmt: skip
        mod = mod + global_adaln
        if seg_index is not None:  # packed rows: each token takes its own image's modulation
            mod = jnp.take_along_axis(mod, seg_index[..., None], axis=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

        h = modulate(Norm(self.norm_type, "embed", name="norm1")(x), shift_msa, scale_msa)
        h = Attention(
            num_heads=self.num_heads, qkv_bias=self.qkv_bias, q_norm=self.q_norm,
            k_norm=self.k_norm, qk_norm_weight=self.qk_norm_weight, use_rope=self.use_rope,
            rope_on_v=self.add_rel_pe_to_v, backend=self.attention_backend,
            gather_once=self.gather_attention_once, save_probs=self.attention_saves_probs,
            dtype=self.dtype, name="attn",
        )(h, segment_ids, cos, sin)  # fmt: skip
        x = x + per_token(gate_msa) * h

        h = modulate(Norm(self.norm_type, "embed", name="norm2")(x), shift_mlp, scale_mlp)
        hidden = mlp_hidden_size(d, self.mlp_ratio, self.use_swiglu, self.use_swiglu_large)
        if self.use_swiglu:
            h = SwiGLU(hidden, d, self.ffn_bias, dtype=self.dtype, name="mlp")(h)
        else:
            h = GeluMlp(hidden, d, self.ffn_bias, dtype=self.dtype, name="mlp")(h)
        x = x + per_token(gate_mlp) * h
        x = nn.with_logical_constraint(
            x, ("activation_batch", "activation_length", "activation_embed")
        )
        return x, None


class FinalLayer(nn.Module):
    """Non-affine norm, adaLN shift/scale from c, Linear(D, p*p*C_out); zero-initialised."""

    hidden_size: int
    out_features: int
    norm_type: str
    adaln_type: str
    adaln_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self, x, c, seg_index=None):
        kind = "swiglu" if self.adaln_type == "swiglu" else "normal"
        mod = Modulation(
            self.hidden_size,
            2,
            kind,
            use_bias=self.adaln_bias,
            swiglu_hidden=self.hidden_size // 2,
            dtype=self.dtype,
            name="adaLN_modulation",
        )(c)
        if seg_index is not None:
            mod = jnp.take_along_axis(mod, seg_index[..., None], axis=1)
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(Norm(self.norm_type, "embed", name="norm_final")(x), shift, scale)
        return Linear(
            self.out_features,
            ("embed", "patch_out"),
            zero_init=True,
            dtype=self.dtype,
            name="linear",
        )(x)


class FiT(nn.Module):
    """Flexible Vision Transformer for diffusion (FiT v1 and FiTv2, chosen by config)."""

    # --- official network_config.params names ---
    context_size: int = 256
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    use_sit: bool = False  # accepted for compatibility (layout is always (B, N, C))
    use_checkpoint: bool = False  # accepted for compatibility (see remat_policy)
    use_swiglu: bool = False
    use_swiglu_large: bool = False
    rel_pos_embed: str | None = "rope"
    abs_pos_embed: str | None = None  # accepted for compatibility; must be None
    norm_type: str = "layernorm"
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_weight: bool = False
    qkv_bias: bool = True
    ffn_bias: bool = True
    adaln_bias: bool = True
    adaln_type: str = "normal"
    adaln_lora_dim: int | None = None
    rope_theta: float = 10000.0
    custom_freqs: str = "normal"
    max_pe_len_h: int | None = None
    max_pe_len_w: int | None = None
    decouple: bool = False
    ori_max_pe_len: int | None = None
    online_rope: bool = False
    add_rel_pe_to_v: bool = False
    pretrain_ckpt: str | None = None  # accepted for compatibility
    ignore_keys: tuple | None = None  # accepted for compatibility
    finetune: str | None = None  # accepted for compatibility
    time_shifting: float = 1.0
    # --- compute options of our own ---
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention_backend: str = "xla"
    scan_unroll: int = 1
    # all-gather each block's q/k/v and output kernels once (FSDP) and keep them for the backward
    gather_attention_once: bool = False
    clamp_time: bool = True  # t <= 1 after time shifting (flow models); FiT v1 gets DDPM steps

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def rope_config(self) -> RopeConfig:
        return RopeConfig(
            head_dim=self.head_dim,
            theta=self.rope_theta,
            custom_freqs=self.custom_freqs,
            max_pe_len_h=self.max_pe_len_h,
            max_pe_len_w=self.max_pe_len_w,
            decouple=self.decouple,
            ori_max_pe_len=self.ori_max_pe_len,
            online_rope=self.online_rope,
        )

    def _check(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}."
            )
        if self.abs_pos_embed not in (None, "none", ""):
            raise ValueError(
                f"abs_pos_embed={self.abs_pos_embed!r} is not supported: FiT uses RoPE only."
            )
        if self.rel_pos_embed not in (None, "rope", "xpos"):
            raise ValueError(f"rel_pos_embed={self.rel_pos_embed!r}: use 'rope' or None.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}."
            )

    def _conditioning(self, t, y, train, force_drop):
        """c = t_emb + y_emb: (B, D), or (B, S, D) per image of packed rows (y, t (B, S))."""
        packed = y.ndim == 2
        if packed:
            batch, segments = y.shape
            t, y = t.reshape(-1), y.reshape(-1)
            force_drop = None if force_drop is None else force_drop.reshape(-1)
        c = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder")(t)
        c = c + LabelEmbedder(
            self.num_classes, self.hidden_size, self.class_dropout_prob, name="y_embedder"
        )(y, train, force_drop).astype(c.dtype)
        return c.reshape(batch, segments, -1) if packed else c

    def _rope(self, grid, size, seg_index):
        """(cos, sin) of every token's 2D position, or (None, None) without RoPE."""
        if self.rel_pos_embed not in ("rope", "xpos"):
            return None, None
        if seg_index is not None and size is not None and size.ndim == 3:
            size = jnp.take_along_axis(size, seg_index[..., None], axis=1)  # per image -> token
        return rope_cos_sin(self.rope_config(), grid, size)

    def _global_adaln(self, c):
        """AdaLN-LoRA's shared full-rank part W_g(c), added to every block's modulation."""
        if self.adaln_type != "lora":
            return jnp.zeros((), c.dtype)
        return Linear(6 * self.hidden_size, ("embed", "adaln"), self.adaln_bias, zero_init=True,
                      dtype=self.dtype, name="global_adaLN_modulation")(nn.silu(c))  # fmt: skip

    def _blocks(self, tokens: int):
        """The `depth` blocks as one scanned (and, per remat_policy, rematerialised) module;
        attention "auto" is resolved here, where remat is known (`attention.resolve_backend`)."""
        tpu = tpu_device_kind()
        backend = resolve_backend(self.attention_backend, tokens, tpu, self.remat_policy)
        save_probs = saves_probs(backend, tokens, tpu is not None, self.remat_policy)
        block = FiTBlock
        if self.remat_policy != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 6,
            length=self.depth,
            unroll=self.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(
            hidden_size=self.hidden_size, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
            use_swiglu=self.use_swiglu, use_swiglu_large=self.use_swiglu_large,
            norm_type=self.norm_type, q_norm=self.q_norm, k_norm=self.k_norm,
            qk_norm_weight=self.qk_norm_weight, qkv_bias=self.qkv_bias, ffn_bias=self.ffn_bias,
            adaln_bias=self.adaln_bias, adaln_type=self.adaln_type,
            adaln_lora_dim=self.adaln_lora_dim, use_rope=self.rel_pos_embed in ("rope", "xpos"),
            add_rel_pe_to_v=self.add_rel_pe_to_v, attention_backend=backend,
            gather_attention_once=self.gather_attention_once, attention_saves_probs=save_probs,
            dtype=self.dtype, name="blocks",
        )  # fmt: skip

    @nn.compact
    def __call__(self, x, t, y, grid, mask, size=None, train: bool = False, force_drop=None):
        self._check()
        s = self.time_shifting
        t = s * t / (1 + (s - 1) * t)
        t = (jnp.minimum(t, 1.0) if self.clamp_time else t).astype(jnp.float32)
        segment_ids = mask.astype(jnp.int32)
        valid = (segment_ids != 0).astype(jnp.float32)
        # Packed rows (several images per sequence): y, t (B, S) per image, mask = segment ids
        # 1..S (0 = padding); conditioning is computed per image and gathered per token.
        seg_index = None
        if y.ndim == 2:
            seg_index = jnp.clip(segment_ids - 1, 0, y.shape[1] - 1)

        h = Linear(self.hidden_size, ("patch_in", "embed"), dtype=self.dtype, name="x_embedder")(x)
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_embed")
        )
        c = self._conditioning(t, y, train, force_drop)
        cos, sin = self._rope(grid, size, seg_index)
        h, _ = self._blocks(h.shape[1])(
            h, c, segment_ids, cos, sin, self._global_adaln(c), seg_index
        )
        out = FinalLayer(
            hidden_size=self.hidden_size, out_features=self.patch_size**2 * self.out_channels,
            norm_type=self.norm_type, adaln_type=self.adaln_type, adaln_bias=self.adaln_bias,
            dtype=self.dtype, name="final_layer",
        )(h, c, seg_index)  # fmt: skip
        return (out * valid[..., None].astype(out.dtype)).astype(jnp.float32)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(FiT) if f.name not in ("parent", "name"))
# How the network computes, not what it computes (module doc): a run may resume with them changed.
COMPUTE_OPTIONS = ("dtype", "param_dtype", "remat_policy", "attention_backend", "scan_unroll",
                   "gather_attention_once")  # fmt: skip
# Our fields that the official FiT constructor does not take.
OWN_FIELDS = COMPUTE_OPTIONS + ("clamp_time",)
IGNORED_OFFICIAL_KEYS = ("target",)


def from_official_params(params: dict, **overrides) -> FiT:
    """Builds FiT from an official YAML's `network_config.params` (or `network_config`).

    Unknown names are an error that lists them, so a typo never silently changes the network.
    """
    params = dict(params.get("params", params))
    params.update(overrides)
    unknown = sorted(k for k in params if k not in FIELD_NAMES and k not in IGNORED_OFFICIAL_KEYS)
    if unknown:
        raise ValueError(f"Unknown FiT config names {unknown}; known names: {list(FIELD_NAMES)}")
    if params.get("ignore_keys") is not None:
        params["ignore_keys"] = tuple(params["ignore_keys"])
    return FiT(**{k: v for k, v in params.items() if k in FIELD_NAMES})
