"""FiT model: official semantics (numpy oracle), padding invariance, converter, counts, sharding."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cli import run_cli
from numpy_fit import forward as oracle_forward
from numpy_fit import official_shapes, random_state_dict
from safetensors.numpy import load_file, save_file

from fitv2_jax.config.files import load_config
from fitv2_jax.models.attention import logit_bound
from fitv2_jax.models.convert import from_torch_state_dict, to_torch_state_dict
from fitv2_jax.models.fit import FiT, from_official_params
from fitv2_jax.models.summary import summarize, trainable_subset_params
from fitv2_jax.weights.fit import load_fit_params

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

TINY = dict(
    context_size=40, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
    mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=False, use_sit=True,
    use_swiglu=True, use_swiglu_large=False, q_norm="layernorm", k_norm="layernorm",
    qk_norm_weight=False, rel_pos_embed="rope", adaln_type="lora", adaln_lora_dim=16,
)  # fmt: skip
# (h, w) in patches per sample: ragged, non-square, one full; positions beyond 16 test extrapolation
SHAPES = [(2, 18), (5, 8), (4, 10)]


def make_inputs(shapes=SHAPES, n=40, seed=0, pad_value=None):
    rng = np.random.default_rng(seed)
    b = len(shapes)
    x = rng.standard_normal((b, n, 16)).astype(np.float32)
    grid = np.zeros((b, 2, n), np.int32)
    mask = np.zeros((b, n), np.float32)
    for i, (h, w) in enumerate(shapes):
        grid[i, 0, : h * w] = np.tile(np.arange(w), h)
        grid[i, 1, : h * w] = np.repeat(np.arange(h), w)
        mask[i, : h * w] = 1
    if pad_value is not None:
        x[mask == 0] = pad_value
    t = rng.uniform(0, 1, b).astype(np.float32)
    y = rng.integers(0, 10, b).astype(np.int32)
    size = np.array(shapes, np.int32)
    return x, t, y, grid, mask, size


def run_model(model, params, inputs):
    x, t, y, grid, mask, size = (jnp.asarray(a) for a in inputs)
    return np.asarray(model.apply({"params": params}, x, t, y, grid, mask, size))


RULE_CASES = {
    "normal": {},
    "fit_v1": dict(
        learn_sigma=True, use_sit=False, use_swiglu_large=True, q_norm=None, k_norm=None,
        adaln_type="normal", adaln_lora_dim=None,
    ),
    "gelu_mlp": dict(use_swiglu=False, time_shifting=2.0),
    # every leaf stored in our head-channel order (models/rope.py): q/k norm weights, RoPE on v
    "norm_weights_rope_on_v": dict(qk_norm_weight=True, add_rel_pe_to_v=True),
    "online_ntk_decoupled": dict(custom_freqs="ntk-aware", decouple=True, ori_max_pe_len=4, online_rope=True),
    "online_linear": dict(custom_freqs="linear", ori_max_pe_len=4, online_rope=True),
    "online_ntk_by_parts": dict(custom_freqs="ntk-by-parts", decouple=True, ori_max_pe_len=4, online_rope=True),
}  # fmt: skip
for _rule in ("linear", "ntk-aware", "ntk-by-parts", "yarn", "ntk-aware-pro1", "ntk-aware-pro2"):
    for _dec in (False, True):
        RULE_CASES[f"static_{_rule}_{'dec' if _dec else 'coupled'}"] = dict(
            custom_freqs=_rule, decouple=_dec, max_pe_len_h=20, max_pe_len_w=24, ori_max_pe_len=16
        )


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_matches_numpy_oracle(case):
    """Converted random official weights give the official forward (numpy, float64) within 1e-4."""
    cfg = dict(TINY, **RULE_CASES[case])
    sd = random_state_dict(cfg, seed=1)
    model = from_official_params(cfg)
    params = from_torch_state_dict(sd, model)
    inputs = make_inputs()
    out = run_model(model, params, inputs)
    ref = oracle_forward(sd, cfg, *inputs)
    assert out.shape == ref.shape
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"{case}: relative error {err:.2e}"


def _tiny_model_and_params(**overrides):
    cfg = dict(TINY, **overrides)
    sd = random_state_dict(cfg, seed=2)
    model = from_official_params(cfg)
    return model, from_torch_state_dict(sd, model), sd


def test_padding_never_changes_valid_outputs():
    model, params, _ = _tiny_model_and_params()
    b = make_inputs([(2, 18), (5, 7), (3, 10)], seed=3)
    a = make_inputs([(2, 18), (5, 7), (3, 10)], seed=3)
    pad = a[4] == 0
    b[0][pad] = 50.0 * np.random.default_rng(0).standard_normal(b[0][pad].shape)
    b[3].transpose(0, 2, 1)[pad] = 7  # padded tokens' grid positions change too
    out_a, out_b = run_model(model, params, a), run_model(model, params, b)
    valid = a[4] == 1
    assert np.array_equal(out_a[valid], out_b[valid])
    assert np.all(out_a[~valid] == 0) and np.all(out_b[~valid] == 0)


def test_batch_permutation_permutes_outputs():
    model, params, _ = _tiny_model_and_params()
    inputs = make_inputs(seed=4)
    perm = np.array([2, 0, 1])
    out = run_model(model, params, inputs)
    out_perm = run_model(model, params, tuple(a[perm] for a in inputs))
    np.testing.assert_allclose(out_perm, out[perm], rtol=0, atol=1e-5)


def test_converter_round_trip_and_errors():
    model, params, sd = _tiny_model_and_params()
    back = to_torch_state_dict(params, model)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])

    missing = dict(sd)
    del missing["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.1\.attn\.qkv\.weight"):
        from_torch_state_dict(missing, model)
    extra = dict(sd, **{"pos_embed": np.zeros((1, 4))})
    with pytest.raises(ValueError, match="unexpected keys.*pos_embed"):
        from_torch_state_dict(extra, model)
    bad = dict(sd, **{"x_embedder.proj.weight": np.zeros((64, 12), np.float32)})
    with pytest.raises(ValueError, match=r"x_embedder\.proj\.weight: checkpoint \(64, 12\)"):
        from_torch_state_dict(bad, model)
    prefixed = {"module." + k: v for k, v in sd.items()}
    assert from_torch_state_dict(prefixed, model)["x_embedder"]["kernel"].shape == (16, 64)


def test_official_key_set_matches_hand_written_list():
    """Our key map yields exactly the official state-dict keys and shapes (FiTv2 and v1)."""
    for overrides in ({}, RULE_CASES["fit_v1"], {"use_swiglu": False}):
        cfg = dict(TINY, **overrides)
        model = from_official_params(cfg)
        sd = random_state_dict(cfg)
        ours = to_torch_state_dict(from_torch_state_dict(sd, model), model)
        assert {k: v.shape for k, v in ours.items()} == official_shapes(cfg)


def test_unknown_config_names_are_errors():
    with pytest.raises(ValueError, match="hidden_sizee"):
        from_official_params(dict(TINY, hidden_sizee=3))
    with pytest.raises(TypeError, match="hidden_sizee"):
        FiT(**dict(TINY, hidden_sizee=3))
    # an official YAML's network_config (with its `target`) goes straight in
    model = from_official_params(
        {"target": "fit.model.fit_model.FiT", "params": dict(TINY, abs_pos_embed=None)}
    )
    assert model.hidden_size == 64


PUBLISHED = {  # config: (params in M, GFLOPs at 256 tokens or None)
    "fitv2_xl": (671.0, 146.8),
    "fitv2_3b": (2971.9, 653.0),
    "fitv2_b": (128.1, None),
    "fit_xl": (823.6, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_and_gflops(name):
    cfg = load_config(os.path.join(CONFIGS, f"{name}.py")).model
    s = summarize(cfg, tokens=256)
    params_m, gflops = PUBLISHED[name]
    assert abs(s["total_params"] / 1e6 - params_m) <= 0.05
    if gflops is not None:
        assert abs(s["total_gmacs"] - gflops) / gflops < 0.01


def test_post_training_subset_is_95m_for_xl():
    cfg = load_config(os.path.join(CONFIGS, "fitv2_hr_xl.py")).model
    assert abs(trainable_subset_params(cfg) / 1e6 - 95.0) < 0.05


def test_every_config_builds():
    for name in ("fitv2_b", "fitv2_xl", "fitv2_3b", "fitv2_hr_xl", "fitv2_hr_3b", "fit_xl", "tiny"):
        cfg = load_config(os.path.join(CONFIGS, f"{name}.py")).model
        assert summarize(cfg)["total_params"] > 0


def test_label_dropout_and_null_class():
    model, params, _ = _tiny_model_and_params()
    x, t, y, grid, mask, size = (jnp.asarray(a) for a in make_inputs(seed=5))
    apply = lambda **kw: np.asarray(
        model.apply({"params": params}, x, t, y, grid, mask, size, **kw)
    )
    dropped = apply(force_drop=jnp.array([True, True, True]))
    null = np.asarray(model.apply({"params": params}, x, t, jnp.full_like(y, 10), grid, mask, size))
    np.testing.assert_array_equal(dropped, null)
    train = model.apply(
        {"params": params},
        x,
        t,
        y,
        grid,
        mask,
        size,
        train=True,
        rngs={"dropout": jax.random.key(0)},
    )
    assert train.shape == dropped.shape


def _close_at_scale(a, b, tolerance=1e-5):
    """a equals b to `tolerance` of b's largest entry (float32 rounding of a whole gradient)."""
    assert float(np.max(np.abs(a - b))) <= tolerance * float(np.max(np.abs(b)))


