"""TPU without a TPU: splash attention against XLA attention (Pallas interpret mode on CPU), the
topology names, the HLO collective counter, and a real TPU-compiler dry run (libtpu is part of
the test extras)."""

import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fitv2_jax.benchmarks.tpu import _key, markdown, parse_ici
from fitv2_jax.benchmarks.tpu_blocks import ablated, blocks_config
from fitv2_jax.config.files import load_config
from fitv2_jax.models.attention import Attention, attend, fuses_into_short
from fitv2_jax.models.fit import FiT
from fitv2_jax.models.short_attention import heads_per_step, short_attend
from fitv2_jax.models.short_attention import padded_length as short_padded_length
from fitv2_jax.models.splash import block_size, padded_length
from fitv2_jax.models.summary import summarize
from fitv2_jax.parallel.cost import (
    ESTIMATE_OPTIONS,
    KernelWork,
    kernel_seconds,
    program_cost,
    scanned_cost,
    splash_kernel_work,
    unpriced_ops,
)
from fitv2_jax.parallel.hlo import collectives, cycle_profile, group_size, while_trip_counts
from fitv2_jax.parallel.matmuls import price_dots, traced_dots
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.topology import parse_topology, per_device, topology_devices
from fitv2_jax.training.dry_run import dry_run, out_of_hbm
from fitv2_jax.training.setup import build_setup
from fitv2_jax.utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv_and_segments(dtype, n=40, heads=4, dh=72):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, n, heads, dh)), dtype) for _ in range(3))
    seg = np.zeros((4, n), np.int32)
    seg[0, :30] = 1  # ragged: 30 real tokens, 10 padding
    seg[1, :] = 1  # full row
    seg[2, :10], seg[2, 10:25], seg[2, 25:33] = 1, 2, 3  # three packed images + padding
    seg[3, :1] = 1  # one real token
    return q, k, v, jnp.asarray(seg)


def _relative_errors(dtype, backend="splash", n=40):
    q, k, v, seg = _qkv_and_segments(dtype, n)
    real = (seg != 0)[:, :, None, None]

    def loss(backend):
        return lambda q, k, v: jnp.sum(
            jnp.sin(attend(q, k, v, seg, backend).astype(jnp.float32)) * real
        )

    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                             / jnp.max(jnp.abs(b.astype(jnp.float32))))  # fmt: skip
    out = rel(attend(q, k, v, seg, backend) * real, attend(q, k, v, seg, "xla") * real)
    g_kernel = jax.grad(loss(backend), argnums=(0, 1, 2))(q, k, v)
    g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    return out, [rel(a, b) for a, b in zip(g_kernel, g_xla, strict=True)]


@pytest.mark.parametrize("backend", ["splash", "short"])
def test_pallas_kernels_equal_xla_attention_in_float32_with_ragged_and_packed_rows(backend):
    out, grads = _relative_errors(jnp.float32, backend)
    assert out < 1e-5
    assert max(grads) < 1e-5, grads


@pytest.mark.parametrize("backend", ["splash", "short"])
def test_pallas_kernels_equal_xla_attention_in_bfloat16_within_its_rounding(backend):
    # both round q, k, v, probabilities and outputs to bf16 (8 bits of mantissa) in different
    # orders; 2^-6 of the largest value bounds the difference seen (measured ~4e-3 for splash,
    # ~8e-3 for "short")
    out, grads = _relative_errors(jnp.bfloat16, backend)
    assert out < 1.6e-2
    assert max(grads) < 1.6e-2, grads


def test_short_kernels_take_rows_of_up_to_1024_tokens_as_xla_attention_does():
    # 1000 tokens padded to 1024 (the high-resolution post-training's rows), one of them whole,
    # the others ragged or packed; the kernels alone, then with the q/k norms and RoPE inside
    out, grads = _relative_errors(jnp.float32, "short", n=1000)
    assert out < 1e-5 and max(grads) < 1e-5, (out, grads)
    errors = _attention_errors(jnp.float32, "layernorm", True, n=1000)
    assert max(errors) < 1e-5, errors


def test_splash_equals_xla_attention_over_several_query_blocks():
    # 600 tokens pad to 1024: two query blocks, and the backward's single key block computed
    # 512 keys at a time (models.splash block sizes)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 600, 1, 8)), jnp.float32) for _ in range(3))
    seg = np.zeros((2, 600), np.int32)
    seg[0, :550], seg[1, :300], seg[1, 300:590] = 1, 1, 2  # ragged; two packed images
    seg = jnp.asarray(seg)
    real = (seg != 0)[:, :, None, None]
    loss = lambda b: lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, seg, b)) * real)
    np.testing.assert_allclose(attend(q, k, v, seg, "splash") * real,
                               attend(q, k, v, seg, "xla") * real, rtol=0, atol=1e-5)  # fmt: skip
    grads = [jax.grad(loss(b), argnums=(0, 1, 2))(q, k, v) for b in ("splash", "xla")]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["splash", "short"])
def test_pallas_kernels_under_shard_map_equal_one_device(backend):
    q, k, v, seg = _qkv_and_segments(jnp.float32)
    single = attend(q, k, v, seg, backend)
    with jax.set_mesh(create_mesh((2, 2, 2))):  # batch over data x fsdp, heads over tensor
        sharded = jax.jit(lambda q, k, v: attend(q, k, v, seg, backend))(q, k, v)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=0, atol=1e-6)


def test_auto_backend_is_xla_off_tpu():
    q, k, v, seg = _qkv_and_segments(jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(attend(q, k, v, seg, "auto")), np.asarray(attend(q, k, v, seg, "xla"))
    )


def _kernel_in(text: str) -> str:
    """Which attention a lowered TPU program runs: a Pallas kernel by name, or "xla"."""
    names = [n for n in ("short_attention", "splash_mha") if n in text]
    assert len(names) <= 1, names
    return names[0] if names else "xla"


