"""Grain pipeline: determinism, per-host disjointness, checkpoint/restore, exact token layout,
bucketing (optimal buckets, padding efficiency), packing, multiprocess prefetch, global arrays."""

import itertools

import einops
import grain
import numpy as np
import pytest

from fitv2_jax.config.defaults import data_defaults
from fitv2_jax.data.bucketing import BatchPlan, choose_buckets, variant_weights
from fitv2_jax.data.encoders import PixelEncoder
from fitv2_jax.data.pipeline import make_train_iterator, to_global_batch
from fitv2_jax.data.records import PreparedDataset, decode_record
from fitv2_jax.data.shard_writer import PrepareSettings, prepare_split
from fitv2_jax.data.sources import open_source


@pytest.fixture(scope="module")
def demo_ds(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    settings = PrepareSettings(out=out, max_tokens=64, patch_size=2, num_shards=3,
                               process_index=0, process_count=1, progress=False)  # fmt: skip
    prepare_split(open_source("demo", demo_crops=8), PixelEncoder(), settings)
    return out


def _cfg(path, **kw):
    cfg = data_defaults()
    cfg.update(path=path, global_batch_size=8, read_threads=1, prefetch=2, **kw)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_batches(demo_ds):
    a = _take(make_train_iterator(_cfg(demo_ds), process_index=0, process_count=1, seed=0), 4)
    b = _take(make_train_iterator(_cfg(demo_ds), process_index=0, process_count=1, seed=0), 4)
    c = _take(make_train_iterator(_cfg(demo_ds), process_index=0, process_count=1, seed=1), 4)
    _assert_same(a, b)
    assert any((x["index"] != z["index"]).any() for x, z in zip(a, c, strict=True))


def test_hosts_get_disjoint_rows_of_the_same_global_batch(demo_ds):
    cfg = _cfg(demo_ds)
    one = _take(make_train_iterator(cfg, process_index=0, process_count=1, seed=3), 5)
    h0 = _take(make_train_iterator(cfg, process_index=0, process_count=2, seed=3), 5)
    h1 = _take(make_train_iterator(cfg, process_index=1, process_count=2, seed=3), 5)
    for g, a, b in zip(one, h0, h1, strict=True):
        assert a["x"].shape == b["x"].shape == (4, *g["x"].shape[1:])  # same L on every host
        assert not set(a["index"]) & set(b["index"])
        assert sorted([*a["index"], *b["index"]]) == sorted(g["index"])


@pytest.mark.parametrize("packing", [False, True])
def test_restore_continues_exactly(demo_ds, packing):
    cfg = _cfg(demo_ds, packing=packing)
    it = make_train_iterator(cfg, process_index=0, process_count=1, seed=0)
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 10)
    it2 = make_train_iterator(cfg, process_index=0, process_count=1, seed=0)
    it2.set_state(state)
    _assert_same(_take(it2, 10), want)


def test_restore_through_orbax(demo_ds, tmp_path):
    import orbax.checkpoint as ocp

    cfg = _cfg(demo_ds)
    it = make_train_iterator(cfg, process_index=0, process_count=1, seed=0)
    _take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("ds",)) as mngr:
        mngr.save(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = _take(it, 10)
        it2 = make_train_iterator(cfg, process_index=0, process_count=1, seed=0)
        mngr.restore(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(it2)))
    _assert_same(_take(it2, 10), want)


def _records(path):
    src = grain.sources.ArrayRecordDataSource(PreparedDataset(path).shards)
    return [decode_record(src[i]) for i in range(len(src))]


def _grid_oracle(h, w):
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([cols.ravel(), rows.ravel()])  # row 0 = column index, row 1 = row index


def _image(x_tokens, h, w):
    return einops.rearrange(x_tokens, "(h w) (c p1 p2) -> (h p1) (w p2) c", h=h, w=w, p1=2, p2=2)


def test_bucketed_batches_unpatchify_to_the_stored_arrays(demo_ds):
    recs = _records(demo_ds)
    variants = PreparedDataset(demo_ds).meta["variants"]
    it = make_train_iterator(_cfg(demo_ds), process_index=0, process_count=1, seed=0)
    for b in _take(it, 7):  # one epoch of 56 records
        for r in range(len(b["y"])):
            rec = recs[b["index"][r]]
            name = variants[b["variant"][r]]
            v = rec["variants"].index(name)
            stored = rec[f"x_{name}_{b['flip'][r]}"].astype(np.float32) / 127.5 - 1
            h, w = b["size"][r]
            n = h * w
            assert [h, w] == rec["size"][v].tolist() and b["y"][r] == rec["label"]
            assert b["mask"][r].tolist() == [1.0] * n + [0.0] * (b["x"].shape[1] - n)
            np.testing.assert_array_equal(b["grid"][r][:, :n], _grid_oracle(h, w))
            np.testing.assert_array_equal(_image(b["x"][r][:n], h, w), stored)
            assert not b["x"][r][n:].any() and not b["grid"][r][:, n:].any()