@pytest.mark.parametrize("policy", ["dots", "projections", "full"])
def test_remat_and_unrolled_scan_give_same_gradients(policy):
    base, params, _ = _tiny_model_and_params()
    inputs = tuple(jnp.asarray(a) for a in make_inputs(seed=6))

    def grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, *inputs) ** 2)
        return jax.grad(loss)(params)

    ref = grads(base)
    other = base.clone(remat_policy=policy, scan_unroll=2)
    jax.tree.map(_close_at_scale, grads(other), ref)  # remat reorders sums: float32 rounding


def test_projections_policy_keeps_attention_output_and_lse_not_norms():
    """remat "projections": the stacked residuals are the projection outputs, the attention's
    output and log-sum-exp (B, H, N, 1), and fewer bytes than without remat."""
    from jax._src.ad_checkpoint import saved_residuals

    base, params, _ = _tiny_model_and_params()
    inputs = tuple(jnp.asarray(a) for a in make_inputs(seed=6))

    def kept(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, *inputs) ** 2)
        return [aval for aval, src in saved_residuals(loss, params) if "argument" not in src]

    none, proj = kept(base), kept(base.clone(remat_policy="projections"))
    b, n = inputs[0].shape[:2]
    lse = (base.depth, b, base.num_heads, n, 1)
    assert lse in [a.shape for a in proj] and lse in [a.shape for a in none]
    nbytes = lambda avals: sum(a.size * a.dtype.itemsize for a in avals)
    assert nbytes(proj) < 0.75 * nbytes(none), (nbytes(proj), nbytes(none))


