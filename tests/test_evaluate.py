"""Evaluation at several sizes (`eval.multi_size`, `python -m fitv2_jax.evaluate`): three sizes
of a tiny random pixel-space model against held-out demo photos, all output files, the resume
path and the command on the same outputs; plus the low-rank FID and the reference crop against
independent oracles.

The FID Inception is real (default_1.pt), so sample counts stay small: 12 samples (a batch of
8 and one of 4) and 8 reference images per resolution.
"""

import json
import os

import numpy as np
import pytest
from cli import error_line, run_cli
from PIL import Image

from fitv2_jax import sampling
from fitv2_jax.config.files import load_config
from fitv2_jax.eval import metrics
from fitv2_jax.eval.features import load_inception
from fitv2_jax.eval.metrics import feature_statistics, frechet_distance
from fitv2_jax.eval.multi_size import evaluate_sizes
from fitv2_jax.eval.reference import Reference, cover_crop, npz_reference, write_statistics
from fitv2_jax.eval.sample_features import PART, sample_features
from fitv2_jax.models.inception import POOL_DIM, SPATIAL_DIM
from fitv2_jax.parallel.mesh import inference_mesh
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.fit import random_params

PIXEL = ["--config", "configs/tiny.py", "--config.latent=false", "--config.model.in_channels=3",
         "--config.model.patch_size=16"]  # fmt: skip
SIZES = "256x256,160x320,320x320"


@pytest.fixture(scope="module")
def inception():
    return load_inception(batch_size=8)  # cached: later loads in this process reuse it


@pytest.mark.parametrize("n", [5, 40])
def test_frechet_distance_matches_adm_sqrtm(n):
    """Low-rank trace (n - 1 < D) and the full path (n - 1 >= D) vs ADM's sqrtm formula."""
    rng = np.random.default_rng(n)
    d = 12
    feats = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.3
    ref = rng.standard_normal((50, d)) * np.linspace(0.5, 2, d)
    mu_r, sigma_r = metrics.feature_statistics(ref)
    want = metrics.fid(*metrics.feature_statistics(feats), mu_r, sigma_r, method="sqrtm")
    assert frechet_distance(feats, mu_r, sigma_r) == pytest.approx(want, rel=1e-8, abs=1e-8)


def test_cover_crop_keeps_the_aspect_and_centre():
    """A 200x100 (W x H) image whose middle 100 columns are red: a square crop is all red; a
    50x200 (H x W) crop of it is the whole image scaled by 2, i.e. half red in the middle."""
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, 50:150, 0] = 255
    sq = cover_crop(Image.fromarray(a), 64, 64)
    assert sq.shape == (64, 64, 3) and sq[:, 2:-2, 0].min() >= 250  # edges: bicubic blur
    wide = cover_crop(Image.fromarray(a), 50, 100)
    assert wide.shape == (50, 100, 3)
    assert wide[:, 30:70, 0].min() >= 250 and wide[:, :20, 0].max() <= 5


def test_reference_npz_with_statistics_needs_no_inception(tmp_path):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((6, 4))
    path = write_statistics(
        str(tmp_path / "ref.npz"), *metrics.feature_statistics(pool), np.zeros(3), np.eye(3),
        pool=pool,
    )  # fmt: skip
    ref = npz_reference(path, str(tmp_path / "cache.npz"), None, 8, False)  # no Inception
    np.testing.assert_allclose(ref.pool, pool.astype(np.float32))
    assert ref.num == 6 and ref.spatial_stats[0].shape == (3,)