def test_packed_rows_unpatchify_to_the_stored_arrays(demo_ds):
    recs = _records(demo_ds)
    cfg = _cfg(demo_ds, packing=True, pack_length=128, pack_max_segments=4)
    b = next(make_train_iterator(cfg, process_index=0, process_count=1, seed=0))
    assert b["x"].shape == (8, 128, 12) and b["y"].shape == (8, 4) and b["size"].shape == (8, 4, 2)
    segments = 0
    for r in range(8):
        seg = b["segment_ids"][r]
        np.testing.assert_array_equal(b["mask"][r], (seg > 0).astype(np.float32))
        for s in range(4):
            where = np.flatnonzero(seg == s + 1)
            if b["index"][r, s] < 0:
                assert where.size == 0 and b["y"][r, s] == 7  # null class for unused slots
                continue
            segments += 1
            rec, (h, w) = recs[b["index"][r, s]], b["size"][r, s]
            assert where.size == h * w and (np.diff(where) == 1).all()
            assert b["y"][r, s] == rec["label"]
            np.testing.assert_array_equal(b["grid"][r][:, where], _grid_oracle(h, w))
            img = _image(b["x"][r][where], h, w)
            cands = [rec[k].astype(np.float32) / 127.5 - 1 for k in rec if k.startswith("x_")]
            assert any(c.shape == img.shape and (c == img).all() for c in cands)
    assert segments > 8  # several images per row


def test_schedule_uses_buckets_covers_each_record_once_and_mixes_variants():
    rng = np.random.default_rng(0)
    tokens = np.stack([rng.integers(16, 257, 1000), np.where(rng.random(1000) < 0.5, 256, 0)], 1)
    plan = BatchPlan(tokens, 32, (64, 128, 200, 256), 0, seed=5)
    ids, picks, crops = [], [], 0
    for b in range(plan.batches_per_epoch):
        i, v, f, L = plan(b)
        assert L in (64, 128, 200, 256) and tokens[i, v].max() <= L
        assert L == 64 or tokens[i, v].max() > {128: 64, 200: 128, 256: 200}[L]  # smallest fit
        assert (tokens[i, v] > 0).all()  # never an absent variant
        ids += list(i)
        picks += list(f)
        crops += int((v == 1).sum())
    assert len(ids) == len(set(ids)) == 31 * 32  # an epoch: every record at most once
    assert abs(np.mean(picks) - 0.5) < 0.05
    assert abs(crops / (tokens[ids, 1] > 0).sum() - 0.5) < 0.06  # Algorithm 1: p = 1/2
    assert (plan(0)[0] != plan(plan.batches_per_epoch)[0]).any()  # reshuffled each epoch


def test_choose_buckets_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        t = rng.integers(1, 40, rng.integers(3, 12))
        w = rng.random(len(t))
        k = int(rng.integers(1, 4))
        got = choose_buckets(t, w, k)

        def pad(bk, t=t, w=w):
            bk = np.asarray(sorted(bk))
            return float((w * (bk[np.searchsorted(bk, t)] - t)).sum())

        vals = sorted(set(t.tolist()) - {t.max()})
        best = min(pad((*c, t.max())) for r in range(k) for c in itertools.combinations(vals, r))
        assert got[-1] == t.max() and len(got) <= k
        assert pad(got) == pytest.approx(best)


def test_padding_efficiency_on_imagenet_like_sizes():
    from fitv2_jax.benchmarks.data import imagenet_like_sizes, token_table

    sizes = imagenet_like_sizes(40000, seed=1)
    for max_tokens in (256, 1024):
        tok = token_table(sizes, max_tokens)
        probs = variant_weights(tok, "random")
        buckets = choose_buckets(tok.reshape(-1), probs.reshape(-1), 8, 8)
        eff = BatchPlan(tok, 256, buckets, 0, 0).efficiency()
        pad_to_max = BatchPlan(tok, 256, (max_tokens,), 0, 0).efficiency()
        assert eff >= 0.97 and eff > pad_to_max, (max_tokens, eff, pad_to_max)
    assert pad_to_max < 0.8  # at 1024 tokens pad-to-max wastes a quarter


def test_multiprocess_prefetch_gives_the_same_batches(demo_ds):
    want = _take(make_train_iterator(_cfg(demo_ds), process_index=0, process_count=1, seed=0), 3)
    it = make_train_iterator(
        _cfg(demo_ds, worker_count=1), process_index=0, process_count=1, seed=0
    )
    _assert_same(_take(it, 3), want)


def test_to_global_batch_shards_the_batch_axis(demo_ds):
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    b = next(make_train_iterator(_cfg(demo_ds), process_index=0, process_count=1, seed=0))
    g = to_global_batch(b, mesh)
    for k, v in b.items():
        assert g[k].shape == v.shape and g[k].sharding.spec[0] in ("data", ("data",))
        np.testing.assert_array_equal(np.asarray(g[k]), v)
    assert len(g["x"].addressable_shards) == 8 and g["x"].addressable_shards[0].data.shape[0] == 2


def test_config_errors_are_clear(demo_ds, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_train_iterator(
            _cfg(str(tmp_path / "nowhere")), process_index=0, process_count=1, seed=0
        )
    with pytest.raises(ValueError, match="patch size 2 but config.data.patch_size = 4"):
        make_train_iterator(_cfg(demo_ds, patch_size=4), process_index=0, process_count=1, seed=0)
    with pytest.raises(ValueError, match="not a positive multiple of the 3 processes"):
        make_train_iterator(_cfg(demo_ds), process_index=0, process_count=3, seed=0)
    with pytest.raises(ValueError, match="largest bucket is 32"):
        make_train_iterator(
            _cfg(demo_ds, buckets=(16, 32)), process_index=0, process_count=1, seed=0
        )
