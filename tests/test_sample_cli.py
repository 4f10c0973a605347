"""`python -m fitv2_jax.sample` end to end on 8 fake CPU devices with tiny models.

Pixel-space tiny FiTv2 (patch 16, so 256x256 is the same 16x16 grid as a latent 256 model):
four sizes in one run; a checkpoint in the official layout reproduces one Euler step computed
directly with the model; the latent path decodes with a (tiny random) VAE; bad input errors.
"""

import json

import jax
import numpy as np
import pytest
from cli import error_line, run_cli
from PIL import Image
from safetensors.numpy import save_file

from fitv2_jax import sampling
from fitv2_jax.config.files import load_config
from fitv2_jax.data.tokens import make_grid, unpatchify
from fitv2_jax.models.convert import to_torch_state_dict
from fitv2_jax.models.fit import FiT
from fitv2_jax.models.vae import random_vae
from fitv2_jax.parallel.mesh import inference_mesh
from fitv2_jax.weights.fit import random_params

# lower-case "false": typed by the config field (a bool), not the truthy string "false"
PIXEL = ["--config", "configs/tiny.py", "--config.latent=false", "--config.model.in_channels=3",
         "--config.model.patch_size=16"]  # fmt: skip
FAST = ["--solver", "euler", "--num_steps", "1", "--noprogress"]


def _pixel_config():
    return load_config(
        "configs/tiny.py", ["latent=false", "model.in_channels=3", "model.patch_size=16"]
    )


def test_four_sizes_in_one_run(tmp_path):
    out = tmp_path / "out"
    sizes = [(256, 256), (160, 320), (224, 448), (320, 320)]
    proc = run_cli("sample", *PIXEL, "--random_init", *FAST, "--num_samples", "2",
                   "--batch_size", "8", "--sizes", ",".join(f"{h}x{w}" for h, w in sizes),
                   "--cfg_scale", "1,320x320=1.5", "--out", out)  # fmt: skip
    for h, w in sizes:
        d = out / f"{h}x{w}"
        for i in range(2):
            img = Image.open(d / f"{i:06d}.png")
            assert img.size == (w, h) and img.mode == "RGB"
        with np.load(d / f"samples_{h}x{w}.npz") as f:
            assert f["arr_0"].shape == (2, h, w, 3) and f["arr_0"].dtype == np.uint8
            assert f["arr_1"].shape == (2,)
            np.testing.assert_array_equal(f["arr_0"][1], np.asarray(Image.open(d / "000001.png")))
        assert Image.open(d / "grid.png").size[1] > h
    info = json.load(open(out / "sample_info.json"))
    rules = {k: (v["rule"], v["cfg_scale"]) for k, v in info["sizes"].items()}
    assert rules == {
        "256x256": ("none", 1.0), "160x320": ("none", 1.0),
        "224x448": ("vision-ntk+attn-scale", 1.0), "320x320": ("vision-ntk+attn-scale", 1.5),
    }  # fmt: skip
    assert info["devices"] == 8 and info["seed"] == 0 and info["config"]["latent"] is False
    assert str(out) in proc.stdout.strip().splitlines()[-1]


