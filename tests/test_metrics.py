"""ADM's metrics against analytic answers, hand-computed point clouds and numpy/scipy oracles."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fitv2_jax.eval.metrics import (
    RunningStatistics,
    feature_statistics,
    fid,
    inception_score,
    kernel_inception_distance,
    manifold_radii,
    pairwise_sq_distances,
    polynomial_mmd2,
    precision_recall,
)
from fitv2_jax.eval.reference import read_reference, write_statistics


def test_running_statistics_equal_numpy_cov_on_the_concatenation():
    rng = np.random.default_rng(0)
    # A large common offset: a naive sum-of-squares update would lose digits here.
    x = rng.standard_normal((103, 6)).astype(np.float32) * 3 + 1e3
    acc = RunningStatistics(6)
    for a, b in ((0, 1), (1, 40), (40, 40), (40, 103)):
        acc.update(x[a:b])
    mu, sigma = acc.result()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9)
    mu2, sigma2 = feature_statistics(x)
    assert mu2.dtype == sigma2.dtype == np.float64
    np.testing.assert_allclose(sigma2, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_a_set_with_itself_is_zero(method):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((40, 24)) @ rng.standard_normal((24, 24))
    mu, sigma = feature_statistics(feats)
    assert abs(fid(mu, sigma, mu, sigma, method=method)) < 1e-8 * np.trace(sigma)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_gaussians_equals_closed_form(method):
    rng = np.random.default_rng(2)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # sigma1 = c I against any SPD sigma2: FID = |mu1 - mu2|^2 + sum_i (sqrt(c) - sqrt(l_i))^2.
    c = 2.5
    a = rng.standard_normal((d, d))
    sigma2 = a @ a.T / d + 0.1 * np.eye(d)
    lam = np.linalg.eigvalsh(sigma2)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(c) - np.sqrt(lam)) ** 2)
    got = fid(mu1, c * np.eye(d), mu2, sigma2, method=method)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # Diagonal pair: sum (sqrt(a_i) - sqrt(b_i))^2.
    da, db = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(da) - np.sqrt(db)) ** 2)
    np.testing.assert_allclose(fid(mu1, np.diag(da), mu2, np.diag(db), method=method), want)


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    n, d = 200_000, 3
    x = rng.standard_normal((n, d)) * np.sqrt([1.0, 2.0, 0.5]) + [1, 0, 0]
    y = rng.standard_normal((n, d)) * np.sqrt([4.0, 2.0, 0.5])
    want = 1 + (1 - 2) ** 2  # mean shift 1 on axis 0, sqrt(1) vs sqrt(4) on axis 0
    got = fid(*feature_statistics(x), *feature_statistics(y))
    assert abs(got - want) < 0.03


def test_fid_sqrtm_and_eigh_agree_on_rank_deficient_covariances():
    # Fewer samples than dimensions, as with small evaluation sets: a singular product.
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((25, 64)) + 0.3
    stats = (*feature_statistics(x), *feature_statistics(y))
    np.testing.assert_allclose(fid(*stats, method="sqrtm"), fid(*stats, method="eigh"), rtol=1e-5)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        fid(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_one_hot_predictions_is_the_class_count():
    k = 5
    labels = np.arange(50) % k
    logits = 60.0 * np.eye(k)[labels]  # softmax is one-hot to float64 precision
    assert inception_score(logits, splits=10) == pytest.approx(k, rel=1e-9)
    assert inception_score(logits, split_size=25) == pytest.approx(k, rel=1e-9)
    # All samples of one class: IS 1; uniform predictions: IS 1.
    assert inception_score(60.0 * np.eye(k)[np.zeros(50, int)], splits=2) == pytest.approx(1.0)
    assert inception_score(np.zeros((50, 1008)), splits=10) == pytest.approx(1.0)
    # Exact zeros in p (huge logits) count as 0, never nan.
    assert inception_score(1e4 * np.eye(k)[labels], splits=1) == pytest.approx(k)


def test_inception_score_uses_consecutive_splits_like_adm():
    # First 5 samples all class 0, next 5 all class 1: each split of 5 scores 1; one split of
    # 10 scores 2.
    logits = 60.0 * np.eye(2)[np.repeat([0, 1], 5)]
    assert inception_score(logits, split_size=5) == pytest.approx(1.0)
    assert inception_score(logits, split_size=10) == pytest.approx(2.0)


@pytest.mark.parametrize("fp16", [True, False])
def test_pairwise_distances_match_scipy(fp16):
    rng = np.random.default_rng(5)
    u, v = rng.standard_normal((7, 40)), rng.standard_normal((9, 40))
    want = cdist(u, v, "sqeuclidean")
    got = pairwise_sq_distances(u, v, fp16=fp16)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=5e-3 if fp16 else 1e-5, atol=0.1 if fp16 else 1e-4)


def test_pairwise_distances_fall_back_to_float32_on_fp16_overflow():
    rng = np.random.default_rng(6)
    u, v = rng.uniform(200, 300, (4, 64)), rng.uniform(200, 300, (5, 64))  # |u|^2 >> 65504
    np.testing.assert_allclose(
        pairwise_sq_distances(u, v, fp16=True), cdist(u, v, "sqeuclidean"), rtol=1e-4
    )


def _line(xs):
    return np.stack([np.asarray(xs, float), np.zeros(len(xs)), np.zeros(len(xs))], axis=1)


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("batch_size", [2, 10000])
def test_precision_recall_on_hand_computed_point_clouds(fp16, batch_size):
    real = _line([0, 1, 2, 3, 4])
    fake = _line([2.5, 2.6, 2.7, 2.8, 50])
    # Squared 3-NN radii (self counts as the 0th): real 9, 4, 4, 4, 9; fake .09, .04, .04, .09,
    # 47.4^2 = 2246.76.
    np.testing.assert_allclose(manifold_radii(real, 3, batch_size, fp16), [9, 4, 4, 4, 9])
    # (float16 distances, as ADM's, lose digits to |u|^2 - 2uv + |v|^2 cancellation.)
    np.testing.assert_allclose(
        manifold_radii(fake, 3, batch_size, fp16),
        [0.09, 0.04, 0.04, 0.09, 2246.76],
        rtol=2e-3 if not fp16 else 1e-3,
        atol=1e-5 if not fp16 else 0.01,
    )
    # Precision: 2.5..2.8 lie within 2's ball (radius^2 4); 50 is outside every real ball: 4/5.
    # Recall: 3 lies in 2.8's ball (0.04 <= 0.09), 3 and 4 in 50's (47^2, 46^2 <= 2246.76), while
    # 0, 1, 2 are in none: 2/5.
    p, r = precision_recall(real, fake, k=3, batch_size=batch_size, fp16=fp16)
    assert (p, r) == (0.8, 0.4)


def test_precision_recall_of_a_set_with_itself_is_one():
    feats = np.random.default_rng(7).standard_normal((30, 64)).astype(np.float32)
    assert precision_recall(feats, feats) == (1.0, 1.0)


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))


def test_statistics_files_round_trip_and_reject_partial_ones(tmp_path):
    rng = np.random.default_rng(8)
    pool, spatial = rng.standard_normal((10, 6)), rng.standard_normal((10, 4))
    mu, sigma = feature_statistics(pool)
    mu_s, sigma_s = feature_statistics(spatial)
    path = write_statistics(
        str(tmp_path / "ref.npz"), mu, sigma, mu_s, sigma_s, pool=pool, resolution="256x256"
    )
    got = read_reference(path)
    for k, v in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s)):
        np.testing.assert_array_equal(got[k], v)
    np.testing.assert_allclose(got["pool"], pool, rtol=1e-6)
    with np.load(path) as f:  # ADM's evaluator reads exactly these keys
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(f.files)
        assert str(f["resolution"]) == "256x256"
    np.savez(tmp_path / "partial.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=r"partial\.npz.*mu_s"):
        read_reference(str(tmp_path / "partial.npz"))
    np.savez(tmp_path / "badshape.npz", mu=mu, sigma=sigma[:3], mu_s=mu_s, sigma_s=sigma_s)
    with pytest.raises(ValueError, match="'sigma'"):
        read_reference(str(tmp_path / "badshape.npz"))


def test_precision_recall_in_uneven_blocks_equal_brute_force_scipy():
    rng = np.random.default_rng(9)
    real, fake = rng.standard_normal((23, 16)), rng.standard_normal((31, 16)) + 1.0
    # Oracle: full distance matrices from scipy, k-th neighbour by sorting.
    r_real = np.sort(cdist(real, real, "sqeuclidean"), axis=1)[:, 3]
    r_fake = np.sort(cdist(fake, fake, "sqeuclidean"), axis=1)[:, 3]
    d = cdist(real, fake, "sqeuclidean")
    want_p = np.mean((d <= r_real[:, None]).any(axis=0))
    want_r = np.mean((d <= r_fake[None, :]).any(axis=1))
    assert 0 < want_p < 1 and 0 < want_r < 1
    got = precision_recall(real, fake, k=3, batch_size=7, fp16=False)
    np.testing.assert_allclose(got, (want_p, want_r))


# ----------------------------------------------------------------------------- KID


def _oracle_mmd2(x, y, biased=False):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 from the full kernel matrices, float64: mean
    of the off-diagonal entries of Kxx and Kyy (all entries if biased), minus twice Kxy's mean."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    if biased:
        return kxx.mean() + kyy.mean() - 2 * kxy.mean()
    off = lambda k: k[~np.eye(len(k), dtype=bool)].mean()
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def _oracle_kid(real, fake, num_subsets, subset_size, seed):
    """torch-fidelity's subsets: RandomState(seed), per subset the samples' rows, then the
    reference's; the full-matrix MMD^2 on each; mean and std (ddof 0)."""
    rng = np.random.RandomState(seed)
    m = min(subset_size, len(real), len(fake))
    mmds = []
    for _ in range(num_subsets):
        f = rng.choice(len(fake), m, replace=False)
        r = rng.choice(len(real), m, replace=False)
        mmds.append(_oracle_mmd2(real[r], fake[f]))
    return np.mean(mmds), np.std(mmds)


