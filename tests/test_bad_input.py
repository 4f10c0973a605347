"""Bad input, table-driven: every command answers a user's mistake with one line on stderr that
names the flag or file (exit status 2, no traceback), and leaves every input file byte-identical.

Each case runs the real command (`fitv2_jax.NAME` as `__main__`, in a process forked from one that
has already imported the libraries: tests/cli_forkserver.py) on its own copy of a small set of
inputs (a prepared dataset, a finished two-step run, official-layout checkpoints, .npz archives,
broken files); the copies are hashed before and after. The cases run two at a time.
"""

import concurrent.futures
import hashlib
import os
import shutil

import numpy as np
import pytest
from cli import cli_env, error_line
from cli_forkserver import Forkservers
from PIL import Image
from safetensors.numpy import save_file

from fitv2_jax.config.files import load_config
from fitv2_jax.data.encoders import PixelEncoder
from fitv2_jax.data.shard_writer import PrepareSettings, prepare_split
from fitv2_jax.data.sources import open_source
from fitv2_jax.models.convert import to_torch_state_dict
from fitv2_jax.training.loop import train
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.fit import random_params

# A pixel-space tiny FiTv2 over 16x16 patches (sample/evaluate), and one over 2x2 patches that
# matches the prepared dataset (train).
PIXEL = ["--config", "configs/tiny.py", "--config.latent=false", "--config.model.in_channels=3",
         "--config.model.patch_size=16"]  # fmt: skip
TRAIN = ["--config", "configs/tiny.py", "--config.latent=false", "--config.model.in_channels=3",
         "--config.model.num_classes=7", "--config.model.context_size=64",
         "--config.data.path={d}/ds", "--config.data.global_batch_size=8",
         "--config.data.num_buckets=1", "--config.train.total_steps=2",
         "--config.train.checkpoint_every=1"]  # fmt: skip
RANDOM = ["--random_init", "--solver", "euler", "--num_steps", "1"]
NPZ = ["{d}/a.npz", "{d}/b.npz"]