def test_official_checkpoint_gives_one_euler_step_of_the_model(tmp_path):
    """Oracle: x1 = x0 + v(x0, t=0) with x0 = normal(fold_in(key(seed), i)) (the documented
    noise rule), v from FiT.apply on the original params; the command reads them back from an
    official-layout .safetensors, pads the batch of 3 to 8 and writes uint8 PNGs."""
    config = _pixel_config()
    model = FiT(**config.model)
    h, w, p = 2, 3, 16
    grid, mask = make_grid(h, w)[None], np.ones((1, h * w), np.float32)
    params = random_params(config.model, seed=5)  # every weight non-zero: v is not 0
    ckpt = str(tmp_path / "fitv2_official.safetensors")
    save_file(to_torch_state_dict(params, config.model), ckpt)

    out = tmp_path / "ck"
    run_cli("sample", *PIXEL, "--checkpoint", ckpt, *FAST, "--cfg_scale", "1", "--num_samples",
            "3", "--batch_size", "8", "--labels", "4,7", "--seed", "3", "--sizes", "32x48",
            "--nopng", "--out", out)  # fmt: skip
    with np.load(out / "32x48" / "samples_32x48.npz") as f:
        got, labels = f["arr_0"], f["arr_1"]
    assert labels.tolist() == [4, 7, 4]
    assert [p.name for p in (out / "32x48").glob("*.png")] == ["grid.png"]
    key = jax.random.split(jax.random.key(3))[0]
    for i in range(3):
        x0 = np.asarray(jax.random.normal(jax.random.fold_in(key, i), (h * w, p * p * 3)))
        v = model.apply(
            {"params": params}, x0[None], np.zeros(1), np.array([labels[i]]), grid, mask
        )
        want = np.clip(unpatchify(x0 + np.asarray(v)[0], h, w, p) * 127.5 + 128, 0, 255)
        # uint8 truncation may flip by one where float rounding differs
        assert np.abs(got[i].astype(int) - want.astype(np.uint8).astype(int)).max() <= 1
        assert np.mean(got[i] == want.astype(np.uint8)) > 0.99


def test_latent_config_decodes_with_the_vae(tmp_path):
    """With the final layer zeroed the velocity is 0 and a sample is its starting noise:
    image = uint8(VAE.decode(unpatchify(x0))), through the library's sampling path."""
    vae = random_vae(jax.random.key(0), block_out_channels=(8, 8), norm_num_groups=4)  # f = 2
    config = load_config("configs/tiny.py")
    params = random_params(config.model)
    params["final_layer"] = jax.tree.map(np.zeros_like, params["final_layer"])
    plans = sampling.plan_sizes(config, "16x24", cfg_scale=1, vae=vae)
    sampler = sampling.Sampler(config.model, params, inference_mesh(config), vae=vae)
    options = sampling.SolverOptions("euler", 1)
    labels = sampling.class_labels(2, 10, seed=0)
    sampling.sample_to_files(sampler, plans, labels, jax.random.key(0), options, str(tmp_path),
                             progress=False)  # fmt: skip
    with np.load(tmp_path / "16x24" / "samples_16x24.npz") as f:
        got = f["arr_0"]
    assert got.shape == (2, 16, 24, 3)
    key = jax.random.split(jax.random.key(0))[0]
    x0 = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (4 * 6, 16)))
                   for i in range(2)])  # fmt: skip
    lat = np.stack([unpatchify(t, 4, 6, 2) for t in x0])  # (2, 8, 12, 4)
    want = np.clip(np.asarray(vae.decode(lat)) * 127.5 + 128, 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "250x256"], r"height 250: use 240 or 256"),
        (["--sizes", "256x256,160x100"], r"width 100: use 96 or 112"),
        (["--labels", "3,10", "--sizes", "16x16"], r"labels must be in \[0, 9\]"),
        (["--rule", "ntk2"], "unknown RoPE extrapolation rule 'ntk2'"),
        (["--num_images", "4"], "--num_images was renamed: use --num_samples"),
        (["--cfg_interval", "0.5"], "--cfg_interval 0.5: give two times A,B"),
    ],
    ids=["height", "width", "labels", "rule", "renamed", "interval"],
)
def test_errors_name_the_flag_and_the_fix(tmp_path, args, message):
    proc = run_cli("sample", *PIXEL, "--random_init", "--out", tmp_path, *args, check=False)
    assert proc.returncode != 0
    assert __import__("re").search(message, error_line(proc)), proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was written by the failed run


def test_missing_vae_or_checkpoint_and_help(tmp_path):
    proc = run_cli("sample", "--config", "configs/tiny.py", "--random_init", "--out", tmp_path,
                   check=False)  # fmt: skip
    assert "pass --vae" in error_line(proc)
    proc = run_cli("sample", *PIXEL, "--checkpoint", tmp_path / "none.safetensors", check=False)
    assert "none.safetensors: checkpoint not found" in error_line(proc)
    proc = run_cli("sample", "--help")
    assert proc.returncode == 0 and "--sizes" in proc.stdout and "--num_images" not in proc.stdout