def test_kid_with_one_subset_of_everything_equals_the_full_matrix_mmd():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((60, 16)) + 0.5
    fake = rng.standard_normal((60, 16)) * 1.2
    want = _oracle_mmd2(real, fake)
    assert want > 0.1  # far from 0: a relative comparison means something
    for subsets in (1, 3):  # every subset is all 60 rows, in another order
        mean, std = kernel_inception_distance(real, fake, num_subsets=subsets, subset_size=1000)
        np.testing.assert_allclose(mean, want, rtol=1e-10)
        assert std < 1e-12 * want
    # Unequal sizes: the estimator itself (KID draws subsets of equal size).
    np.testing.assert_allclose(polynomial_mmd2(real, fake[:37]), _oracle_mmd2(real, fake[:37]),
                               rtol=1e-10)  # fmt: skip
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real, fake[:1])


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(11)
    # Unbiased: over many small draws from one distribution the mean is 0 within 4 standard
    # errors, single values are negative too; the biased (V-statistic) MMD^2 is not.
    pairs = [(rng.standard_normal((10, 4)), rng.standard_normal((10, 4))) for _ in range(2000)]
    vals = np.array([polynomial_mmd2(x, y) for x, y in pairs])
    biased = np.array([_oracle_mmd2(x, y, biased=True) for x, y in pairs[:200]])
    stderr = vals.std() / np.sqrt(len(vals))
    assert abs(vals.mean()) < 4 * stderr and (vals < 0).mean() > 0.2
    assert biased.mean() > 20 * stderr and (biased >= 0).all()
    # 16-d Gaussians, the samples' mean shifted by s on every axis.
    real = rng.standard_normal((600, 16))
    kids = []
    for s in (0.0, 0.1, 0.2, 0.4, 0.8):
        fake = rng.standard_normal((500, 16)) + s
        kids.append(kernel_inception_distance(real, fake, num_subsets=20, subset_size=200))
    (same, same_std), *shifted = kids
    assert abs(same) < 0.01 and abs(same) < same_std
    means = [k for k, _ in shifted]
    assert means[0] > 0.01 and np.all(np.diff(means) > 0) and means[-1] > 2, kids


