"""The Flax SD VAE against diffusers' PyTorch AutoencoderKL (the independent oracle).

Every tensor of the torch model is re-randomised (norm scales and biases included), saved with
safetensors in the diffusers or the CompVis layout, and loaded through `load_vae`.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from skimage import data as skdata  # noqa: E402
from skimage.transform import resize  # noqa: E402

from fitv2_jax.models.vae import random_vae, tile_starts  # noqa: E402
from fitv2_jax.weights.vae import load_vae  # noqa: E402

# Four levels (downsampling 8) at small widths keep compile and torch time low; the real widths
# and two resnets per block are checked once, at 64x64.
SMALL = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
# One attention chunk size everywhere, so every test shares the compiled programs of one module.
OPTS = dict(query_chunk=256)
SCALE = 0.18215


def make_torch_vae(seed, block_out_channels, norm_num_groups, layers_per_block):
    torch.manual_seed(seed)
    n = len(block_out_channels)
    m = diffusers.AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=norm_num_groups,
        layers_per_block=layers_per_block,
        latent_channels=4,
    ).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    for name, t in m.state_dict().items():  # nothing left at a constant (e.g. ones/zeros) init
        assert t.numel() == 1 or float(t.std()) > 0.01, name
    return m


def photo(h, w, batch=1):
    """skimage photos resized to (h, w), as (B, h, w, 3) float32 in [-1, 1]."""
    imgs = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()][:batch]
    out = [resize(im, (h, w), anti_aliasing=True) * 2 - 1 for im in imgs]
    return np.stack(out).astype(np.float32)


def t_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def np_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(got, want, rel=1e-4):
    err = np.abs(np.asarray(got) - want).max()
    assert err <= rel * np.abs(want).max(), (err, np.abs(want).max())


def assert_matches_diffusers(vae, m, x, z):
    """Our encode mean of images x and decode of latents z equal diffusers' AutoencoderKL m."""
    with torch.no_grad():
        mean_t = np_nhwc(m.encode(t_nchw(x)).latent_dist.mean)
        dec_t = np_nhwc(m.decode(t_nchw(z)).sample)
    assert_close(vae.encode(x) / SCALE, mean_t)
    assert_close(vae.decode(z * SCALE), dec_t)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On the shared 2-core machine one torch thread leaves the other core to XLA."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(torch model, its diffusers directory) for the small config."""
    m = make_torch_vae(0, **SMALL)
    d = tmp_path_factory.mktemp("vae") / "small"
    m.save_pretrained(d)  # config.json + diffusion_pytorch_model.safetensors
    return m, str(d)


@pytest.mark.parametrize("h,w,batch", [(256, 256, 3), (160, 320, 1), (224, 448, 1)])
def test_parity_with_diffusers(small, h, w, batch):
    m, d = small
    # A small attention chunk and pixel budget, so query chunking (with padding: 20*40 = 800
    # positions) and batch chunking (3 = 2 + 1 padded) are both exercised against the oracle.
    vae = load_vae(d, **OPTS, max_pixels=2 * 256 * 256)
    x = photo(h, w, batch)
    z = np.random.RandomState(h + w).randn(batch, h // 8, w // 8, 4).astype(np.float32)
    assert_matches_diffusers(vae, m, x, z)


def test_parity_full_kl_f8_single_file(tmp_path):
    """The real kl-f8 widths (GroupNorm 32), from one diffusers .safetensors, no config.json."""
    m = make_torch_vae(1, (128, 256, 512, 512), 32, 2)
    f = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(f))
    vae = load_vae(str(f))
    assert vae.module.block_out_channels == (128, 256, 512, 512)
    x = photo(64, 64)
    z = np.random.RandomState(0).randn(1, 8, 8, 4).astype(np.float32)
    assert_matches_diffusers(vae, m, x, z)


def test_round_trip_photo(small):
    m, d = small
    vae = load_vae(d, **OPTS, max_pixels=2 * 256 * 256)
    x = photo(256, 256, 3)
    with torch.no_grad():
        want = np_nhwc(m(t_nchw(x), sample_posterior=False).sample)
    assert_close(vae.decode(vae.encode(x)), want)


def test_posterior_sample(small):
    m, d = small
    x = photo(256, 256, 3)
    with torch.no_grad():
        post = m.encode(t_nchw(x)).latent_dist
        mean_t, std_t, logvar_t = np_nhwc(post.mean), np_nhwc(post.std), np_nhwc(post.logvar)
    vae = load_vae(d, **OPTS, max_pixels=2 * 256 * 256)
    assert_close(vae.moments(x)[1], logvar_t)
    s = np.asarray(vae.encode(x, jax.random.key(3)))
    eps = (s / SCALE - mean_t) / std_t  # must be standard normal noise (12288 draws)
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03


