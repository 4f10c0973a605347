"""Sampling library: size validation, the paper's rule choice, token->image layout, uint8
conversion, per-sample noise, grids and the streamed .npz writer, each against a hand-made or
independent oracle (no model compiles here)."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from fitv2_jax import sampling
from fitv2_jax.config.files import load_config
from fitv2_jax.config.official import config_from_official_yaml
from fitv2_jax.data.npz import NpzStreamWriter
from fitv2_jax.utils.errors import UserError


def test_patches_for_and_nearest_valid_sizes():
    assert sampling.patches_for(256, 160, 16) == (16, 10)
    assert sampling.patches_for(320, 320, 16) == (20, 20)
    with pytest.raises(ValueError, match=r"height 250: use 240 or 256") as e:
        sampling.patches_for(250, 320, 16)
    assert "width" not in str(e.value)
    with pytest.raises(ValueError, match=r"width 8: use 16 or 32"):
        sampling.patches_for(256, 8, 16)
    with pytest.raises(ValueError, match="height 0"):
        sampling.patches_for(0, 16, 16)


def test_auto_rule_is_the_papers_choice():
    """FITV2_FACTS §3: direct generation at 256x256, 160x320, 128x384 (<= 256 tokens);
    VisionNTK + attention scale at 320x320, 224x448, 160x480; the 512 models keep VisionNTK."""
    base = load_config("configs/fitv2_xl.py").model
    for hw, want in [
        ((256, 256), "none"), ((160, 320), "none"), ((128, 384), "none"),
        ((320, 320), "vision-ntk+attn-scale"), ((224, 448), "vision-ntk+attn-scale"),
        ((160, 480), "vision-ntk+attn-scale"),
    ]:  # fmt: skip
        h, w = sampling.patches_for(*hw, 16)
        assert sampling.resolve_rule("auto", base, h, w) == want, hw
    hr = load_config("configs/fitv2_hr_xl.py").model
    assert sampling.resolve_rule("auto", hr, 32, 32) == "vision-ntk"
    assert sampling.resolve_rule("auto", hr, 16, 48) == "vision-ntk"
    assert sampling.resolve_rule("yarn", base, 20, 20) == "yarn"
    with pytest.raises(ValueError, match="unknown RoPE extrapolation rule 'ntk-foo'"):
        sampling.resolve_rule("ntk-foo", base, 16, 16)


def test_rule_maps_onto_the_models_rope_fields():
    cfg = load_config("configs/tiny.py").model
    m = sampling.model_for_size(cfg, 20, 28, "vision-ntk+attn-scale")
    assert (m.custom_freqs, m.decouple, m.max_pe_len_h, m.max_pe_len_w) == (
        "ntk-aware-pro2", True, 20, 28,
    )  # fmt: skip
    assert m.ori_max_pe_len == 16  # sqrt(context_size 256)
    assert sampling.model_for_size(cfg, 10, 20, "none").custom_freqs == "normal"


def test_per_size_values_and_size_parsing():
    sizes = sampling.parse_sizes("256x256, 160x320,256x256,320x320")
    assert sizes == [(256, 256), (160, 320), (320, 320)]
    got = sampling.parse_per_size("1.5,320x320=4", sizes, float, "--cfg_scale")
    assert got == {(256, 256): 1.5, (160, 320): 1.5, (320, 320): 4.0}
    got = sampling.parse_per_size("256x256=none", sizes, str, "--rule")
    assert got == {(256, 256): "none", (160, 320): None, (320, 320): None}
    with pytest.raises(ValueError, match="512x512 is not one of the requested sizes"):
        sampling.parse_per_size("512x512=2", sizes, float, "--cfg_scale")
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        sampling.parse_sizes("256")


def test_latent_or_pixels_and_the_size_multiple():
    c = load_config("configs/tiny.py")
    assert sampling.is_latent(c) and sampling.size_multiple(c) == 16
    pix = ConfigDict(dict(model=dict(in_channels=3, patch_size=16)))  # no `latent` field
    assert not sampling.is_latent(pix) and sampling.size_multiple(pix) == 16
    c.latent = False
    assert sampling.size_multiple(c) == 2


def test_tokens_to_images_is_the_official_layout():
    """Token (r, c) of a 2x3 grid holds features in (channel, p1, p2) order (FITV2_FACTS §1)."""
    h, w, p, C = 2, 3, 2, 3
    img = np.arange(h * p * w * p * C, dtype=np.float32).reshape(h * p, w * p, C)
    tokens = np.zeros((h * w, p * p * C), np.float32)
    for r in range(h):
        for c in range(w):
            for ch in range(C):
                for i in range(p):
                    for j in range(p):
                        tokens[r * w + c, ch * p * p + i * p + j] = img[r * p + i, c * p + j, ch]
    out = sampling.tokens_to_images(np.stack([tokens, 2 * tokens]), h, w, p)
    np.testing.assert_array_equal(out, np.stack([img, 2 * img]))


def test_to_uint8_rounds_as_the_official_sampler():
    # clamp(127.5 x + 128, 0, 255) truncated: hand-computed
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(sampling.to_uint8(x), [0, 0, 0, 128, 191, 255, 255])


def test_initial_noise_depends_on_seed_and_index_only():
    key = jax.random.key(7)
    x = np.asarray(sampling.initial_noise(key, [5, 2], 6, 4))
    want = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (6, 4)))
                     for i in (5, 2)])  # fmt: skip
    np.testing.assert_array_equal(x, want)


def test_image_grid_places_images_row_major_with_padding():
    imgs = np.stack([np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30)])
    g = sampling.image_grid(imgs, cols=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 4 + 1, 3)
    assert g[1, 1, 0] == 10 and g[1, 5, 0] == 20 and g[4, 1, 0] == 30
    assert g[0, 0, 0] == 255 and g[4, 5, 0] == 255  # padding and the empty cell stay white


def test_small_samples_are_upscaled_by_nearest_neighbour_in_grids():
    assert [sampling.display_scale(h, w) for h, w in ((32, 32), (16, 64), (48, 48), (256, 256))] \
        == [4, 4, 3, 1]  # fmt: skip
    imgs = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    g = sampling.image_grid(imgs, cols=2, pad=1, scale=3)
    assert g.shape == (1 * (6 + 1) + 1, 2 * (9 + 1) + 1, 3)
    np.testing.assert_array_equal(g[1:7, 1:10], imgs[0].repeat(3, 0).repeat(3, 1))
    np.testing.assert_array_equal(g[1:7, 11:20], imgs[1].repeat(3, 0).repeat(3, 1))


def test_npz_stream_writer_gives_a_normal_npz(tmp_path):
    path = str(tmp_path / "s.npz")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    w = NpzStreamWriter(path, data.shape)
    w.write(data[:3])
    assert not (tmp_path / "s.npz").exists()  # only complete files get the final name
    w.write(data[3:])
    w.close(arr_1=np.arange(5))
    with np.load(path) as f:
        np.testing.assert_array_equal(f["arr_0"], data)
        np.testing.assert_array_equal(f["arr_1"], np.arange(5))
    w = NpzStreamWriter(str(tmp_path / "t.npz"), (2, 4, 6, 3))
    with pytest.raises(ValueError, match="does not fit"):
        w.write(data[:3])


def test_config_overrides_are_typed_by_the_field_as_on_the_command_line():
    c = load_config("configs/tiny.py", ["latent=false", "model.max_pe_len_h=32", "seed=3"])
    assert c.latent is False and c.model.max_pe_len_h == 32 and c.seed == 3
    assert load_config("configs/tiny.py", ["--config.latent=True"]).latent is True
    with pytest.raises(UserError, match="laten"):
        load_config("configs/tiny.py", ["laten=false"])
    with pytest.raises(UserError, match="configs/nope.py"):
        load_config("configs/nope.py")


def test_official_rule_follows_the_official_readme_commands():
    """sample_fitv2_ddp.py as the official README runs it: 256x256 without interpolation,
    160x320 `dynntk --decouple`, 320x320 `ntkpro2 --decouple`; HR models `dynntk --decouple`."""
    xl, hr = load_config("configs/fitv2_xl.py"), load_config("configs/fitv2_hr_xl.py")
    want = {(16, 16): "none", (10, 20): "vision-ntk", (8, 24): "vision-ntk",
            (20, 20): "vision-ntk+attn-scale", (14, 28): "vision-ntk+attn-scale"}  # fmt: skip
    for (h, w), rule in want.items():
        assert sampling.resolve_rule("official", xl.model, h, w) == rule, (h, w)
    assert sampling.resolve_rule("auto", xl.model, 10, 20) == "none"  # the paper's text differs
    for h, w in ((32, 32), (20, 40), (16, 48)):
        assert sampling.resolve_rule("official", hr.model, h, w) == "vision-ntk"
    plans = sampling.plan_sizes(hr, "512x512,320x640", rule="official", cfg_scale="official")
    assert [(p.rule, p.cfg_scale) for p in plans] == [("vision-ntk", 1.65)] * 2
    assert sampling.plan_sizes(xl, "256x256", cfg_scale="official")[0].cfg_scale == 1.5


OFFICIAL_HR_YAML = """
diffusion:
  network_config:
    target: fit.model.fit_model.FiT
    params:
      context_size: 1024
      hidden_size: 1152
      depth: 36
      num_heads: 16
      learn_sigma: false
      use_sit: true
      use_swiglu: true
      q_norm: layernorm
      k_norm: layernorm
      custom_freqs: ntk-aware
      decouple: true
      ori_max_pe_len: 16
      online_rope: true
      adaln_type: lora
      adaln_lora_dim: 288
      pretrain_ckpt: checkpoints/fitv2_xl.safetensors
      ignore_keys: ['x_embedder', 'bias', 'LN', 'final_layer']
      finetune: partial