def test_kid_in_subsets_equals_the_full_matrix_oracle_on_the_same_subsets(tmp_path):
    rng = np.random.default_rng(12)
    real = rng.standard_normal((70, 8)).astype(np.float32)
    fake = (rng.standard_normal((50, 8)) + 0.3).astype(np.float32)
    want = _oracle_kid(real, fake, num_subsets=7, subset_size=20, seed=3)
    assert want[1] > 0.05 * want[0] > 0  # the subsets differ: a wrong draw would show
    got = kernel_inception_distance(real, fake, num_subsets=7, subset_size=20, seed=3)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # The same from features on disk (rows read by slices).
    r, f = _feature_file(tmp_path, "r", real), _feature_file(tmp_path, "f", fake)
    np.testing.assert_allclose(kernel_inception_distance(r, f, 7, 20, seed=3), want, rtol=1e-10)
    assert kernel_inception_distance(real, fake, 7, 20, seed=4) != got


def _features(pool, with_pool=True):
    from fitv2_jax.eval.features import Features

    stats = feature_statistics(pool)
    return Features(stats, stats, pool if with_pool else None, num=len(pool))


def test_score_and_results_md_put_kid_beside_fid():
    from fitv2_jax.eval.report import results_markdown
    from fitv2_jax.eval.scoring import KID_SUBSET_SIZE, KID_SUBSETS, SCORES, score

    rng = np.random.default_rng(13)
    real = rng.standard_normal((80, 16)).astype(np.float32)
    fake = (rng.standard_normal((60, 16)) * 1.1 + 0.2).astype(np.float32)
    scores = score(_features(fake), _features(real))
    want = _oracle_kid(real, fake, KID_SUBSETS, KID_SUBSET_SIZE, seed=2020)
    np.testing.assert_allclose([scores["kid"], scores["kid_std"]], want, rtol=1e-10)
    assert [k for k, _ in SCORES][:2] == ["fid", "kid"]
    # A reference without pool features (statistics only): no KID, as IS without logits.
    no_pool = score(_features(fake), _features(real, with_pool=False))
    assert no_pool["kid"] is None and no_pool["kid_std"] is None
    assert no_pool["fid"] == pytest.approx(scores["fid"])

    row = dict(rule="none", cfg_scale=1.5, num_samples=60, num_reference=80, reference="test",
               nfe_per_batch=[10])  # fmt: skip
    md = results_markdown(dict(model="m", settings={}, resolutions={
        "256x256": dict(row, **scores), "160x320": dict(row, **no_pool)}))  # fmt: skip
    assert "| resolution | RoPE rule | CFG | FID | KID x1e3 | sFID | IS | Prec | Rec |" in md
    assert "FID / KID x1e3 / sFID / IS / Prec / Rec per resolution" in md
    fid, kid = f"{scores['fid']:.2f}", f"{scores['kid'] * 1e3:.2f}"
    assert f"| 256x256 | none | 1.5 | {fid} | {kid} | {fid} | - |" in md  # sFID: same stats
    assert f"| 160x320 | none | 1.5 | {fid} | - | {fid} | - | - | - |" in md
    assert f"| m | {fid} / {kid} / {fid} / - / " in md
    lines = md.splitlines()
    i = next(j for j, line in enumerate(lines) if line.startswith("| resolution"))
    assert lines[i].count("|") == lines[i + 1].count("|") == lines[i + 2].count("|")


