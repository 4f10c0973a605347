"""FSDP-sharded FiT on 8 fake CPU devices: real shardings, same forward as one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_model import TINY, make_inputs

from fitv2_jax.models.fit import from_official_params
from fitv2_jax.parallel.mesh import create_mesh, resolve_shape
from fitv2_jax.parallel.rules import (
    LOGICAL_RULES,
    batch_sharding,
    fit_spec,
    gathered,
    tree_shardings,
)


def test_mesh_shapes_and_errors():
    assert resolve_shape((1, -1, 1), 8) == (1, 8, 1)
    assert resolve_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="mesh.ici"):
        resolve_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        resolve_shape((2, 8, 1), 8)
    mesh = create_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_a_large_kernel_fsdp_cannot_shard_warns_once_with_a_mesh_that_does(caplog):
    """FiTv2-XL/2's q/k/v kernel (1152, 3456) on FSDP over 256 chips, in small: no dimension of
    (1030, 1023) divides by 8, 1030 by 2, so the warning names data 4 x FSDP 2; a small array
    (a bias) is replicated quietly, and the same shape warns once."""
    mesh, fsdp = create_mesh((1, 8, 1)), PartitionSpec("fsdp")
    with caplog.at_level("WARNING"):
        assert fit_spec(fsdp, (1030, 1023), mesh, "qkv") == PartitionSpec(None, None)
        fit_spec(fsdp, (1030, 1023), mesh, "qkv, EMA")
        assert fit_spec(fsdp, (1023,), mesh, "bias") == PartitionSpec(None)
        assert fit_spec(fsdp, (1024, 1023), mesh, "fc") == PartitionSpec("fsdp", None)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "qkv (1030, 1023)" in warnings[0] and "fsdp axis's 8 devices" in warnings[0]
    assert "--config.mesh.ici='(4,-1,1)'" in warnings[0]


def test_fsdp_sharded_forward_equals_single_device():
    assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices"
    cfg = dict(TINY, depth=2)
    model = from_official_params(cfg)
    x, t, y, grid, mask, size = (
        jnp.asarray(a)
        for a in make_inputs([(2, 18), (5, 8), (4, 10), (3, 3), (1, 7), (6, 6), (8, 5), (2, 2)])
    )
    mesh = create_mesh((2, 4, 1))

    init = lambda key: model.init(key, x, t, y, grid, mask, size)["params"]
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = tree_shardings(abstract, mesh)
    params = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=shardings)(jax.random.key(0))
    # make every tensor non-trivial (zero-initialised output layers would hide errors)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)

    # stored flat, FSDP on the (3, heads, kv) axis, not on embed (layers.DenseND)
    qkv = params["blocks"]["attn"]["qkv"]["kernel"]  # (layers, embed, 3 heads kv)
    assert qkv.sharding.spec == PartitionSpec(None, None, ("tensor", "fsdp"))
    assert qkv.addressable_shards[0].data.shape == (2, 64, 48)
    proj = params["blocks"]["attn"]["proj"]["kernel"]  # (layers, heads kv, embed_out)
    assert proj.sharding.spec == PartitionSpec(None, ("tensor", "fsdp"), None)
    fc2 = params["blocks"]["mlp"]["fc2"]["kernel"]  # (layers, mlp, embed_out)
    assert fc2.sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    lora_up = params["blocks"]["adaLN_modulation"]["linear_2"]["kernel"]  # (layers, lora, adaln)
    assert lora_up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")

    def fwd(p, x, t, y, grid, mask, size):
        return model.apply({"params": p}, x, t, y, grid, mask, size)

    inputs = [x, t, y, grid, mask, size]
    sharded_inputs = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in inputs]
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        out = jax.jit(fwd)(params, *sharded_inputs)
    assert (
        out.sharding.spec[0] in (("data", "fsdp"), "data") or not out.sharding.is_fully_replicated
    )
    single = jax.device_put(jax.device_get(params), jax.devices()[0])
    ref = jax.jit(fwd)(single, *[jax.device_put(a, jax.devices()[0]) for a in inputs])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_hybrid_mesh_keeps_ici_axes_inside_a_slice():
    """dcn (2, 1, 1) x ici (1, 4, 1) on 8 devices: data spans the two slices, fsdp stays inside one."""
    mesh = create_mesh((1, 4, 1), dcn=(2, 1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0]
    assert sorted(ids[0]) == [0, 1, 2, 3] and sorted(ids[1]) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="mesh.ici"):
        create_mesh((1, 3, 1), dcn=(2, 1, 1))


def test_attention_kernels_gathered_once_keep_their_tensor_axis_and_the_numbers():
    """gather_attention_once: each block's q/k/v and output kernels are constrained to their own
    sharding without FSDP (heads stay split over "tensor"); loss and gradients are unchanged."""
    cfg = dict(TINY, depth=2)
    x, t, y, grid, mask, size = (
        jnp.asarray(a) for a in make_inputs([(2, 18), (5, 8), (4, 10), (3, 3)])
    )
    mesh = create_mesh((1, 4, 2))
    kernel = jax.device_put(
        jnp.ones((32, 3, 4, 16), jnp.bfloat16),
        jax.NamedSharding(mesh, PartitionSpec("fsdp", None, "tensor", None)),
    )
    with jax.set_mesh(mesh):
        out = jax.jit(lambda k: gathered(k, ("embed", "qkv", "heads", "kv")))(kernel)
    assert out.sharding.spec == PartitionSpec(None, None, "tensor")
    assert gathered(kernel, ("embed", "qkv", "heads", "kv")) is kernel  # no mesh in context

    def loss_and_grads(once: bool, mesh):
        model = from_official_params(dict(cfg, gather_attention_once=once))
        init = lambda key: model.init(key, x, t, y, grid, mask, size)["params"]
        abstract = jax.eval_shape(init, jax.random.key(0))
        shardings = tree_shardings(abstract, mesh)
        params = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=shardings)(jax.random.key(0))
        params = jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params
        )
        loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, y, grid, mask, size)))
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            value, grads = jax.jit(jax.value_and_grad(loss))(params)
            text = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
        return value, jax.device_get(grads), text

    ref, ref_grads, ref_text = loss_and_grads(False, mesh)
    value, grads, text = loss_and_grads(True, mesh)
    assert text.count("sharding_constraint") == ref_text.count("sharding_constraint") + 4
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