def test_on_tpu_without_remat_the_blocks_keep_the_attention_probabilities(monkeypatch):
    """`attention.saves_probs`: compiled for TPU with nothing recomputed, each block's backward
    keeps its (B, H, N, N) probabilities instead of the log-sum-exp (no q k^T and exp again);
    on CPU, or with remat, it keeps the log-sum-exp. The gradients agree to float32 rounding."""
    from jax._src.ad_checkpoint import saved_residuals

    import fitv2_jax.models.fit as fit_lib

    base, params, _ = _tiny_model_and_params()
    inputs = tuple(jnp.asarray(a) for a in make_inputs(seed=6))

    def kept_and_grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, *inputs) ** 2)
        return [aval.shape for aval, _ in saved_residuals(loss, params)], jax.grad(loss)(params)

    b, n = inputs[0].shape[:2]
    probs, lse = (base.depth, b, base.num_heads, n, n), (base.depth, b, base.num_heads, n, 1)
    cpu, cpu_grads = kept_and_grads(base)
    monkeypatch.setattr(fit_lib, "tpu_device_kind", lambda: "TPU v5")
    tpu, tpu_grads = kept_and_grads(base)
    tpu_remat, _ = kept_and_grads(base.clone(remat_policy="projections"))
    assert probs in tpu and lse not in tpu, tpu
    assert lse in cpu and probs not in cpu, cpu
    assert lse in tpu_remat and probs not in tpu_remat, tpu_remat
    jax.tree.map(_close_at_scale, tpu_grads, cpu_grads)