# ----------------------------------------------------------------------------- bounded memory


def test_feature_file_round_trips_rows_and_slices(tmp_path):
    from fitv2_jax.eval.feature_file import FeatureFile

    rng = np.random.default_rng(3)
    x = rng.standard_normal((53, 7))
    store = FeatureFile(str(tmp_path / "f.f32"), 7)
    for a, b in ((0, 1), (1, 20), (20, 20), (20, 53)):
        store.append(x[a:b])  # float64 in, float32 stored
    assert len(store) == 53 and store.shape == (53, 7)
    want = x.astype(np.float32)
    for s in (slice(0, 53), slice(5, 9), slice(50, 1000), slice(60, 70), slice(None)):
        np.testing.assert_array_equal(store[s], want[s])
    np.testing.assert_array_equal(store[:], want)
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        store.append(np.zeros((2, 6)))
    with pytest.raises(TypeError, match="row slices"):
        store[3]
    store.close()


def _feature_file(tmp_path, name, x):
    from fitv2_jax.eval.feature_file import FeatureFile

    store = FeatureFile(str(tmp_path / name), x.shape[1])
    for i in range(0, len(x), 100):
        store.append(x[i : i + 100])
    return store


def test_metrics_on_feature_files_equal_the_in_memory_ones(tmp_path):
    rng = np.random.default_rng(5)
    real = rng.standard_normal((310, 16)).astype(np.float32)
    fake = (rng.standard_normal((270, 16)) * 1.3 + 0.2).astype(np.float32)
    logits = (rng.standard_normal((230, 12)) * 3).astype(np.float32)
    r, f, lg = (_feature_file(tmp_path, n, x) for n, x in (("r", real), ("f", fake), ("l", logits)))
    for fp16 in (True, False):
        want = precision_recall(real, fake, k=3, batch_size=64, fp16=fp16)
        assert precision_recall(r, f, k=3, batch_size=64, fp16=fp16) == want
        assert 0 < want[0] < 1 and 0 < want[1] < 1  # a case that can tell them apart
    np.testing.assert_array_equal(manifold_radii(r, 3, 64), manifold_radii(real, 3, 10_000))
    for kw in ({"split_size": 50}, {"splits": 7}):
        assert inception_score(lg, **kw) == pytest.approx(inception_score(logits, **kw), rel=1e-12)
    # The near-equal splits are np.array_split's.
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    parts = np.array_split(p, 7)
    want = np.mean([np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean()) for q in parts])
    assert inception_score(logits, splits=7) == pytest.approx(want, rel=1e-9)