@pytest.mark.parametrize("topology,tokens,kernel", [
    ("v5p:2x2x1", 256, "short_attention"), ("v5p:2x2x1", 768, "short_attention"),
    ("v5p:2x2x1", 1024, "short_attention"), ("v5p:2x2x1", 1152, "splash_mha"),
    # 16 MiB of VMEM a core: the short kernels up to 512 tokens
    ("v4:2x2x1", 512, "short_attention"), ("v4:2x2x1", 768, "xla"),
    ("v4:2x2x1", 1024, "splash_mha"),
])  # fmt: skip
def test_auto_backend_on_tpu_by_row_length(topology, tokens, kernel):
    devices, _, _ = topology_devices(topology)
    mesh = create_mesh((1, 4, 1), devices=devices)
    x = jax.ShapeDtypeStruct((4, tokens, 2, 72), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((4, tokens), jnp.int32)
    with jax.set_mesh(mesh):
        text = jax.jit(lambda q, k, v, s: attend(q, k, v, s, "auto")).lower(x, x, x, seg).as_text()
    assert _kernel_in(text) == kernel


@pytest.mark.parametrize("topology,tokens,remat,kernel", [
    ("v5p:2x2x1", 256, "none", "short_attention"), ("v5p:2x2x1", 256, "dots", "short_attention"),
    ("v5p:2x2x1", 256, "full", "short_attention"),
    ("v5p:2x2x1", 256, "projections", "short_attention"),
    ("v5p:2x2x1", 640, "dots_no_batch", "short_attention"),
    ("v4:2x2x1", 640, "none", "xla"), ("v4:2x2x1", 640, "dots", "splash_mha"),
])  # fmt: skip
def test_auto_backend_in_fit_knows_the_remat_policy(topology, tokens, remat, kernel):
    # FiT resolves "auto" knowing the chip and the remat policy: the "short" kernels as long as
    # the chip's VMEM takes the rows, with any remat policy; beyond, recomputed blocks take
    # splash from 256 tokens, others from 1024
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.model.attention_backend, config.model.remat_policy = "auto", remat
    config.model.dtype, config.model.context_size = "bfloat16", tokens
    devices, _, _ = topology_devices(topology)
    setup = build_setup(config, 8, mesh=create_mesh(config.mesh.ici, devices=devices))
    state, batch = setup.abstract_state_sharded(), setup.abstract_batch(tokens)
    with setup.context(), jax.default_matmul_precision("default"):
        text = setup.step.lower(state, batch).as_text()
    assert _kernel_in(text) == kernel


def test_splash_blocks_for_256_and_1024_tokens():
    assert (padded_length(256), block_size(256)) == (256, 256)
    assert (padded_length(1024), block_size(1024)) == (1024, 512)
    assert (padded_length(40), block_size(padded_length(40))) == (128, 128)


@pytest.mark.parametrize(
    "name, grid, chips",
    [("v5p-64", "v5p:4x4x2", 32), ("v5e-256", "v5e:16x16", 256), ("v6e-64", "v6e:8x8", 64),
     ("v4-32", "v4:4x2x2", 16), ("v5p-8", "v5p:2x2x1", 4), ("v5p:4x4x4", "v5p:4x4x4", 64)],
)  # fmt: skip
def test_pod_names_give_the_chip_grid(name, grid, chips):
    chip, libtpu_name, n = parse_topology(name)
    assert (libtpu_name, n) == (grid, chips)
    hbm, peak = per_device(chip, n, n)
    assert hbm == chip.hbm_gib * 2**30 and peak == chip.bf16_tflops * 1e12


@pytest.mark.parametrize("name, slices", [("v4-32", 1), ("v5p-16", 1), ("v5e-8", 1), ("v4-16", 2)])
def test_compile_only_devices_are_one_per_chip_as_on_a_real_slice(name, slices):
    # JAX runs v4 and v5p chips as megacore devices; libtpu's default shows a v4 chip as two
    devices, chip, chips = topology_devices(name, slices)
    assert len(devices) == chips == slices * parse_topology(name)[2]


@pytest.mark.parametrize("name", ["v5p-63", "v7-8", "v5e:4x4x4", "v5e-24"])
def test_bad_topology_names_are_refused_with_the_flag(name):
    with pytest.raises(UserError, match="--topology"):
        parse_topology(name)


def test_collectives_in_a_loop_count_every_iteration():
    mesh = create_mesh((-1, 1, 1))

    def body(x, w):
        y = jax.lax.with_sharding_constraint(x @ w, jax.NamedSharding(mesh, jax.P("data")))
        return y, jnp.sum(y)  # a sum over the sharded batch: one all-reduce per iteration

    f = jax.jit(lambda x, ws: jax.lax.scan(body, x, ws))
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=jax.NamedSharding(mesh, jax.P("data")))
    ws = jax.ShapeDtypeStruct((5, 32, 32), jnp.float32)
    text = f.lower(x, ws).compile().as_text()
    assert 5 in while_trip_counts(text)
    table = collectives(text)
    assert table["all-reduce"]["count"] == 5  # 5 iterations x 1
    assert table["all-reduce"]["bytes"] == 5 * 4  # a float32 scalar each time


def test_an_fsdp_gradient_counts_as_a_reduce_scatter_of_the_whole_gradient():
    """libtpu writes a reduce-scatter as a fusion of an all-reduce and the slice each chip
    keeps; the table must call it a reduce-scatter (it read "all-reduce" before)."""
    devices, _, _ = topology_devices("v5p:2x2x1")
    mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",))
    w_sharding = jax.NamedSharding(mesh, jax.P(None, "fsdp"))

    def step(w, x):
        grad = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w.astype(jnp.bfloat16))))(w)
        return w - 0.1 * grad

    w = jax.ShapeDtypeStruct((512, 1024), jnp.float32, sharding=w_sharding)
    x = jax.ShapeDtypeStruct(
        (4096, 512), jnp.bfloat16, sharding=jax.NamedSharding(mesh, jax.P("fsdp"))
    )
    text = jax.jit(step, out_shardings=w_sharding).lower(w, x).compile().as_text()
    assert "calls=%all-reduce-scatter" in text  # what libtpu emits today
    table = collectives(text)
    assert table["reduce-scatter"]["count"] == 1 and table["all-reduce"]["count"] == 0
    assert table["reduce-scatter"]["bytes"] == 512 * 1024 * 2  # its input: the bf16 gradient
    gathered = 512 * 1024 * 2  # the bf16 weight; each chip sends its quarter to 3 others
    assert table["all-gather"] == {"count": 1, "bytes": gathered, "ici_bytes": gathered * 3 // 4}
    assert table["reduce-scatter"]["ici_bytes"] == 512 * 1024 * 2 * 3 // 4


def test_a_combined_collective_counts_the_bytes_of_every_buffer_it_moves():
    """The TPU compiler combines gradients' all-reduces (and, on v6e, weight gathers) into one op
    with a tuple result; its bytes are all of them, not the largest one."""
    text = "\n".join([
        "HloModule m, num_partitions=8",
        "",
        "%add (a: bf16[], b: bf16[]) -> bf16[] {",
        "  %a = bf16[] parameter(0)",
        "  %b = bf16[] parameter(1)",
        "  ROOT %s = bf16[] add(%a, %b)",
        "}",
        "",
        "ENTRY %main (p: bf16[1152,3072], q: bf16[3072,1152], r: bf16[64]) -> bf16[64] {",
        "  %p = bf16[1152,3072]{1,0} parameter(0)",
        "  %q = bf16[3072,1152]{1,0} parameter(1)",
        "  %r = bf16[64]{0} parameter(2)",
        "  %ar = (bf16[1152,3072]{1,0:T(8,128)(2,1)}, bf16[3072,1152]{1,0:T(8,128)(2,1)}) "
        "all-reduce(%p, %q), replica_groups={}, to_apply=%add",
        "  %ags = ((bf16[64]{0}), bf16[4096]{0}) all-gather-start(%r), dimensions={0}",
        "  %agd = bf16[4096]{0} all-gather-done(%ags)",
        "  ROOT %g = bf16[64]{0} get-tuple-element(%ar), index=0",
        "}",
    ])  # fmt: skip
    table = collectives(text)
    both = 2 * 1152 * 3072 * 2  # replica_groups={}: all 8 partitions; 2 x 7/8 of it sent
    assert table["all-reduce"] == {"count": 1, "bytes": both, "ici_bytes": both * 2 * 7 // 8}
    gathered = 4096 * 2  # an async start: its output
    assert table["all-gather"] == {"count": 1, "bytes": gathered, "ici_bytes": gathered * 7 // 8}


@pytest.mark.parametrize("groups, n", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", 4),
    ("replica_groups=[4,2]<=[8]", 2),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}", 4),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
     "{'axis_0','axis_2'}", 8),
    ("replica_groups={}", 16),
])  # fmt: skip
def test_a_collectives_group_size_is_read_from_each_form_of_its_replica_groups(groups, n):
    line = f"  %ar = f32[64]{{0}} all-reduce(%p), channel_id=1, {groups}, to_apply=%add"
    assert group_size(line, partitions=16) == n