def test_adm_reference_uses_its_statistics_and_its_images_pool(tmp_path, inception):
    """ADM's layout: arr_0 images + precomputed mu/sigma/mu_s/sigma_s. The precomputed
    statistics are used as they are; the pool features (precision/recall) come from the images."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 32, 48, 3), dtype=np.uint8)
    stats = dict(mu=np.arange(2048.0), sigma=np.eye(2048), mu_s=np.ones(2023),
                 sigma_s=2 * np.eye(2023))  # fmt: skip
    path = str(tmp_path / "VIRTUAL_test.npz")
    np.savez(path, arr_0=images, **stats)
    cache = str(tmp_path / "cache.npz")
    ref = npz_reference(path, cache, inception, 8, False)
    got = dict(
        zip(("mu", "sigma", "mu_s", "sigma_s"), (*ref.stats, *ref.spatial_stats), strict=True)
    )
    for k, v in stats.items():
        np.testing.assert_array_equal(got[k], v)
    np.testing.assert_allclose(ref.pool, inception(images)["pool"], rtol=1e-5, atol=1e-6)
    again = npz_reference(path, cache, None, 8, False)  # cached: no Inception needed
    np.testing.assert_array_equal(again.pool, ref.pool)
    np.testing.assert_array_equal(again.stats[0], stats["mu"])


def _evaluate(out, inception, seed=0):
    config = load_config("configs/tiny.py", ["latent=false", "model.in_channels=3",
                                             "model.patch_size=16"])  # fmt: skip
    sampler = sampling.Sampler(config.model, random_params(config.model), inference_mesh(config),
                               latent=False, batch_size=8)  # fmt: skip
    plans = sampling.plan_sizes(config, SIZES, "auto", 1.0)
    return evaluate_sizes(
        sampler, plans, Reference(source="demo", split="heldout", num=8), out_dir=str(out),
        num_samples=12, options=sampling.SolverOptions("euler", 1), inception=inception,
        seed=seed, progress=False, settings=dict(checkpoint=None, params="ema"),
    )  # fmt: skip


def test_three_sizes_all_files_resume_and_the_command(tmp_path, inception, monkeypatch):
    out = tmp_path / "eval"
    # 1) interrupted in the second batch of the first size
    calls = {"n": 0}
    real_images = sampling.Sampler.images

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_images(self, *a, **kw)

    monkeypatch.setattr(sampling.Sampler, "images", flaky)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(out, inception)
    first = out / "256x256" / "features" / "batch_000000.npz"
    assert first.exists() and not (out / "256x256" / "features" / "batch_000001.npz").exists()
    stamp = os.stat(first).st_mtime_ns

    # 2) the same call resumes: one batch reused, the other five made
    results = _evaluate(out, inception)
    assert calls["n"] == 2 + 5
    assert os.stat(first).st_mtime_ns == stamp
    res = results["resolutions"]
    assert list(res) == SIZES.split(",")
    assert [(r["reused_batches"], r["new_batches"]) for r in res.values()] == [(1, 1), (0, 2),
                                                                               (0, 2)]  # fmt: skip
    assert [r["rule"] for r in res.values()] == ["none", "none", "vision-ntk+attn-scale"]
    for name, r in res.items():
        assert r["num_samples"] == 12 and r["num_reference"] == 8
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["sfid"])
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["inception_score"] is None  # default weights have no logits layer
        h, w = map(int, name.split("x"))
        grid = Image.open(out / name / "grid.png")
        s = sampling.display_scale(h, w)  # small samples are upscaled to be seen
        assert grid.size == (3 * (w * s + 2) + 2, 3 * (h * s + 2) + 2)  # 8 images in 3x3
        with np.load(r["reference_file"]) as f:  # cached statistics, ADM keys
            assert f["pool"].shape == (8, 2048) and f["sigma_s"].shape == (2023, 2023)

    on_disk = json.load(open(out / "results.json"))
    assert on_disk["resolutions"]["320x320"]["fid"] == pytest.approx(res["320x320"]["fid"])
    md = (out / "results.md").read_text()
    assert "| model | 256x256 | 160x320 | 320x320 |" in md and "vision-ntk+attn-scale" in md
    assert Image.open(out / "fid.png").size[0] > 200

    # 3) the command on the same outputs: every batch and reference reused, the same scores
    proc = run_cli("evaluate", *PIXEL, "--random_init", "--sizes", SIZES, "--num_samples", "12",
                   "--batch_size", "8", "--solver", "euler", "--num_steps", "1",
                   "--cfg_scale", "1", "--ref_source", "demo", "--ref_split", "heldout",
                   "--num_ref", "8", "--out", out, "--noprogress")  # fmt: skip
    again = json.load(open(out / "results.json"))["resolutions"]
    for name, r in res.items():
        assert again[name]["reused_batches"] == 2 and again[name]["new_batches"] == 0
        assert again[name]["fid"] == pytest.approx(r["fid"], rel=1e-9)
    assert str(out) in proc.stdout.strip().splitlines()[-1]

    # 4) features made with other settings are never mixed in silently
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        _evaluate(out, inception, seed=1)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give one reference"),
        (["--ref_source", "folder"], "--ref_source folder needs --ref_root"),
        (["--ref_source", "demo", "--sizes", "250x256"], r"height 250: use 240 or 256"),
        (["--ref_npz", "missing.npz"], "missing.npz: file not found"),
        (["--ref_source", "demo", "--resolutions", "256x256"], "renamed: use --sizes"),
    ],
    ids=["no-reference", "no-root", "size", "missing-npz", "renamed"],
)
def test_errors_name_the_flag(tmp_path, args, message):
    proc = run_cli("evaluate", *PIXEL, "--random_init", "--sizes", "256x256", "--out",
                   tmp_path / "o", *args, check=False)  # fmt: skip
    assert __import__("re").search(message, error_line(proc))
    assert not (tmp_path / "o").exists()


def test_sample_features_stream_many_samples_and_resume(tmp_path):
    """More samples than feature dimensions: statistics accumulate over the saved batches, pool
    features and logits go to disk, nothing is kept per batch; a resumed run gives the same."""
    n, bs = 2100, 300  # n > POOL_DIM: the statistics path, not the few-samples one

    class FakeSampler:
        batch_size = bs

        def plan_images(self, plan, ids, labels, key, options):
            return ids.astype(np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8), 7

    def fake_inception(images):  # deterministic per image: the first pixel seeds its features
        rng = [np.random.default_rng(int(v)) for v in images[:, 0, 0, 0]]
        return {
            "pool": np.stack([r.standard_normal(POOL_DIM) for r in rng]).astype(np.float32),
            "spatial": np.stack([r.standard_normal(SPATIAL_DIM) for r in rng]).astype(np.float32),
            "logits": np.stack([r.standard_normal(10) for r in rng]).astype(np.float32),
        }

    labels = np.zeros(n, np.int64)
    plan = sampling.SizePlan(4, 4, 1, 1, "none", 1.0)
    args = (FakeSampler(), fake_inception, plan, labels, None, sampling.SolverOptions(),
            str(tmp_path), {})  # fmt: skip
    first = sample_features(*args, spill_dir=str(tmp_path), progress=False)
    assert first.raw is None and first.info["new_batches"] == 7 and first.info["nfe"] == [7] * 7
    want = fake_inception(
        np.arange(n).astype(np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    )
    np.testing.assert_array_equal(first.pool[:], want["pool"])
    np.testing.assert_array_equal(first.logits[:], want["logits"])
    for got, key in ((first.stats, "pool"), (first.spatial_stats, "spatial")):
        mu, sigma = feature_statistics(want[key])
        np.testing.assert_allclose(got[0], mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[1], sigma, rtol=1e-9, atol=1e-12)

    os.remove(tmp_path / "features" / PART.format(3))
    again = sample_features(*args, spill_dir=str(tmp_path), progress=False)
    assert (again.info["reused_batches"], again.info["new_batches"]) == (6, 1)
    np.testing.assert_array_equal(again.pool[:], want["pool"])
    np.testing.assert_array_equal(again.stats[1], first.stats[1])