def _peak_bytes(fn) -> int:
    """Peak of numpy/Python allocations while fn runs (numpy reports its buffers to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_precision_recall_and_inception_score_memory_does_not_grow_with_n(tmp_path):
    """Features on disk, metrics in fixed blocks: 10x the samples, the same peak memory."""
    rng = np.random.default_rng(9)
    peaks = {}
    for n in (400, 4000):
        real = _feature_file(tmp_path, f"r{n}", rng.standard_normal((n, 64)).astype(np.float32))
        fake = _feature_file(tmp_path, f"f{n}", rng.standard_normal((n, 64)).astype(np.float32))
        logits = _feature_file(tmp_path, f"l{n}", rng.standard_normal((n, 100)).astype(np.float32))
        peaks[n] = (
            _peak_bytes(lambda r=real, f=fake: precision_recall(r, f, k=3, batch_size=200)),
            _peak_bytes(lambda lg=logits: inception_score(lg, split_size=200)),
        )
    # What may grow: the (N,) radii and membership flags, 5 bytes per sample each set. An
    # (batch, N) distance block, as ADM keeps, would add 200 x 3600 x 4 = 2.9 MB at n = 4000.
    (pr_small, is_small), (pr_large, is_large) = peaks[400], peaks[4000]
    assert pr_large - pr_small < 2 * 3600 * 5 + 16_384, peaks
    assert is_large - is_small < 16_384, peaks


def test_kid_memory_does_not_grow_with_n(tmp_path):
    """KID on features on disk: (subset, subset) kernel blocks whatever N is. What may grow is
    RandomState.choice's permutation of N indices (8 bytes a row); a (subset, N) block of
    float64 kernels would add 200 x 3600 x 8 = 5.8 MB at n = 4000."""
    rng = np.random.default_rng(14)
    peaks = {}
    for n in (400, 4000):
        real = _feature_file(tmp_path, f"r{n}", rng.standard_normal((n, 64)).astype(np.float32))
        fake = _feature_file(tmp_path, f"f{n}", rng.standard_normal((n, 64)).astype(np.float32))
        peaks[n] = _peak_bytes(lambda r=real, f=fake: kernel_inception_distance(r, f, 3, 200))
    assert peaks[4000] - peaks[400] < 3600 * 8 * 2 + 16_384, peaks