def test_ici_bytes_follow_each_collectives_own_groups():
    """FSDP over 4 chips and data parallelism over 2 (v5p:2x2x2): the weight is gathered and the
    gradient reduce-scattered within the 4 (3/4 of each sent), the shard all-reduced between the 2
    (2 x 1/2 of it sent)."""
    devices, _, _ = topology_devices("v5p:2x2x2")
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 4), ("data", "fsdp"))
    w_sharding = jax.NamedSharding(mesh, jax.P("fsdp", None))

    def grad(w, x):
        return jax.grad(lambda w: jnp.sum((x @ w.astype(jnp.bfloat16)).astype(jnp.float32) ** 2))(w)

    w = jax.ShapeDtypeStruct((1024, 2048), jnp.float32, sharding=w_sharding)
    x = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16,
                             sharding=jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))  # fmt: skip
    table = collectives(jax.jit(grad, out_shardings=w_sharding).lower(w, x).compile().as_text())
    weight = 1024 * 2048
    assert table["all-gather"]["ici_bytes"] == weight * 2 * 3 // 4  # bf16, within the 4
    whole, shard = weight * 2, weight * 2 // 4  # the bf16 gradient and each chip's quarter
    assert table["reduce-scatter"] == {"count": 1, "bytes": whole, "ici_bytes": whole * 3 // 4}
    assert table["all-reduce"] == {"count": 1, "bytes": shard, "ici_bytes": shard}


def test_the_compiler_prices_a_collective_as_a_pass_over_hbm_not_the_interconnect():
    """Why the dry run adds the ICI time itself: libtpu's estimate of an all-reduce is that of an
    elementwise pass over the same buffer, over 2 chips or 8 alike (v5p)."""
    devices, _, _ = topology_devices("v5p:2x2x2")

    def seconds(n, f):
        mesh = jax.sharding.Mesh(np.array(devices).reshape(n, -1), ("g", "r"))
        spec = jax.P(("g", "r"))
        x = jax.ShapeDtypeStruct((len(devices) * 2**22,), jnp.bfloat16,
                                 sharding=jax.NamedSharding(mesh, spec))  # fmt: skip
        out = jax.P("r") if f == "all-reduce" else spec
        body = (lambda x: jax.lax.psum(x, "g")) if f == "all-reduce" else (lambda x: x * 2 + 1)
        g = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=out))
        return program_cost(g.lower(x).compile(ESTIMATE_OPTIONS))[1]

    passes = seconds(2, "elementwise")
    assert seconds(2, "all-reduce") == pytest.approx(passes, rel=0.02)
    assert seconds(8, "all-reduce") == pytest.approx(passes, rel=0.02)
    # 8 MiB per chip: an all-reduce over 8 chips sends 14 MiB, 24 us at v5p's 600 GB/s each way
    assert passes < 8e-6