CASES = [
    # prepare
    ("prepare", ["--out", "{o}"], "--source"),
    ("prepare", ["--source", "web", "--out", "{o}"], "--source"),
    ("prepare", ["--source", "folder", "--out", "{o}"], "--source folder needs --root"),
    ("prepare", ["--source", "folder", "--root", "{d}/nope", "--out", "{o}"], "nope"),
    ("prepare", ["--source", "demo", "--max-tokens", "64", "--out", "{o}"], "use --max_tokens"),
    ("prepare", ["--source", "demo", "--patch_size", "0", "--out", "{o}"], "--patch_size 0"),
    ("prepare", ["--source", "demo", "--max_tokens", "8", "--out", "{o}"], "below --min_tokens"),
    ("prepare", ["--source", "demo", "--num_shards", "0", "--out", "{o}"], "--num_shards 0"),
    ("prepare", ["--source", "demo", "--vae", "{d}/nope", "--out", "{o}"], "VAE weights not found"),
    ("prepare", ["--source", "demo", "--vae", "{d}/random.bin", "--out", "{o}"],
     "random.bin: not a readable torch weights file"),
    ("prepare", ["--source", "folder", "--root", "{d}/imgs", "--out", "{d}/ds", "--max_tokens",
                 "64"], "ds/dataset.json was prepared differently"),
    ("prepare", ["--source", "demo", "--demo_crops", "2", "--out", "{d}/ds", "--max_tokens", "32"],
     "max_tokens: 64 here, 32 now"),
    ("prepare", ["--source", "tfds", "--tfds_data_dir", "{d}/nope", "--out", "{o}"],
     "not prepared under"),
    # train
    ("train", ["--workdir", "{o}"], "--config"),
    ("train", ["--config", "{d}/nope.py", "--workdir", "{o}"], "nope.py: no such file"),
    ("train", ["--config", "{d}", "--workdir", "{o}"], "Is a directory, expected a Python file"),
    ("train", ["--config", "configs/tiny.py:x", "--workdir", "{o}"],
     "--config=configs/tiny.py:x: TypeError: get_config() takes 0 positional arguments"),
    ("train", ["--config", "configs/fitv2_b.py:v4-8", "--workdir", "{o}"],
     "--config=configs/fitv2_b.py:v4-8: config preset 'v4-8': this config has presets for"),
    ("train", [*TRAIN, "--config.laten=1", "--workdir", "{o}"], "unknown config field laten"),
    ("train", TRAIN, "--workdir is required"),
    ("train", [*TRAIN, "--workdir", "foo://bucket/run"], "unknown URL scheme foo://"),
    ("train", [*TRAIN, "--workdir", "/proc/fitv2_run"], "--workdir /proc/fitv2_run: cannot create"),
    ("train", [*TRAIN, "--config.data.path={d}/nope", "--workdir", "{o}"],
     "prepared dataset not found"),
    ("train", [*TRAIN, "--config.data.patch_size=4", "--workdir", "{o}"], "patch size 2"),
    ("train", [*TRAIN, "--config.model.num_classes=5", "--workdir", "{o}"], "has 7 classes"),
    ("train", [*TRAIN, "--config.model.hidden_size=32", "--workdir", "{d}/run"],
     "holds a run of another model (hidden_size: 64 -> 32)"),
    ("train", [*TRAIN, "--config.data.global_batch_size=3", "--workdir", "{o}"],
     "positive multiple"),
    ("train", [*TRAIN, "--config.mesh.ici=(3,-1,1)", "--workdir", "{o}"], "mesh.ici"),
    ("train", [*TRAIN, "--dry_run", "--topology", "v7-8"], "--topology='v7-8': expected a pod"),
    ("train", [*TRAIN, "--dry_run", "--topology", "v5p-63"], "--topology=v5p-63: v5p pod names"),
    ("train", [*TRAIN, "--config.train.trainable=some", "--workdir", "{o}"], "trainable='some'"),
    ("train", [*TRAIN, "--workdir", "{o}", "now"], "unexpected arguments"),
    # sample
    ("sample", [*PIXEL, "--out", "{o}"], "give exactly one of --checkpoint PATH and --random_init"),
    ("sample", [*PIXEL, "--checkpoint", "{d}/nope.safetensors", "--out", "{o}"], "not found"),
    ("sample", [*PIXEL, "--checkpoint", "{d}/random.bin", "--out", "{o}"],
     "not a readable torch weights file"),
    ("sample", [*PIXEL, "--checkpoint", "{d}/random.safetensors", "--out", "{o}"],
     "not a readable .safetensors file"),
    ("sample", [*PIXEL, "--checkpoint", "{d}/nan.safetensors", "--out", "{o}"], "NaN or Inf"),
    ("sample", [*PIXEL, "--checkpoint", "{d}/int.safetensors", "--out", "{o}"],
     "expected floating point"),
    ("sample", [*PIXEL, "--config.model.depth=3", "--checkpoint", "{d}/official.safetensors",
                "--out", "{o}"], "does not match the model config"),
    ("sample", [*PIXEL, *RANDOM, "--sizes", "250x256", "--out", "{o}"], "use 240 or 256"),
    ("sample", [*PIXEL, *RANDOM, "--sizes", "100000x100000", "--out", "{o}"],
     "GiB of attention scores"),
    ("sample", [*PIXEL, *RANDOM, "--cfg_scale", "nan", "--out", "{o}"], "finite"),
    ("sample", [*PIXEL, *RANDOM, "--cfg_scale", "512x512=2", "--out", "{o}"],
     "512x512 is not one of the requested sizes"),
    ("sample", [*PIXEL, *RANDOM, "--rule", "ntk2", "--out", "{o}"], "unknown RoPE"),
    ("sample", [*PIXEL, *RANDOM, "--labels", "3,99", "--out", "{o}"], "labels must be in"),
    ("sample", [*PIXEL, *RANDOM, "--num_samples", "0", "--out", "{o}"], "--num_samples 0"),
    ("sample", [*PIXEL, "--random_init", "--num_steps", "0", "--out", "{o}"], "--num_steps 0"),
    ("sample", [*PIXEL, *RANDOM, "--cfg_interval", "0.5", "--out", "{o}"], "give two times"),
    ("sample", [*PIXEL, *RANDOM, "--cfg_interval", "0.8,0.2", "--out", "{o}"],
     "0 <= A <= B <= 1"),
    ("sample", [*PIXEL, "--random_init", "--atol", "0", "--out", "{o}"], "tolerances"),
    ("sample", ["--config", "configs/tiny.py", *RANDOM, "--out", "{o}"], "pass --vae"),
    ("sample", ["--config", "configs/tiny.py", *RANDOM, "--vae", "{d}/random.safetensors",
                "--out", "{o}"], "not a readable .safetensors file"),
    ("sample", [*PIXEL, *RANDOM, "--num_images", "4", "--out", "{o}"], "use --num_samples"),
    ("sample", ["--checkpoint", "{d}/official.safetensors", "--out", "{o}"],
     "--config is required"),
    # evaluate
    ("evaluate", [*PIXEL, *RANDOM, "--out", "{o}"], "give one reference"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_source", "folder", "--out", "{o}"], "needs --ref_root"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_npz", "{d}/nope.npz", "--out", "{o}"],
     "nope.npz: file not found"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_npz", "{d}/f32.npz", "--out", "{o}"],
     "has dtype float32"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_npz", "{d}/a.npz", "--sizes", "256x256=a.npz",
                  "--out", "{o}"], "HEIGHTxWIDTH"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_source", "demo", "--num_samples", "3", "--out", "{o}"],
     "need more than k=3"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_source", "demo", "--k", "0", "--out", "{o}"],
     "--k 0"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_source", "demo", "--num_ref", "1", "--out", "{o}"],
     "--num_ref 1"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_source", "demo", "--inception", "{d}/random.bin",
                  "--out", "{o}"], "not a readable torch weights file"),
    ("evaluate", [*PIXEL, *RANDOM, "--ref_source", "demo", "--resolutions", "256x256",
                  "--out", "{o}"], "use --sizes"),
    # evaluate_npz
    ("evaluate_npz", ["{d}/a.npz"], "give two files"),
    ("evaluate_npz", ["{d}/a.npz", "{d}/nope.npz"], "nope.npz: sample file not found"),
    ("evaluate_npz", ["{d}/a.npz", "{d}/random.bin"], "not an .npz archive"),
    ("evaluate_npz", ["{d}/a.npz", "{d}/f32.npz"], "has dtype float32"),
    ("evaluate_npz", ["{d}/three.npz", "{d}/a.npz"], "need at least 4"),
    ("evaluate_npz", [*NPZ, "--out", "{d}/a.npz"], "is one of the input files"),
    ("evaluate_npz", [*NPZ, "--k", "0"], "--k 0"),
    ("evaluate_npz", [*NPZ, "--json", "{o}/x.json"], "use --out"),
    ("evaluate_npz", [*NPZ, "--tmp_dir", "{d}/nope"], "--tmp_dir"),
    ("evaluate_npz", [*NPZ, "--inception", "{d}/random.bin"], "not a readable torch weights"),
    ("evaluate_npz", ["{d}/stats.npz", "{d}/a.npz"], "'pool' has shape (5, 17)"),
    # export
    ("export", ["--out", "{o}/x.safetensors"], "--checkpoint"),
    ("export", ["--checkpoint", "{d}/nope", "--out", "{o}/x.safetensors"], "not found"),
    ("export", ["--checkpoint", "{d}/official.safetensors", "--out", "{o}/x.safetensors"],
     "--config is required"),
    ("export", ["--checkpoint", "{d}/run", "--out", "{o}/x.npz"], "must be a .safetensors"),
    ("export", ["--checkpoint", "{d}/run", "--step", "99", "--out", "{o}/x.safetensors"],
     "no complete checkpoint at step 99"),
    ("export", [*PIXEL, "--checkpoint", "{d}/official.safetensors", "--out",
                "{d}/official.safetensors"], "is the input checkpoint"),
    ("export", ["--checkpoint", "{d}/run", "--output", "{o}/x.safetensors"], "use --out"),
    # summary, bench, demo
    ("summary", ["--tokens", "256"], "--config"),
    ("summary", ["--config", "configs/tiny.py", "--tokens=-5"], "--tokens -5"),
    ("summary", ["--config", "configs/nope.py"], "nope.py"),
    ("bench", [], "give --suite"),
    ("bench", ["--suite", "timing"], "no such suite"),
    ("bench", ["--suite", "model", "--batch", "2"], "use --batch_size"),
    ("demo", ["--resolutions", "32x32"], "use --sizes"),
    ("demo", ["again"], "unexpected arguments"),
]  # fmt: skip