data:
  params:
    train:
      target_len: 1024
accelerate:
  max_train_steps: 400000
  learning_rate: 1.0e-4
  max_grad_norm: 1.0
  optimizer:
    params:
      betas: ${tuple:0.9, 0.999}
      eps: 1.0e-8
  lr_warmup_steps: 0
"""


def test_official_yaml_builds_the_same_model_as_our_config(tmp_path):
    path = tmp_path / "config_fitv2_hr_xl.yaml"
    path.write_text(OFFICIAL_HR_YAML)
    from_yaml = config_from_official_yaml(str(path))
    ours = load_config("configs/fitv2_hr_xl.py")
    same = ("hidden_size", "depth", "num_heads", "adaln_lora_dim", "custom_freqs", "decouple",
            "ori_max_pe_len", "online_rope", "context_size", "use_swiglu", "q_norm")  # fmt: skip
    assert {k: from_yaml.model[k] for k in same} == {k: ours.model[k] for k in same}
    assert (from_yaml.train.b1, from_yaml.train.b2, from_yaml.train.total_steps) == (0.9, 0.999,
                                                                                     400000)  # fmt: skip
    assert from_yaml.train.trainable == "post_training" and from_yaml.train.reinit_trainable
    v1 = tmp_path / "v1.yaml"
    v1.write_text("diffusion:\n  improved_diffusion:\n    diffusion_steps: 1000\n"
                  "  network_config:\n    params: {hidden_size: 64, depth: 2, num_heads: 4}\n")  # fmt: skip
    c = config_from_official_yaml(str(v1))
    assert c.diffusion.kind == "ddpm" and not c.model.clamp_time
    assert c.model.adaln_type == "normal" and c.model.learn_sigma  # the official class defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text("diffusion:\n  network_config:\n    params: {hidden_size: 64, depth: 2, "
                   "num_heads: 4, hiden: 3}\n")  # fmt: skip
    with pytest.raises(UserError, match="unknown network_config.params \\['hiden'\\]"):
        config_from_official_yaml(str(bad))