def test_the_parts_of_one_async_collective_count_once_and_shifted_transfers_each():
    """libtpu writes one async all-gather as a start fusion (into an AsyncCollectiveStart custom
    call), continuation fusions (%async_collective_fusion...) and a done fusion (into an
    AsyncCollectiveDone), each with an op of the whole gather under one channel_id; the
    collective-permutes of a windowed einsum share a channel but move different data."""
    gather = ("bf16[1152,3072]{1,0} all-gather(%p), channel_id=7, "
              "replica_groups=[1,4]<=[4], dimensions={1}")  # fmt: skip
    permute = ("bf16[32,1152]{{1,0}} collective-permute(%q), channel_id=9, "
               "source_target_pairs={{{{0,{}}},{{1,{}}}}}").format  # fmt: skip
    part = lambda name, target: [  # noqa: E731
        f"%{name} (p: bf16[1152,768]) -> bf16[1152,3072] {{",
        "  %p = bf16[1152,768]{1,0} parameter(0)",
        f"  %ag = {gather}",
        *([f'  ROOT %cc = bf16[1152,3072]{{1,0}} custom-call(%ag), custom_call_target="{target}"']
          if target else ["  ROOT %t = bf16[1152,3072]{1,0} tanh(%ag)"]),
        "}",
        "",
    ]  # fmt: skip
    text = "\n".join([
        "HloModule m, num_partitions=4",
        "",
        *part("fused_computation.1", "AsyncCollectiveStart"),
        *part("async_collective_fusion.2", None),
        *part("fused_computation.3", "AsyncCollectiveDone"),
        "ENTRY %main (p: bf16[1152,768], q: bf16[32,1152]) -> bf16[32,1152] {",
        "  %p = bf16[1152,768]{1,0} parameter(0)",
        "  %q = bf16[32,1152]{1,0} parameter(1)",
        "  %f1 = bf16[1152,3072]{1,0} fusion(%p), kind=kCustom, calls=%fused_computation.1",
        "  %f2 = bf16[1152,3072]{1,0} fusion(%p), kind=kCustom, calls=%async_collective_fusion.2",
        "  %f3 = bf16[1152,3072]{1,0} fusion(%p), kind=kCustom, calls=%fused_computation.3",
        f"  %cp.1 = {permute(1, 2)}",
        f"  %cp.2 = {permute(2, 3)}",
        f"  ROOT %cp.3 = {permute(2, 3)}",
        "}",
    ])  # fmt: skip
    table = collectives(text)
    gathered = 1152 * 3072 * 2
    assert table["all-gather"] == {"count": 1, "bytes": gathered, "ici_bytes": gathered * 3 // 4}
    shard = 32 * 1152 * 2  # three transfers, two of them alike (as a ring's steps are)
    assert table["collective-permute"] == {"count": 3, "bytes": 3 * shard, "ici_bytes": 3 * shard}


def test_ops_after_a_kernel_whose_metadata_spans_lines_are_counted():
    """The splash kernel's attributes hold a newline (as libtpu prints them): its tail is an
    unindented line, which must not end the computation for the ops after it."""
    text = "\n".join([
        "HloModule m",
        "",
        "%add (a: f32[], b: f32[]) -> f32[] {",
        "  %a = f32[] parameter(0)",
        "  %b = f32[] parameter(1)",
        "  ROOT %s = f32[] add(%a, %b)",
        "}",
        "",
        "ENTRY %main (p: f32[8,128]) -> f32[8,128] {",
        "  %p = f32[8,128]{1,0} parameter(0)",
        '  %k = f32[8,128]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", '
        'frontend_attributes={kernel_metadata="{\\"xprof_metadata\\":\\"{\\\\\\"block_q\\\\\\": 512}',
        '\\"}"}, metadata={op_name="jit(f)/attn/splash_mha_fwd"}, '
        'backend_config={"estimated_cycles":"100"}',
        "  %ar = f32[8,128]{1,0} all-reduce(%k), replica_groups={}, to_apply=%add, "
        'metadata={op_name="jit(f)/attn/all_reduce"}, backend_config={"estimated_cycles":"50"}',
        "  ROOT %t = f32[8,128]{1,0} tanh(%ar), "
        'metadata={op_name="jit(f)/mlp/tanh"}, backend_config={"estimated_cycles":"300"}',
        "}",
    ])  # fmt: skip
    row = collectives(text)["all-reduce"]
    assert (row["count"], row["bytes"]) == (1, 8 * 128 * 4)
    rows = cycle_profile(text)
    assert sum(r[1] for r in rows) == 450
    assert {r[2] for r in rows} == {"attn", "mlp"}


def test_a_fusion_named_after_a_top_level_op_counts_where_its_fused_ops_come_from():
    """XLA names a fusion after its root; a RoPE fusion ending in the step's convert said
    "(top level)" though every op in it is the attention's."""
    text = "\n".join([
        "HloModule m",
        "",
        "%fused (p0: f32[8,128]) -> bf16[8,128] {",
        "  %p0 = f32[8,128]{1,0} parameter(0)",
        '  %m = f32[8,128]{1,0} multiply(%p0, %p0), metadata={op_name="jit(f)/jvp(F)/blocks/attn/mul"}',
        '  %n = f32[8,128]{1,0} negate(%m), metadata={op_name="jit(f)/jvp(F)/blocks/attn/neg"}',
        '  ROOT %c = bf16[8,128]{1,0} convert(%n), metadata={op_name="jit(f)/jvp(F)/convert.10"}',
        "}",
        "",
        "ENTRY %main (p: f32[8,128]) -> bf16[8,128] {",
        "  %p = f32[8,128]{1,0} parameter(0)",
        "  ROOT %f = bf16[8,128]{1,0} fusion(%p), kind=kLoop, calls=%fused, "
        'metadata={op_name="jit(f)/jvp(F)/convert.10"}, backend_config={"estimated_cycles":"70"}',
        "}",
    ])  # fmt: skip
    assert [r[1:] for r in cycle_profile(text)] == [(70.0, "blocks/attn", "elementwise/reduce",
                                                     "fwd")]  # fmt: skip


def test_a_fusion_of_top_level_ops_with_one_module_op_stays_top_level():
    """An optimizer update fused with one op of a layer's gradient is not that layer's work."""
    top = [f'  %t{i} = f32[8,128]{{1,0}} add(%p0, %p0), metadata={{op_name="jit(f)/add.{i}"}}'
           for i in range(4)]  # fmt: skip
    text = "\n".join([
        "HloModule m",
        "",
        "%fused (p0: f32[8,128]) -> f32[8,128] {",
        "  %p0 = f32[8,128]{1,0} parameter(0)",
        *top,
        '  %g = f32[8,128]{1,0} multiply(%t3, %t2), '
        'metadata={op_name="jit(f)/transpose(jvp(F))/F.cond/y_embedder/mul"}',
        '  ROOT %r = f32[8,128]{1,0} subtract(%g, %t1), metadata={op_name="jit(f)/sub"}',
        "}",
        "",
        "ENTRY %main (p: f32[8,128]) -> f32[8,128] {",
        "  %p = f32[8,128]{1,0} parameter(0)",
        "  ROOT %f = f32[8,128]{1,0} fusion(%p), kind=kLoop, calls=%fused, "
        'metadata={op_name="jit(f)/sub"}, backend_config={"estimated_cycles":"90"}',
        "}",
    ])  # fmt: skip
    assert [r[1:] for r in cycle_profile(text)] == [(90.0, "(top level)", "elementwise/reduce",
                                                     "fwd")]  # fmt: skip


def test_cycle_profile_counts_a_scanned_layer_per_iteration_under_its_module_path():
    devices, _, _ = topology_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))

    def layers(x, ws):
        def body(x, w):
            with jax.named_scope("layer"):
                return jnp.tanh(x @ w), None

        return jax.lax.scan(body, x, ws)[0]

    def profile(depth):
        x = jax.ShapeDtypeStruct(
            (4096, 512), jnp.bfloat16, sharding=jax.NamedSharding(mesh, jax.P("data"))
        )
        ws = jax.ShapeDtypeStruct(
            (depth, 512, 512), jnp.bfloat16, sharding=jax.NamedSharding(mesh, jax.P())
        )
        rows = cycle_profile(jax.jit(layers).lower(x, ws).compile().as_text())
        assert abs(sum(r[0] for r in rows) - 1) < 1e-9
        return {(r[2], r[3], r[4]): r[1] for r in rows}

    four, eight = profile(4), profile(8)
    matmul = ("layer", "matmul", "fwd")
    assert matmul in four and max(four, key=four.get) == matmul  # the loop's matmul dominates
    assert eight[matmul] == pytest.approx(2 * four[matmul], rel=1e-6)  # once per iteration


def test_dry_run_compiles_a_splash_train_step_for_a_tpu_topology(capsys):
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.model.hidden_size = 256  # wide enough that matmuls dominate the compiler's FLOPs
    config.model.adaln_lora_dim = 64
    config.model.attention_backend = "splash"
    config.model.dtype = "bfloat16"
    config.model.context_size = 256
    # settings chosen for another slice (as a pod config's are): the dry run names the preset
    config.mesh.slices, config.mesh.slice_presets = ("v5p-64",), ("v5p-64", "v5e-4")
    # conftest asks for "highest" matmuls (CPU oracles); Mosaic rejects that for bf16 dots
    with jax.default_matmul_precision("default"):
        report = dry_run(config, global_batch=8, topology="v5e:2x2")
    out = capsys.readouterr().out
    assert "append ':v5e-4' to --config" in report["slice_note"]
    assert "note: the config's settings are for v5p-64, not this v5e-4" in out
    assert report["mode"] == "TPU v5e:2x2" and report["devices"] == 4 and report["chip"] == "v5e"
    assert report["fits"] and report["peak_bytes"] < report["hbm_bytes_per_device"]
    assert report["collectives"]["all-gather"]["count"] > 0  # FSDP over 4 chips
    # ICI: what the collectives send, timed at v5e's 400 GB/s (200 each way), not in the estimate
    sent = sum(v["ici_bytes"] for v in report["collectives"].values())
    assert report["ici_bytes_per_device"] == sent > 0
    assert report["ici_seconds_at_least"] == pytest.approx(sent / 200e9)
    assert "over ICI each device sends" in out and "or more on the interconnect" in out
    # the corrected cost analysis counts every block, and the splash kernels are priced from
    # their work (the compiler alone counts them as free): FLOPs match the model's own count,
    # above it by the remat recomputation and the kernel backward's recomputed scores
    assert 1.0 < report["estimate_flops_ratio"] < 1.4, report["estimate_flops_ratio"]
    assert "splash kernels, which carry no cost estimate, are priced" in out
    assert 0 < report["estimate_mfu"] < 1
    assert "compiler estimate (not a measurement)" in out and "fits" in out
    assert "where the compiler's estimated cycles go" in out
    assert report["cycle_kinds"]["matmul"] > 0.1 and report["cycle_top"]
    assert "estimate_mfu_matmuls_only" not in report  # the kernels' cycles are not in the shares


