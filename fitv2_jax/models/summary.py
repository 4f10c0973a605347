"""Parameter counts and linear-layer GFLOPs of a config, split by component (no allocation).

    python -m fitv2_jax.summary --config configs/fitv2_xl.py [--tokens 256]   # the command
    s = summarize(config.model, tokens=256)                                 # the library

GFLOPs follow the paper's convention: multiply-accumulates of the linear layers only, per image,
attention-map products left out (reported separately). Per-token layers (patch embedding, q/k/v and
output projections, FFN, final linear) cost N * in * out; per-image layers (timestep MLP, adaLN)
cost in * out once.
"""

from __future__ import annotations

import math
from collections import defaultdict

import flax

from fitv2_jax.models.build import abstract_params, build_model
from fitv2_jax.models.convert import is_post_training_param

COMPONENTS = (
    "embedders",
    "attention",
    "ffn",
    "adaln_blocks",
    "adaln_global",
    "final_layer",
    "norms",
)


def component_of(path: tuple[str, ...]) -> str:
    if path[0] in ("x_embedder", "t_embedder", "y_embedder"):
        return "embedders"
    if path[0] == "global_adaLN_modulation":
        return "adaln_global"
    if path[0] == "final_layer":
        return "final_layer"
    if "adaLN_modulation" in path:
        return "adaln_blocks"
    if "attn" in path and path[-1] != "weight":
        return "attention"
    if "mlp" in path:
        return "ffn"
    return "norms"


def _per_token(path: tuple[str, ...]) -> bool:
    return path[0] in ("x_embedder",) or (
        component_of(path) in ("attention", "ffn") or path[:2] == ("final_layer", "linear")
    )


def summarize(model_config, tokens: int = 256) -> dict:
    """Returns {'params': {component: count}, 'gmacs': {component: GMACs per image}, totals}."""
    model = build_model(model_config)
    flat = flax.traverse_util.flatten_dict(abstract_params(model_config))
    params = defaultdict(int)
    macs = defaultdict(float)
    frozen = 0.0  # MACs of the kernels the post-training freezes
    for path, leaf in flat.items():
        count = math.prod(leaf.shape)
        comp = component_of(path)
        params[comp] += count
        if path[-1] == "kernel":
            kernel_macs = count * (tokens if _per_token(path) else 1)
            macs[comp] += kernel_macs
            if not is_post_training_param(path):
                frozen += kernel_macs
    attn_map = 2 * model.depth * tokens * tokens * model.hidden_size  # QK^T and PV, per image
    return {
        "params": {c: params[c] for c in COMPONENTS},
        "total_params": sum(params.values()),
        "gmacs": {c: macs[c] / 1e9 for c in COMPONENTS},
        "total_gmacs": sum(macs.values()) / 1e9,
        "attention_map_gmacs": attn_map / 1e9,
        "post_training_frozen_gmacs": frozen / 1e9,
        "tokens": tokens,
    }


def trainable_subset_params(model_config) -> int:
    """Parameters of the official high-resolution post-training subset (`is_post_training_param`)."""
    flat = flax.traverse_util.flatten_dict(abstract_params(model_config))
    return sum(math.prod(v.shape) for p, v in flat.items() if is_post_training_param(p))


def train_step_flops(model_config, batch: int, tokens: int, trainable: str = "all") -> float:
    """Model FLOPs of one forward + backward step on `batch` rows of `tokens` tokens:
    3 (fwd + 2x bwd) x 2 FLOPs per MAC x (linear-layer + attention-map MACs). With
    trainable="post_training" the frozen kernels have no weight gradient (`training.step.
    without_frozen_gradients`): 2 x 2 FLOPs per MAC for them, forward and input gradient."""
    if trainable not in ("all", "post_training"):
        raise ValueError(f"trainable={trainable!r}: 'all' or 'post_training'")
    s = summarize(model_config, tokens=tokens)
    macs = 3.0 * (s["total_gmacs"] + s["attention_map_gmacs"])
    if trainable == "post_training":
        macs -= s["post_training_frozen_gmacs"]
    return 2.0 * macs * 1e9 * batch


def format_summary(s: dict) -> str:
    lines = [f"{'component':<14}{'params (M)':>12}{'GMACs@' + str(s['tokens']):>14}"]
    for c in COMPONENTS:
        lines.append(f"{c:<14}{s['params'][c] / 1e6:>12.2f}{s['gmacs'][c]:>14.2f}")
    lines.append(f"{'total':<14}{s['total_params'] / 1e6:>12.2f}{s['total_gmacs']:>14.2f}")
    lines.append(f"attention maps (not in the paper's count): {s['attention_map_gmacs']:.2f} GMACs")
    return "\n".join(lines)