def test_xla_attention_gives_the_model_the_loss_and_gradients_of_autodiff_attention():
    """The "xla" backend's log-sum-exp backward (models.softmax_attention) against plain
    autodiff through the "einsum" backend: the whole model's loss and every gradient agree to
    1e-5 of their largest entry (issue 15: the train step computes what it computed before)."""
    base, params, _ = _tiny_model_and_params()
    inputs = tuple(jnp.asarray(a) for a in make_inputs(seed=8))

    def loss_and_grads(model):
        loss = lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)
        return jax.value_and_grad(loss)(params)

    assert base.attention_backend == "xla"
    (loss, grads), (ref_loss, ref_grads) = (
        loss_and_grads(base), loss_and_grads(base.clone(attention_backend="einsum"))
    )  # fmt: skip
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert all(float(np.max(np.abs(g))) > 0 for g in jax.tree.leaves(ref_grads))  # all get one
    jax.tree.map(_close_at_scale, grads, ref_grads)


def test_only_unweighted_qk_norms_bound_the_logits():
    """The static softmax shift (models.attention.logit_bound) applies only where q and k come
    out of unweighted LayerNorm or RMSNorm; a norm weight or no norm leaves the row max."""
    assert logit_bound("layernorm", "layernorm", 72) == pytest.approx(72**0.5)
    assert logit_bound("rmsnorm", "layernorm", 64) == 8.0
    for q_kind, k_kind in [("w_layernorm", "w_layernorm"), ("none", "layernorm"),
                           ("layernorm", "w_rmsnorm")]:  # fmt: skip
        assert logit_bound(q_kind, k_kind, 72) is None


def test_bf16_compute_stays_close():
    model, params, _ = _tiny_model_and_params()
    inputs = make_inputs(seed=7)
    ref = run_model(model, params, inputs)
    out = run_model(model.clone(dtype=jnp.bfloat16), params, inputs)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.05


def test_official_file_folder_and_torch_pickle_load_the_same_and_export_round_trips(tmp_path):
    """An official state dict as .safetensors, as a Hugging Face folder (model_ema.safetensors)
    and as a torch pickle (.bin, read without torch) gives the same params; the export command
    writes it back unchanged."""
    cfg = load_config(os.path.join(CONFIGS, "tiny.py")).model
    sd = random_state_dict(dict(cfg), seed=4)
    official = str(tmp_path / "official.safetensors")
    save_file(sd, official)
    (tmp_path / "hf").mkdir()
    save_file(sd, str(tmp_path / "hf" / "model_ema.safetensors"))
    torch.save({"ema": {k: torch.from_numpy(v) for k, v in sd.items()}}, str(tmp_path / "m.bin"))
    want = flax.traverse_util.flatten_dict(from_torch_state_dict(sd, cfg))
    for path in (official, str(tmp_path / "hf"), str(tmp_path / "m.bin")):
        got = flax.traverse_util.flatten_dict(load_fit_params(path, cfg))
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    run_cli("export", "--config", "configs/tiny.py", "--checkpoint", official, "--out",
            tmp_path / "back.safetensors")  # fmt: skip
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("case", ["normal", "online_ntk_decoupled", "static_yarn_dec"])
def test_packed_row_computes_each_image_as_if_alone(case):
    """Several images in one row (segment ids, per-image t / y / size) == each image run alone."""
    model, params, _ = _tiny_model_and_params(**RULE_CASES[case])
    shapes, n, segments = [(2, 5), (3, 4), (1, 6)], 40, 4
    rng = np.random.default_rng(8)
    t = rng.uniform(0, 1, segments).astype(np.float32)
    y = np.array([3, 1, 7, 10], np.int32)  # the last slot is unused (null class)
    x = np.zeros((1, n, 16), np.float32)
    grid = np.zeros((1, 2, n), np.int32)
    seg = np.zeros((1, n), np.int32)
    size = np.zeros((1, segments, 2), np.int32)
    alone, start = [], 0
    for k, (h, w) in enumerate(shapes):
        xi, _, _, gi, mi, si = make_inputs([(h, w)], n=h * w, seed=10 + k)
        alone.append(run_model(model, params, (xi, t[k : k + 1], y[k : k + 1], gi, mi, si))[0])
        x[0, start : start + h * w], grid[0, :, start : start + h * w] = xi[0], gi[0]
        seg[0, start : start + h * w], size[0, k] = k + 1, (h, w)
        start += h * w
    packed = run_model(model, params, (x, t[None], y[None], grid, seg, size))[0]
    start = 0
    for k, (h, w) in enumerate(shapes):
        np.testing.assert_allclose(packed[start : start + h * w], alone[k], rtol=1e-5, atol=2e-5)
        start += h * w
    assert np.all(packed[start:] == 0)