def test_splash_kernels_are_priced_from_their_work():
    """The compiler prices a Pallas call without a cost estimate at zero; `program_cost` adds
    each splash call's FLOPs (forward 2 matmuls, fused backward 5) at the compiler's own price."""
    devices, _, _ = topology_devices("v5p:2x2x1")
    mesh = create_mesh((1, 4, 1), devices=devices)
    x = jax.ShapeDtypeStruct((4, 256, 2, 72), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    loss = lambda q, k, v, s: jnp.sum(attend(q, k, v, s, "splash").astype(jnp.float32) ** 2)
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
    work = splash_kernel_work(compiled.as_text())
    per_matmul = 2.0 * 1 * 2 * 256 * 256 * 72  # per device: 1 row, 2 heads, 256 x 256 x 72
    assert sorted((w.flops, n) for w, n in work.items()) == [(2 * per_matmul, 1),
                                                              (5 * per_matmul, 1)]  # fmt: skip
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    flops, seconds = program_cost(compiled)
    assert flops == pytest.approx(float(ca["flops"]) + 7 * per_matmul)
    priced = sum(kernel_seconds(devices[0], w) for w in work)
    assert seconds == pytest.approx(float(ca["optimal_seconds"]) + priced)
    # the price of pure FLOPs: at most the chip's bf16 peak, at least half of it
    big = KernelWork(flops=2.0 * 4096**3, transcendentals=0.0, bytes_accessed=3 * 4096**2 * 2.0)
    rate = big.flops / kernel_seconds(devices[0], big)
    assert 0.5 * 459e12 < rate <= 459e12, rate


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tokens", [256, 400, 1024])
def test_short_rows_kernels_compile_for_each_tpu_and_the_compiler_prices_their_work(
        topology, fused, tokens):  # fmt: skip
    """Mosaic lowers both kernels for every chip generation of the table, with and without the
    q/k norms and RoPE inside, at the 256 tokens of training, a row padded to 512 (400 tokens,
    e.g. sampling at 320x320) and the longest row they take (1024 tokens, the high-resolution
    post-training, with a raised scoped VMEM limit), and the compiler's cost analysis
    counts the work their `pl.CostEstimate` states (forward 2 products of L x L x Dh per head,
    backward 5, and their vector work as FLOPs, at most 5% more; L padded to 128s), so the
    estimate prices them where they run."""
    devices, _, _ = topology_devices(topology)
    mesh = create_mesh((1, 4, 1), devices=devices)
    x = jax.ShapeDtypeStruct((4, tokens, 2, 72), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((4, tokens), jnp.int32)
    table = jax.ShapeDtypeStruct((4, tokens, 36), jnp.float32)
    if fused:
        attention = lambda q, k, v, s, c, n: short_attend(
            q, k, v, s, c, n, "layernorm", "layernorm"
        )
    else:
        attention = lambda q, k, v, s, c, n: attend(q, k, v, s, "short")
    loss = lambda *a: jnp.sum(attention(*a).astype(jnp.float32) ** 2)
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        compiled = grad.lower(x, x, x, seg, table, table).compile()
    text = compiled.as_text()
    assert len(re.findall(r"%short_attention_fwd\S* = ", text)) == 1
    assert len(re.findall(r"%short_attention_bwd\S* = ", text)) == 1
    length = short_padded_length(tokens)
    per_matmul = 2.0 * 1 * 2 * length * length * 72  # per device: 1 row, 2 heads, L x L x 72
    fwd, bwd = sorted(float(f) for f in re.findall(r'cost_estimate":\{"flops":"(\d+)"', text))
    assert 2 * per_matmul < fwd < 2.2 * per_matmul and 5 * per_matmul < bwd < 5.3 * per_matmul
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    # the program's FLOPs are the kernels' stated work and a little elementwise work around them
    assert fwd + bwd <= float(ca["flops"]) < 1.02 * (fwd + bwd)
    # nothing added by `program_cost`: the compiler prices these kernels itself
    assert program_cost(compiled) == (float(ca["flops"]), float(ca["optimal_seconds"]))


def test_the_compiler_prices_elementwise_work_as_flops_at_its_matmul_rate():
    """Why the short kernels state their vector work as FLOPs (`short_attention.vector_ops`):
    libtpu's cost analysis counts each elementwise operation of an XLA fusion as one FLOP and
    prices those FLOPs at the rate it gives matmuls, 394 TFLOP/s on a v5p chip (the issue's 8192^3
    bf16 matmul), not at a vector unit's; a fusion with less work is priced by its bytes."""
    devices, _, _ = topology_devices("v5p:2x2x1")
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(devices[:1], ("x",)), P())
    x = jax.ShapeDtypeStruct((64, 128, 128), jnp.float32, sharding=sharding)

    def cost(n):  # n rounds of y = y * y + x (2 operations per element), then a row sum
        def chain(x):
            y = x
            for _ in range(n):
                y = y * y + x
            return jnp.sum(y, axis=-1)

        ca = jax.jit(chain).lower(x).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, list | tuple) else ca
        return float(ca["flops"]), float(ca["optimal_seconds"])

    flops, seconds = cost(512)
    assert abs(flops / (2 * 512 * x.size) - 1) < 0.005
    assert abs(flops / seconds / 394e12 - 1) < 0.01
    flops, seconds = cost(8)
    assert seconds > 10 * flops / 394e12  # bytes-bound


def _attention_errors(dtype, norm, rope, weight=False, rope_on_v=False, mesh=None, n=40):
    """Relative max errors of the FiT attention (output, then every gradient: parameters and
    input) with the "short" backend against "xla", ragged and packed rows, padding included."""
    rng = np.random.default_rng(0)
    q, _, _, seg = _qkv_and_segments(dtype, n, heads=2, dh=8)
    x = jnp.asarray(rng.standard_normal((4, n, 16)), dtype)
    angles = jnp.asarray(rng.uniform(0, 6, (4, n, 4)), jnp.float32)
    cos, sin = 1.1 * jnp.cos(angles), 1.1 * jnp.sin(angles)  # a magnitude factor, as yarn's
    results = {}
    for backend in ("xla", "short"):
        module = Attention(num_heads=2, q_norm=norm, k_norm=norm, qk_norm_weight=weight,
                           use_rope=rope, rope_on_v=rope_on_v, backend=backend, dtype=dtype)  # fmt: skip
        params = module.init(jax.random.key(1), x, seg, cos, sin)
        params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), params)  # fmt: skip
        apply = lambda p, x, m=module: m.apply(p, x, seg, cos, sin)
        # padding's outputs in the loss too: their zeros must pass no gradient back
        loss = lambda p, x, f=apply: jnp.sum(jnp.sin(f(p, x).astype(jnp.float32)))
        run = lambda p, x, f=apply, g=loss: (f(p, x), jax.grad(g, argnums=(0, 1))(p, x))
        if mesh is not None and backend == "short":
            with jax.set_mesh(mesh):
                results[backend] = jax.jit(run)(params, x)
        else:
            results[backend] = run(params, x)
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                             / jnp.max(jnp.abs(b.astype(jnp.float32))))  # fmt: skip
    return jax.tree.leaves(jax.tree.map(rel, results["short"], results["xla"]))


