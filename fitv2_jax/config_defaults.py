"""The shared defaults every config in configs/ starts from (model sections are set per file).

`get_config().model` holds exactly the FiT constructor arguments (official names plus our compute
options), so `FiT(**config.model)` builds the network.
"""

from __future__ import annotations

import ml_collections


def fitv2_model(
    hidden_size: int, depth: int, num_heads: int, **overrides
) -> ml_collections.ConfigDict:
    """FiTv2 network params as in the official configs/fitv2/*.yaml (AdaLN-LoRA rank = D / 4)."""
    model = dict(
        context_size=256,
        patch_size=2,
        in_channels=4,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=False,
        use_sit=True,
        use_swiglu=True,
        use_swiglu_large=False,
        q_norm="layernorm",
        k_norm="layernorm",
        qk_norm_weight=False,
        rel_pos_embed="rope",
        adaln_type="lora",
        adaln_lora_dim=hidden_size // 4,
        rope_theta=10000.0,
        custom_freqs="normal",
        max_pe_len_h=None,
        max_pe_len_w=None,
        decouple=False,
        ori_max_pe_len=None,
        online_rope=False,
        time_shifting=1.0,
        # compute options (ours)
        dtype="float32",
        remat_policy="none",
        attention_backend="xla",
    )
    model.update(overrides)
    return ml_collections.ConfigDict(model)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = fitv2_model(1152, 36, 16)
    return config