def _write_inputs(d):
    """The inputs every case gets a copy of (a few MB)."""
    os.makedirs(d)
    prepare_split(open_source("demo", demo_crops=2), PixelEncoder(),
                  PrepareSettings(out=f"{d}/ds", max_tokens=64, patch_size=2, progress=False,
                                  source_kind="demo"))  # fmt: skip
    config = load_config("configs/tiny.py", [a.removeprefix("--config.").replace("{d}", d)
                                             for a in TRAIN[2:]])  # fmt: skip
    train(config, f"{d}/run")
    pixel = load_config("configs/tiny.py", ["latent=false", "model.in_channels=3",
                                            "model.patch_size=16"])  # fmt: skip
    sd = to_torch_state_dict(random_params(pixel.model), pixel.model)
    save_file(sd, f"{d}/official.safetensors")
    save_file({**sd, "x_embedder.proj.bias": np.full_like(sd["x_embedder.proj.bias"], np.nan)},
              f"{d}/nan.safetensors")  # fmt: skip
    save_file({k: v.astype(np.int32) for k, v in sd.items()}, f"{d}/int.safetensors")
    rng = np.random.default_rng(0)
    for name in ("random.bin", "random.safetensors"):
        with open(f"{d}/{name}", "wb") as f:
            f.write(rng.bytes(4096))
    for name, n in (("a", 8), ("b", 8), ("three", 3)):
        np.savez(f"{d}/{name}.npz", arr_0=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    np.savez(f"{d}/f32.npz", arr_0=np.zeros((8, 32, 32, 3), np.float32))
    np.savez(f"{d}/stats.npz", mu=np.zeros(16), sigma=np.eye(16), mu_s=np.zeros(16),
             sigma_s=np.eye(16), pool=np.zeros((5, 17), np.float32))  # fmt: skip
    for cls in ("cat", "dog"):
        os.makedirs(f"{d}/imgs/{cls}")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            f"{d}/imgs/{cls}/0.png"
        )