def _outside_kernels(jaxpr):
    """Every equation of a traced program, nested ones included, but not those inside Pallas
    kernels (a pallas_call is yielded, its body is not)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name != "pallas_call":
            for value in eqn.params.values():
                for sub in value if isinstance(value, list | tuple) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from _outside_kernels(sub)


def _norm_outside_kernels(norm, weight=False, rope_on_v=False) -> bool:
    """Whether the traced "short" FiT attention computes a q/k norm (its rsqrt) outside the
    Pallas kernels."""
    x, seg, table = jnp.ones((2, 40, 16)), jnp.ones((2, 40), jnp.int32), jnp.ones((2, 40, 4))
    module = Attention(num_heads=2, q_norm=norm, k_norm=norm, qk_norm_weight=weight,
                       rope_on_v=rope_on_v, backend="short")  # fmt: skip
    params = module.init(jax.random.key(0), x, seg, table, table)
    traced = jax.make_jaxpr(lambda p: module.apply(p, x, seg, table, table))(params)
    found = {eqn.primitive.name for eqn in _outside_kernels(traced.jaxpr)}
    assert "pallas_call" in found
    return "rsqrt" in found


@pytest.mark.parametrize("norm,rope", [("layernorm", True), ("rmsnorm", True),
                                       ("layernorm", False), (None, True)])  # fmt: skip
def test_short_kernels_apply_the_qk_norms_and_rope_as_the_xla_path_does(norm, rope):
    """With unweighted q/k norms and RoPE (FiTv2's attention), the "short" kernels take q and k
    raw and apply both themselves (`short_attention.Fused`): the output and the gradients of
    the parameters and of the input equal the unfused path with XLA attention."""
    assert fuses_into_short(norm or "none", norm or "none", rope_on_v=False)
    if norm:
        assert not _norm_outside_kernels(norm)
    errors = _attention_errors(jnp.float32, norm, rope)
    assert max(errors) < 1e-5, errors
    errors = _attention_errors(jnp.bfloat16, norm, rope)
    assert max(errors) < 1.6e-2, errors


def test_short_kernels_with_the_norms_and_rope_inside_under_shard_map_equal_xla_attention():
    errors = _attention_errors(jnp.float32, "layernorm", True, mesh=create_mesh((2, 2, 2)))
    assert max(errors) < 1e-5, errors


def _kernel_operands(qkv_bias: bool) -> list[int]:
    """The operand counts of the Pallas calls in the traced forward of FiTv2's attention with
    the "short" backend."""
    x, seg, table = jnp.ones((2, 40, 16)), jnp.ones((2, 40), jnp.int32), jnp.ones((2, 40, 4))
    module = Attention(num_heads=2, q_norm="layernorm", k_norm="layernorm", qkv_bias=qkv_bias,
                       backend="short")  # fmt: skip
    params = module.init(jax.random.key(0), x, seg, table, table)
    traced = jax.make_jaxpr(lambda p: module.apply(p, x, seg, table, table))(params)
    return [
        len(e.invars) for e in _outside_kernels(traced.jaxpr) if e.primitive.name == "pallas_call"
    ]


def test_short_kernels_take_the_qkv_bias_and_read_q_k_v_from_one_array():
    """FiTv2's attention hands the kernels the projection's output before its bias: the forward
    kernel reads q, k and v as three blocks of that one array (segment ids 2, q/k/v 3, RoPE
    tables 2) and, with a bias, its three parts (3 more); the numerics (bias gradient included)
    are `test_short_kernels_apply_the_qk_norms_and_rope_as_the_xla_path_does`."""
    assert _kernel_operands(qkv_bias=False) == [7]
    assert _kernel_operands(qkv_bias=True) == [10]


@pytest.mark.parametrize("weight,rope_on_v", [(True, False), (False, True)])
def test_weighted_qk_norms_or_rope_on_v_stay_outside_the_short_kernels(weight, rope_on_v):
    kind = "w_layernorm" if weight else "layernorm"
    assert not fuses_into_short(kind, kind, rope_on_v)
    assert _norm_outside_kernels("layernorm", weight, rope_on_v)
    errors = _attention_errors(jnp.float32, "layernorm", True, weight, rope_on_v)
    assert max(errors) < 1e-5, errors


def test_short_rows_kernel_refuses_long_rows_naming_splash():
    x = jnp.zeros((1, 1025, 1, 8), jnp.float32)
    with pytest.raises(ValueError, match="at most 1024 tokens, got 1025.*'splash'"):
        attend(x, x, x, jnp.ones((1, 1025), jnp.int32), "short")


def test_short_rows_kernel_refuses_rows_a_small_vmem_chip_cannot_hold_naming_it():
    devices, _, _ = topology_devices("v4:2x2x1")
    x = jax.ShapeDtypeStruct((4, 640, 1, 8), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((4, 640), jnp.int32)
    with jax.set_mesh(create_mesh((1, 4, 1), devices=devices)):
        with pytest.raises(ValueError, match="at most 512 tokens on TPU v4, got 640.*'splash'"):
            jax.jit(lambda q, k, v, s: attend(q, k, v, s, "short")).lower(x, x, x, seg)


@pytest.mark.parametrize("heads,head_dim,length,step", [(16, 72, 256, 16), (16, 72, 512, 4),
                                                         (24, 96, 256, 12), (5, 72, 256, 5),
                                                         (16, 72, 768, 8), (16, 72, 1024, 4),
                                                         (24, 96, 1024, 4)])  # fmt: skip
def test_short_rows_kernel_takes_as_many_heads_per_step_as_its_vmem_budget_allows(
        heads, head_dim, length, step):  # fmt: skip
    assert heads_per_step(heads, head_dim, length) == step
    assert short_padded_length(40) == 128 and short_padded_length(256) == 256


def _tiny_unrolled(depth=3):
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.model.hidden_size, config.model.adaln_lora_dim = 256, 64
    config.model.dtype, config.model.remat_policy = "bfloat16", "none"
    config.model.attention_backend, config.model.context_size = "xla", 256
    config.model.depth = config.model.scan_unroll = depth
    return config


def test_dry_run_of_a_config_with_every_block_unrolled_prices_the_program_itself():
    """No block loop (scan_unroll >= depth): the cost analysis of the unrolled program is whole,
    so its FLOPs match the model's own count without any trip-count correction."""
    with jax.default_matmul_precision("default"):
        report = dry_run(_tiny_unrolled(), global_batch=8, topology="v5p:2x2x1", verbose=False)
    assert 0.95 < report["estimate_flops_ratio"] < 1.1, report["estimate_flops_ratio"]
    assert 0 < report["estimate_mfu"] < 1 and report["cycle_kinds"]["matmul"] > 0.1
    # the most that removing the non-matmul cycles can give: above the MFU, within the chip's peak
    bound = report["estimate_mfu_matmuls_only"]
    assert bound == pytest.approx(report["estimate_mfu"] / report["cycle_kinds"]["matmul"])
    assert report["estimate_mfu"] < bound < 1, bound


def test_a_step_too_big_for_the_chip_is_a_dry_run_result_not_a_crash(capsys):
    """FiT at 2048 images of 256 tokens per v5e chip, nothing recomputed: libtpu stops with
    RESOURCE_EXHAUSTED. The dry run reports the step as not fitting, with the bytes the compiler
    needed and had (it offers a little under the chip's 16 GiB), and the TPU table shows the row."""
    with jax.default_matmul_precision("default"):
        report = dry_run(_tiny_unrolled(), global_batch=8192, topology="v5e:2x2", estimate=False)
    out = capsys.readouterr().out
    oom = report["out_of_hbm"]
    assert report["fits"] is False and "peak_bytes" not in report
    assert 15 * 2**30 < oom["available_bytes"] <= report["hbm_bytes_per_device"] == 16 * 2**30
    assert oom["needed_bytes"] > oom["available_bytes"] and oom["what"] == "HLO temporaries"
    assert "DOES NOT FIT: the TPU compiler ran out of HBM" in out
    # what to try, from the config's own settings (remat none, XLA attention)
    assert "--config.model.remat_policy=dots or full" in report["to_fit"][0]
    assert "--config.model.attention_backend=splash" in report["to_fit"][1]
    assert all(way in out for way in report["to_fit"])
    assert report["params_bytes_per_device"] > 0 and report["mesh"]["fsdp"] == 4
    row = dict(config="tiny", topology="v5e:2x2", remat="none", attention="xla", scan_unroll=3,
               depth=3, tokens=256, **{k: report[k] for k in ("hbm_bytes_per_device", "fits",
                                                               "out_of_hbm")})  # fmt: skip
    need, usable = (f"{oom[k] / 2**30:.2f}" for k in ("needed_bytes", "available_bytes"))
    line = f"| temporaries {need} > {usable} usable of 16 GiB | no | out of HBM | |"
    assert line in markdown([row])


def test_table_rows_name_a_mesh_other_than_the_configs_and_resume_by_it():
    """`bench --suite tpu --ici '(2,-1,1)'`: the row's label carries the mesh (copyable to
    --config.mesh.ici), its key tells it from the config's mesh, and rows written before the
    flag (no "ici") are the config's mesh, so a resumed table keeps them."""
    assert parse_ici("config") is None and parse_ici("(2,-1,1)") == (2, -1, 1)
    assert parse_ici(" 1,8,2 ") == (1, 8, 2)
    for bad in ("(2,-1)", "(-1,-1,1)", "(0,-1,1)", "data2"):
        with pytest.raises(UserError, match="--ici="):
            parse_ici(bad)
    row = dict(config="fitv2_xl", topology="v5e-256", remat="dots", attention="splash",
               scan_unroll=1, depth=36, tokens=256, hbm_bytes_per_device=16 * 2**30, fits=True,
               peak_bytes=0.42 * 2**30, estimate_step_seconds=0.0352, estimate_mfu=0.132)  # fmt: skip
    old = dict(row)  # as written before --ici: the config's mesh
    ici = json.loads(json.dumps(dict(row, ici=(2, -1, 1))))  # as read back from OUT.json
    assert "| fitv2_xl, ici (2,-1,1) | 256 | v5e-256 | dots | splash | 0.4 of 16 GiB | yes | " \
        "35.2 ms | 13.2% |" in markdown([ici])  # fmt: skip
    assert markdown([old]).splitlines()[-1].startswith("| fitv2_xl | 256 |")
    assert _key(old) == _key(dict(row, ici=None)) != _key(ici)
    assert _key(ici)[-1] == (2, -1, 1)
    unrolled = dict(ici, scan_unroll=36)
    assert markdown([unrolled]).splitlines()[-1].startswith(
        "| fitv2_xl, 36 blocks unrolled, ici (2,-1,1) |")  # fmt: skip


def test_a_blocks_probe_variant_unrolls_its_blocks_then_applies_its_overrides():
    """`bench --suite tpu_blocks`: N blocks, all unrolled, no remat, then the variant's own
    space-separated overrides, quoted values with commas included, typed as --config.a.b=v."""
    config = blocks_config("configs/fitv2_xl.py", 4, "model.gather_attention_once=True "
                           "mesh.ici='(2,-1,1)' model.remat_policy=dots")  # fmt: skip
    assert (config.model.depth, config.model.scan_unroll) == (4, 4)
    assert config.model.gather_attention_once is True and config.model.remat_policy == "dots"
    assert tuple(config.mesh.ici) == (2, -1, 1) and config.model.hidden_size == 1152
    assert blocks_config("configs/fitv2_xl.py", 2, "").model.remat_policy == "none"
    with pytest.raises(UserError, match="unknown config field .no_such_field"):
        blocks_config("configs/fitv2_xl.py", 2, "model.no_such_field=1")


def test_a_blocks_probe_ablation_leaves_out_exactly_its_parts_while_traced():
    """`--ablate`: the block norms (and the final one), modulation, gates and adaLN modulations
    are gone from the traced FiTv2 forward while `ablated` is open, the q/k norms stay (they are
    the attention's), and everything is back afterwards."""
    model = FiT(context_size=16, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                use_swiglu=True, q_norm="layernorm", k_norm="layernorm", adaln_type="lora",
                adaln_lora_dim=8, learn_sigma=False, use_sit=True)  # fmt: skip
    b, n = 2, 16
    args = (jnp.zeros((b, n, 16)), jnp.full((b,), 0.5), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, 2, n), jnp.int32), jnp.ones((b, n)))  # fmt: skip

    def traced():
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))["params"]
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *args))(params)
        return params, collections.Counter(e.primitive.name for e in _outside_kernels(jaxpr.jaxpr))

    params, counts = traced()
    # the scanned blocks' body once: norm1, norm2, the q and k norms; then the final norm
    assert counts["rsqrt"] == 4 + 1
    with ablated(["norms", "adaln"]):
        lean, lean_counts = traced()
    assert lean_counts["rsqrt"] == 2  # only the q/k norms
    assert "adaLN_modulation" in params["blocks"] and "adaLN_modulation" not in lean["blocks"]
    assert "adaLN_modulation" not in lean["final_layer"]
    assert lean_counts["dot_general"] < counts["dot_general"]
    with ablated(["modulation", "gates"]):
        assert traced()[1]["mul"] < counts["mul"]
    assert traced()[1] == counts
    with pytest.raises(ValueError, match="expected some of norms, modulation, gates, adaln"):
        with ablated(["norms", "attention"]):
            pass