def to_compvis(state, n_levels):
    """diffusers key names -> the original LDM (CompVis) names, written from the LDM layout."""
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if len(p) > 2 and p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            side, kind = ("down", "downsample") if p[1] == "down_blocks" else ("up", "upsample")
            level = i if side == "down" else n_levels - 1 - i  # LDM counts `up` from full size
            if p[3] == "resnets":
                name = "nin_shortcut" if p[5] == "conv_shortcut" else p[5]
                k = f"{p[0]}.{side}.{level}.block.{p[4]}.{name}.{p[6]}"
            else:  # downsamplers.0.conv.weight
                k = f"{p[0]}.{side}.{level}.{kind}.conv.{p[-1]}"
        elif len(p) > 2 and p[1] == "mid_block":
            if p[2] == "resnets":
                k = f"{p[0]}.mid.block_{int(p[3]) + 1}.{p[4]}.{p[5]}"
            else:
                names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}
                names["to_out"] = "proj_out"
                k = f"{p[0]}.mid.attn_1.{names[p[4]]}.{p[-1]}"
                if v.ndim == 2:  # LDM attention projections are 1x1 convs
                    v = v[:, :, None, None]
        elif len(p) > 2 and p[1] == "conv_norm_out":
            k = f"{p[0]}.norm_out.{p[2]}"
        out[k] = v.contiguous()
    return out


def assert_same_params(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_compvis_and_old_diffusers_layouts(small, tmp_path):
    m, d = small
    ref = load_vae(d, **OPTS)
    sd = m.state_dict()
    ldm = to_compvis(sd, 4)
    assert "decoder.up.0.block.1.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    # The VAE-only LDM file (with training leftovers) and a whole SD checkpoint (.ckpt).
    f1 = tmp_path / "vae-ldm.safetensors"
    save_file({**ldm, "loss.logvar": torch.zeros(())}, str(f1))
    f2 = tmp_path / "sd.ckpt"
    whole = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.ones(3)
    torch.save({"state_dict": whole}, str(f2))
    for f in (f1, f2):
        vae = load_vae(str(f), norm_num_groups=8, **OPTS)
        assert vae.module == ref.module
        assert_same_params(vae.params, ref.params)
    # diffusers < 0.14 attention names, in a directory with config.json.
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in sd.items():
        for new, o in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{o}.")
        renamed[k] = v.contiguous()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    od = tmp_path / "old"
    od.mkdir()
    (od / "config.json").write_text(open(f"{d}/config.json").read())
    save_file(renamed, str(od / "diffusion_pytorch_model.safetensors"))
    assert_same_params(load_vae(str(od), **OPTS).params, ref.params)


def test_mismatched_keys_are_named(small, tmp_path):
    m, d = small
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(2)
    sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    cfg = open(f"{d}/config.json").read()
    (tmp_path / "config.json").write_text(cfg)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_vae(str(tmp_path))
    for name in ("decoder.conv_out.bias", "encoder.extra.weight", "quant_conv.weight"):
        assert name in str(e.value)


def test_tile_starts_table():
    assert tile_starts(16, 16, 4) == [0]
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    assert tile_starts(17, 16, 4) == [0, 1]
    assert tile_starts(100, 32, 8) == [0, 23, 45, 68]


def test_tiled_decode_and_encode_blend_torch_tiles(small):
    """Tiles decoded/encoded alone by torch; the blend is a convex mix of the covering tiles."""
    m, d = small
    vae = load_vae(d, **OPTS, tile=8, overlap=2)  # latent 16x24 -> 3 x 4 tiles of 8x8 latents
    z = np.random.RandomState(5).randn(1, 16, 24, 4).astype(np.float32)
    x = photo(128, 192)
    ys, xs = tile_starts(16, 8, 2), tile_starts(24, 8, 2)
    assert (ys, xs) == ([0, 4, 8], [0, 5, 11, 16])
    for f, got, run in [
        (8, vae.decode(z * SCALE), lambda t: m.decode(t).sample),
        (1, vae.encode(x) / SCALE, lambda t: m.encode(t).latent_dist.mean),
    ]:
        src = z if f == 8 else x
        s_in = 1 if f == 8 else 8
        got = np.asarray(got)
        lo, hi = np.full(got.shape, np.inf), np.full(got.shape, -np.inf)
        count = np.zeros(got.shape[1:3])
        with torch.no_grad():
            for y0 in ys:
                for x0 in xs:
                    piece = src[:, y0 * s_in : (y0 + 8) * s_in, x0 * s_in : (x0 + 8) * s_in]
                    out = np_nhwc(run(t_nchw(piece)))
                    sl = np.s_[:, y0 * f : (y0 + 8) * f, x0 * f : (x0 + 8) * f]
                    lo[sl], hi[sl] = np.minimum(lo[sl], out), np.maximum(hi[sl], out)
                    count[sl[1:3]] += 1
        tol = 1e-4 * np.abs(got).max()
        assert count.min() >= 1 and (count == 1).any() and (count == 4).any()
        assert np.all(got >= lo - tol) and np.all(got <= hi + tol)
        assert np.abs(got - lo)[:, count == 1].max() <= tol  # single coverage: that tile exactly


def test_bfloat16_close_to_float32_oracle(small):
    m, d = small
    vae = load_vae(d, **OPTS, dtype=jnp.bfloat16)
    z = np.random.RandomState(7).randn(1, 8, 8, 4).astype(np.float32)
    with torch.no_grad():
        want = np_nhwc(m.decode(t_nchw(z)).sample)
    got = np.asarray(vae.decode(z * SCALE))
    assert got.dtype == np.float32
    assert_close(got, want, rel=0.05)


def test_random_vae_shapes_and_errors():
    vae = random_vae(jax.random.key(0), block_out_channels=(8, 8), norm_num_groups=4)
    z = vae.encode(jnp.zeros((2, 16, 24, 3)))
    assert z.shape == (2, 8, 12, 4)  # two levels: downsample factor 2
    assert vae.decode(z).shape == (2, 16, 24, 3)
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        vae.decode(jnp.zeros((1, 4, 8, 8)))
