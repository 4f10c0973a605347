r"""The official PyTorch FiT timed on this machine: the child process of `bench --suite versus`.

    python -m fitv2_jax.benchmarks._official_torch --src PATH --params JSON --batch_size 8 \
        --tokens 256 --repeats 5 --what forward,train,cfg

Imports the official model from a local checkout of the public whlzy/FiT repository (`--src`, the
directory holding `fit/`; never vendored), builds it from our config's model fields (the official
`network_config.params` names), and times on `--batch_size` full-length images of `--tokens` tokens:
  forward  model(x, t, y, grid, mask) under torch.no_grad() in eval mode
  train    the official train_fitv2.py step: forward, masked velocity MSE, backward,
           clip_grad_norm_(1.0), AdamW step, update_ema (their per-parameter mul_/add_)
  cfg      forward_with_cfg on the doubled batch (one guided velocity evaluation)
Prints `RESULT {json}` (median seconds per call, torch threads). Imports no jax: the two
frameworks never share a process or its thread pools.

Two modules the official model imports are not needed on a CPU and are stubbed when absent:
`triton` (their fused-norm kernels, unused by the FiTv2 configs) and `fit.model.sincos` (absolute
position embeddings, unused by FiT). timm and einops must be installed; `pip install --no-deps timm`
keeps torch's CPU build (timm's torchvision, absent then, is not needed: see
_timm_layers_without_torchvision).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types

from absl import app, flags


class _Inert:
    """Any attribute or call: a stand-in for triton's decorators and type annotations."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a bare decorator
        return _Inert()


def _stub_module(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__getattr__ = _Inert().__getattr__
    sys.modules[name] = module


def _timm_layers_without_torchvision() -> None:
    """timm's package __init__ imports torchvision, which has no CPU-only wheel on PyPI for every
    torch; the official model needs only timm/layers/mlp.py, which does not. Registers `timm` and
    `timm.layers` as bare packages so that their submodules load without the __init__s."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        raise SystemExit("the official model needs timm: pip install --no-deps timm einops")
    root = os.path.dirname(spec.origin)
    for name, path in (("timm", root), ("timm.layers", os.path.join(root, "layers"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package


def import_official_fit(src: str):
    """The official `fit.model.fit_model.FiT` class from a checkout at `src`."""
    if not os.path.isfile(os.path.join(src, "fit", "model", "fit_model.py")):
        raise SystemExit(f"--official_src {src}: no fit/model/fit_model.py there; give the "
                         f"directory of a checkout of the public whlzy/FiT repository")  # fmt: skip
    sys.path.insert(0, os.path.abspath(src))
    stubs = []
    try:
        importlib.import_module("triton")
    except ImportError:  # stubbed while fit/ imports, then removed: torch probes for triton too
        stubs = ["triton", "triton.language"]
        for name in stubs:
            _stub_module(name)
    try:
        importlib.import_module("timm")
    except ImportError:
        _timm_layers_without_torchvision()
    if not os.path.isfile(os.path.join(src, "fit", "model", "sincos.py")):

        def _absent(*args, **kwargs):
            raise NotImplementedError("fit.model.sincos is absent from this checkout")

        _stub_module("fit.model.sincos", get_2d_sincos_pos_embed_from_grid=_absent)
    try:
        fit_class = importlib.import_module("fit.model.fit_model").FiT
    except ImportError as e:
        raise SystemExit(
            f"the official model needs {e.name}: pip install --no-deps timm einops"
        ) from e
    finally:
        for name in stubs:
            del sys.modules[name]
    return fit_class


def inputs(torch, params: dict, batch: int, tokens: int) -> dict:
    """Full-length images on a near-square grid, (B, N, p*p*C) tokens (use_sit layout)."""
    side = int(round(tokens**0.5))
    h, w = side, tokens // side
    n = h * w
    g = torch.Generator().manual_seed(0)
    channels = params["patch_size"] ** 2 * params["in_channels"]
    grid = torch.stack([torch.arange(w).repeat(h), torch.arange(h).repeat_interleave(w)])
    return dict(
        x=torch.randn(batch, n, channels, generator=g),
        t=torch.rand(batch, generator=g),
        y=torch.randint(0, params["num_classes"], (batch,), generator=g),
        grid=grid[None].expand(batch, 2, n).contiguous(),
        mask=torch.ones(batch, n),
        size=torch.tensor([[h, w]]).repeat(batch, 1)[:, None],
    )


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


flags.DEFINE_string("src", None, "checkout of the public whlzy/FiT repository (holds fit/)")
flags.DEFINE_string("params", None, "JSON of the official network_config params (without "
                    "models.fit.OWN_FIELDS)")  # fmt: skip
flags.DEFINE_integer("batch_size", 8, "images per call")
flags.DEFINE_integer("tokens", 256, "tokens per image (a near-square grid)")
flags.DEFINE_integer("repeats", 5, "timed calls, median reported")
flags.DEFINE_string("what", "forward,train,cfg", "what to time")
flags.DEFINE_float("learning_rate", 1e-4, "AdamW learning rate")
flags.DEFINE_float("ema_decay", 0.9999, "EMA decay")
flags.mark_flags_as_required(["src", "params"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    args = FLAGS

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    params = json.loads(args.params)
    FiT = import_official_fit(args.src)
    torch.manual_seed(0)
    model = FiT(**params)
    inp = inputs(torch, params, args.batch_size, args.tokens)
    kw = {k: inp[k] for k in ("y", "grid", "mask")}
    result = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                  params_m=sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
    what = args.what.split(",")

    if "forward" in what:
        model.eval()

        @torch.no_grad()
        def forward():
            return model(inp["x"], inp["t"], **kw)

        result["forward_s"] = median_seconds(forward, args.repeats)

    if "cfg" in what:
        model.eval()
        doubled = {k: torch.cat([v, v]) for k, v in inp.items()}
        doubled["y"][args.batch_size :] = params["num_classes"]

        @torch.no_grad()
        def cfg():
            return model.forward_with_cfg(doubled["x"], doubled["t"], doubled["y"],
                                          doubled["grid"], doubled["mask"], None,
                                          cfg_scale=1.5)  # fmt: skip

        result["cfg_s"] = median_seconds(cfg, args.repeats)

    if "train" in what:
        model.train()
        ema = {k: p.detach().clone() for k, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
        mask = inp["mask"][..., None]

        def train():
            x1 = inp["x"]
            x0 = torch.randn_like(x1)
            t = torch.rand(x1.shape[0])
            x_t = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
            out = model(x_t, t, **kw)
            loss = (((out - (x1 - x0)) * mask) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    ema[name].mul_(args.ema_decay).add_(p.data, alpha=1 - args.ema_decay)
            return loss

        result["train_s"] = median_seconds(train, args.repeats)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