def test_out_of_hbm_reads_both_forms_of_libtpus_error_and_nothing_else():
    temporaries = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                   "HLO temporaries (34.92G) exceeds available HBM (31.25G).")  # fmt: skip
    oom = out_of_hbm(temporaries)
    assert oom["what"] == "HLO temporaries" and oom["message"] == temporaries
    assert oom["needed_bytes"] == int(34.92 * 2**30) and oom["available_bytes"] == 31.25 * 2**30
    used = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
            "space hbm. Used 20.58G of 15.75G hbm. Exceeded hbm capacity by 4.83G.")  # fmt: skip
    oom = out_of_hbm(used)
    assert oom["needed_bytes"] == int(20.58 * 2**30) and oom["available_bytes"] == 15.75 * 2**30
    assert out_of_hbm("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.")[
        "needed_bytes"] is None  # fmt: skip
    assert out_of_hbm("INVALID_ARGUMENT: Mosaic failed to compile the kernel") is None
    assert out_of_hbm("RESOURCE_EXHAUSTED: too many open files") is None


def test_dry_run_of_two_slices_gives_an_estimate_and_counts_the_dcn_transfers(capsys):
    """A multi-slice program carries "SliceId" and "ZeroCrop" custom calls that the cost model
    prices at -1 s each (optimal_seconds came out as minus their count plus the step's time);
    `program_cost` adds them back. Oracle: the same 8-chip step with the data axis on one
    slice's ICI, whose estimate needs no correction."""
    two_slices = _tiny_unrolled()
    two_slices.mesh.ici, two_slices.mesh.dcn = (1, -1, 1), (2, 1, 1)
    one_slice = _tiny_unrolled()
    one_slice.mesh.ici = (2, -1, 1)
    with jax.default_matmul_precision("default"):
        multi = dry_run(two_slices, global_batch=16, topology="v5p:2x2x1")
        single = dry_run(one_slice, global_batch=16, topology="v5p:2x2x2", verbose=False)
    out = capsys.readouterr().out
    assert multi["chips"] == single["chips"] == 8 and multi["mesh"] == single["mesh"]
    assert multi["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert 0.95 < multi["estimate_flops_ratio"] < 1.1, multi["estimate_flops_ratio"]
    # uncorrected the estimate is about -24 s; corrected, the step's time on the chips (the
    # DCN all-reduce left out, so at most the one-slice step's, which prices its ICI one)
    ratio = multi["estimate_step_seconds"] / single["estimate_step_seconds"]
    assert 0.5 < ratio <= 1.0, ratio
    dcn = multi["collectives"]["dcn all-reduce"]
    assert dcn["count"] > 0 and dcn["bytes"] > 0 and "dcn all-reduce" not in single["collectives"]
    assert "the transfers between slices over DCN" in out and "compiler estimate" in out


def test_the_estimate_prices_every_op_of_a_stacked_block_program_on_v5e():
    # Two stacked FiTv2-B blocks on v5e-16: left alone, memory-space assignment prefetches the
    # stacked kernels in slices joined by ConcatBitcast custom calls that the cost model prices
    # at -1 s, so v5e and v6e rows had no estimate; the estimate's compiler options prevent it.
    config = load_config(os.path.join(ROOT, "configs", "fitv2_b.py"))
    config.model.depth, config.model.remat_policy = 2, "full"
    devices, chip, _ = topology_devices("v5e-16")
    setup = build_setup(config, 64, mesh=create_mesh(config.mesh.ici, devices=devices))
    state, batch = setup.abstract_state_sharded(), setup.abstract_batch()

    def compile_with(unroll):
        model = setup.model.clone(scan_unroll=unroll)
        forward = lambda p, b: model.apply(
            {"params": p}, b["x"], jnp.full(b["y"].shape, 0.5), b["y"], b["grid"], b["mask"]
        )
        with setup.context(), jax.default_matmul_precision("default"):
            compiled = jax.jit(forward).lower(state.params, batch).compile(ESTIMATE_OPTIONS)
        assert "ConcatBitcast" not in unpriced_ops(compiled.as_text())
        return compiled

    est = scanned_cost(compile_with, depth=2)  # raises if an op is left unpriced
    s = summarize(config.model, tokens=256)
    model_flops = 2e9 * (s["total_gmacs"] + s["attention_map_gmacs"]) * 64 / len(devices)
    assert 0.9 < est.flops / model_flops < 1.3, est.flops / model_flops
    _, peak = per_device(chip, len(devices), len(devices))
    assert model_flops / peak < est.seconds < 100 * model_flops / peak  # not beyond the peak


@pytest.mark.parametrize("remat, calls", [(False, 9), (True, 12)])
def test_traced_dots_count_a_scanned_layer_per_iteration_and_its_recomputation(remat, calls):
    def layer(h, w):
        return jnp.tanh(h @ w)

    def loss(ws, x):
        body = jax.checkpoint(layer) if remat else layer
        return jnp.sum(jax.lax.scan(lambda h, w: (body(h, w), None), x, ws)[0])

    ws, x = jnp.ones((3, 16, 16)), jnp.ones((4, 16))
    dots = traced_dots(jax.make_jaxpr(jax.grad(loss))(ws, x))
    # 3 layers: forward h @ w, backward dh and dw; recomputed, the forward once more
    assert sum(dots.values()) == calls
    assert sorted(dots.values()) == ([3, 3, 3] if not remat else [3, 3, 6])
    assert all(d.flops == 2 * 4 * 16 * 16 and not d.batched for d in dots)


def test_traced_dots_leave_out_a_gradient_nobody_uses():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    def backward(residuals, g):
        x, w = residuals
        return g @ w.T, x.T @ g  # d/dx is computed, but only d/dw is asked for

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), backward)
    loss = lambda w, x: jnp.sum(jnp.tanh(matmul(x, w)))
    for f in (jax.grad(loss), jax.jit(jax.grad(loss))):
        dots = traced_dots(jax.make_jaxpr(f)(jnp.ones((8, 8)), jnp.ones((4, 8))))
        assert sum(dots.values()) == 2  # forward and d/dw


