"""The parameter subset trained (and re-initialised) in high-resolution post-training.

The official configs list `ignore_keys: ['x_embedder', 'bias', 'LN', 'final_layer']`: every
parameter whose official key contains one of these substrings is re-initialised instead of loaded,
and only those train ('LN' matches `adaLN_modulation` and `global_adaLN_modulation`). For FiTv2-XL/2
that is 95.0M of 671.0M parameters.
"""

from __future__ import annotations

from fitv2_jax.models.convert import _torch_name

OFFICIAL_POST_TRAINING_KEYS = ("x_embedder", "bias", "LN", "final_layer")


def is_post_training_param(path: tuple[str, ...], patterns=OFFICIAL_POST_TRAINING_KEYS) -> bool:
    """path: a Flax param path such as ('blocks', 'attn', 'qkv', 'bias')."""
    name = _torch_name(path[1:] if path[0] == "blocks" else path)
    return any(p in name for p in patterns)