def _hashes(root) -> dict[str, str]:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _run_case(servers, i, case, inputs, tmp):
    command, args, _ = case
    d, o = os.path.join(tmp, f"case{i}", "in"), os.path.join(tmp, f"case{i}", "out")
    shutil.copytree(inputs, d)
    before = _hashes(d)
    args = [a.replace("{d}", d).replace("{o}", o) for a in args]
    proc = servers.run(command, *args, timeout=300)
    return proc, before == _hashes(d), os.path.exists(o) and bool(os.listdir(o))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("bad_input"))
    inputs = os.path.join(tmp, "inputs")
    _write_inputs(inputs)
    with Forkservers(2, cli_env()) as servers, concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_run_case, servers, i, c, inputs, tmp) for i, c in enumerate(CASES)]
        return [f.result() for f in futures]


def test_at_least_sixty_cases_across_every_command():
    assert len(CASES) >= 60
    commands = {c for c, _, _ in CASES}
    assert commands == {"prepare", "train", "sample", "evaluate", "evaluate_npz", "export",
                        "summary", "bench", "demo"}  # fmt: skip


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c}-{m[:30]}" for c, _, m in CASES])
def test_one_line_naming_the_culprit_and_inputs_untouched(results, i):
    proc, unchanged, wrote = results[i]
    command, args, message = CASES[i]
    assert proc.returncode == 2, (command, args, proc.returncode, proc.stderr[-2000:])
    assert message in error_line(proc), (command, args)
    assert unchanged, f"{command} {args} changed an input file"
    assert not wrote, f"{command} {args} wrote outputs before failing"


def test_load_config_names_the_file_and_the_cause_once(tmp_path):
    """The library's `load_config` reports a config as the commands do (config_flags nests
    the cause in its own words or in a traceback)."""
    missing = str(tmp_path / "nope.py")
    with pytest.raises(UserError) as e:
        load_config(missing)
    assert str(e.value) == f"--config {missing}: no such file"
    with pytest.raises(UserError) as e:
        load_config("configs/tiny.py:x")
    assert str(e.value).count("configs/tiny.py:x") == 1, e.value
    assert str(e.value).endswith("TypeError: get_config() takes 0 positional arguments but 1 "
                                 "was given"), e.value  # fmt: skip
    with pytest.raises(UserError, match="unknown config field laten"):
        load_config("configs/tiny.py", ["laten=1"])