def test_traced_dots_take_a_conds_costliest_branch():
    def f(p, x):
        return jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)

    dots = traced_dots(jax.make_jaxpr(f)(True, jnp.ones((8, 8))))
    assert sum(dots.values()) == 2


def test_matmuls_priced_alone_add_up_to_the_estimate_of_a_program_of_them():
    """The MFU ceiling (`bench --suite tpu_matmuls`) sums dots compiled one by one; on a step of
    nothing but matmuls it must agree with the compiler's estimate of the whole program."""
    devices, chip, _ = topology_devices("v5p:2x2x1")
    a, w1, w2 = (jnp.ones(s, jnp.bfloat16) for s in [(2048, 1152), (1152, 3072), (3072, 1152)])
    f = lambda a, w1, w2: (a @ w1) @ w2
    dots = traced_dots(jax.make_jaxpr(f)(a, w1, w2))
    priced = price_dots(dots, devices[0])
    assert len(priced) == 2 and all(p.calls == 1 for p in priced)
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in (a, w1, w2)]
    flops, seconds = program_cost(jax.jit(f).lower(*args).compile(ESTIMATE_OPTIONS))
    assert sum(p.calls * p.dot.flops for p in priced) == flops == 2 * 2 * 2048 * 1152 * 3072
    total = sum(p.total_seconds for p in priced)
    assert 0.9 < total / seconds < 1.1, (total, seconds)
    # and at that size the compiler's matmuls run well below the chip's bf16 peak
    assert 0.3 < flops / (total * chip.bf16_tflops * 1e12) < 0.9


def _attention_kernel_gathers(config) -> int:
    """All-gathers of the whole bf16 q/k/v kernel in the train step compiled for v5p:2x2x1."""
    devices, _, _ = topology_devices("v5p:2x2x1")
    mesh = create_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
    setup = build_setup(config, 8, mesh=mesh)
    with setup.context(), jax.default_matmul_precision("default"):
        lowered = setup.step.lower(setup.abstract_state_sharded(), setup.abstract_batch())
        text = lowered.compile().as_text()
    d = config.model.hidden_size
    shape = re.compile(rf"= bf16\[(1,)?{d},{3 * d}\]\S* all-gather\(")  # stored flat
    return len(shape.findall(text))


def test_attention_kernels_gathered_once_are_not_gathered_again_by_the_backward():
    """With nothing recomputed, one all-gather of each block's q/k/v kernel per step, in the
    forward, whether or not gather_attention_once asks for it: stored flat (layers.DenseND), the
    gathered kernel is already in the matmul's layout and the compiler keeps it for the backward
    (with the (D, 3, H, Dh) kernel FSDP alone gathered it again there, 2 x depth)."""
    config = _tiny_unrolled()
    assert _attention_kernel_gathers(config) == config.model.depth
    config.model.gather_attention_once = True
    assert _attention_kernel_gathers(config) == config.model.depth
