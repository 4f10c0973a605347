"""evaluate_npz: ADM's evaluator without TensorFlow (`eval.npz_scores` and the command), on
small .npz files of real photos."""

import json
import re
import tracemalloc

import numpy as np
import pytest
import torch
from cli import error_line, run_cli
from skimage import data
from test_inception import _reference_resize, _torch_features, _TorchvisionFIDInception
from test_metrics import _oracle_mmd2

from fitv2_jax.data.npz import NpzImages
from fitv2_jax.eval.features import load_inception
from fitv2_jax.eval.metrics import feature_statistics
from fitv2_jax.eval.npz_scores import format_results, score_npz_files
from fitv2_jax.eval.reference import write_statistics
from fitv2_jax.models.inception import POOL_DIM, SPATIAL_DIM
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.inception import default_weights_path


def _crops(img, n, h, w, seed):
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, img.shape[0] - h + 1, n)
    xs = rng.integers(0, img.shape[1] - w + 1, n)
    return np.stack([img[y : y + h, x : x + w] for y, x in zip(ys, xs, strict=True)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two .npz files of real photo crops: 8 square (96x96), 8 wide (64x128)."""
    d = tmp_path_factory.mktemp("npz")
    square = np.concatenate(
        [_crops(data.astronaut(), 4, 96, 96, 0), _crops(data.coffee(), 4, 96, 96, 1)]
    )
    wide = np.concatenate(
        [_crops(data.chelsea(), 4, 64, 128, 2), _crops(data.rocket(), 4, 64, 128, 3)]
    )
    a, b = str(d / "square.npz"), str(d / "wide.npz")
    np.savez(a, arr_0=square)
    np.savez_compressed(b, arr_0=wide)  # compressed members stream too
    return {"dir": d, "a": a, "b": b, "square": square, "wide": wide}


def _score(ref, samples, **kw):
    return score_npz_files(ref, samples, batch_size=8, fid_method="eigh", **kw)


def test_self_score_is_zero_fid_and_full_precision_recall(photos, tmp_path):
    """Through the command: ADM's printout and the JSON file."""
    out_json = str(tmp_path / "self.json")
    proc = run_cli("evaluate_npz", photos["a"], photos["a"], "--out", out_json, "--batch_size",
                   "8", "--fid_method", "eigh")  # fmt: skip
    r, out = json.load(open(out_json)), proc.stdout
    # Float error only: 8 samples give rank-7 covariances in 2048-d, and the square roots of the
    # ~2000 zero eigenvalues (float noise ~1e-12 each) add up to ~1e-4; distinct sets give > 50.
    assert abs(r["fid"]) < 2e-3 and abs(r["sfid"]) < 2e-3
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    # ADM's printout, one metric per line, IS unavailable (not 0) with the default weights; KID
    # after it.
    lines = out.splitlines()
    i = next(j for j, line in enumerate(lines) if line.startswith("Inception Score:"))
    assert "unavailable" in lines[i]
    assert [line.split(":")[0] for line in lines[i : i + 7]] == [
        "Inception Score",
        "FID",
        "sFID",
        "Precision",
        "Recall",
        "KID",
        "KID std",
    ]
    assert float(lines[i + 1].split(": ")[1]) == r["fid"]
    assert float(lines[i + 5].split(": ")[1]) == r["kid"] and np.isfinite(r["kid"])
    assert out_json in lines[-1]
    assert r["inception_score"] is None and r["num_samples"] == r["num_reference"] == 8


def _torch_pool_spatial(images):
    net = torch.jit.load(default_weights_path(), map_location="cpu").eval()
    feats = _torch_features(net, images)
    return feats["pool"].astype(np.float64), feats["spatial"].astype(np.float64)


def _oracle_fid(x, y):
    """FID in float64 via tr sqrt(S1 S2) = nuclear norm of Xc^T Yc / (n - 1) (n x m, tiny)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    s1 = xc.T @ xc / (len(x) - 1)
    s2 = yc.T @ yc / (len(y) - 1)
    nuclear = np.linalg.svd(xc @ yc.T / np.sqrt((len(x) - 1) * (len(y) - 1)), compute_uv=False)
    diff = x.mean(0) - y.mean(0)
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * nuclear.sum()


def test_fid_equals_independent_computation_on_torch_features(photos):
    r = _score(photos["a"], photos["b"])
    pool_a, spatial_a = _torch_pool_spatial(photos["square"])
    pool_b, spatial_b = _torch_pool_spatial(photos["wide"])
    want_fid, want_sfid = _oracle_fid(pool_b, pool_a), _oracle_fid(spatial_b, spatial_a)
    assert want_fid > 50  # different photos: far from the self-score 0
    np.testing.assert_allclose(r["fid"], want_fid, rtol=1e-4)
    np.testing.assert_allclose(r["sfid"], want_sfid, rtol=1e-4)
    # 8 images a side: every KID subset is all of them, so KID is the full-matrix MMD^2.
    want_kid = _oracle_mmd2(pool_a, pool_b)
    assert want_kid > 0.1
    np.testing.assert_allclose(r["kid"], want_kid, rtol=1e-4)

    # A reference given as precomputed statistics plus pool features (no images) gives the
    # same numbers, and is reported as precomputed.
    mu, sigma = feature_statistics(pool_a)
    mu_s, sigma_s = feature_statistics(spatial_a)
    ref = write_statistics(
        str(photos["dir"] / "stats.npz"), mu, sigma, mu_s, sigma_s, pool=pool_a.astype(np.float32)
    )
    r2 = _score(ref, photos["b"])
    assert r2["reference_statistics"] == "precomputed"
    np.testing.assert_allclose(r2["fid"], want_fid, rtol=1e-4)
    np.testing.assert_allclose([r2["precision"], r2["recall"]], [r["precision"], r["recall"]])
    np.testing.assert_allclose(r2["kid"], want_kid, rtol=1e-4)


def test_inception_score_with_pytorch_fid_layout_weights(photos, tmp_path):
    # A random network in pytorch-fid's .pth layout (the real file is not redistributable):
    # the CLI's IS must equal numpy's IS on torch's logits (without the fc bias, as ADM).
    torch.manual_seed(1)
    net = _TorchvisionFIDInception()
    x = np.stack([_reference_resize(im, 299, 299) for im in photos["wide"]])
    x = torch.from_numpy((x - 128.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        net.train()
        net(x)  # BN running statistics from this batch: well-scaled activations
        net.eval()
        net.fc.weight.mul_(20.0)  # confident predictions, so the score is far from 1
        logits = (net(x)[2] - net.fc.bias).numpy().astype(np.float64)
    weights = str(tmp_path / "pt_inception-random.pth")
    torch.save(net.state_dict(), weights, _use_new_zipfile_serialization=False)

    r = _score(photos["a"], photos["b"], inception_weights=weights)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
    assert want > 1.5
    np.testing.assert_allclose(r["inception_score"], want, rtol=1e-3)
    assert f"Inception Score: {r['inception_score']}" in format_results(r)


def test_npz_images_stream_in_batches_equal_to_np_load(photos):
    for path, key in ((photos["a"], "square"), (photos["b"], "wide")):
        reader = NpzImages(path)
        batches = list(reader.batches(3))
        assert [len(b) for b in batches] == [3, 3, 2]
        np.testing.assert_array_equal(np.concatenate(batches), photos[key])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, r"bad\.npz: no 'arr_0'"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, r"bad\.npz: 'arr_0' has dtype float32"),
        ({"arr_0": np.zeros((2, 8, 8), np.uint8)}, r"bad\.npz: 'arr_0' has shape \(2, 8, 8\)"),
        ({"arr_0": np.zeros((2, 8, 8, 4), np.uint8)}, r"bad\.npz: 'arr_0' has 4 channels"),
        ({"arr_0": np.zeros((3, 8, 8, 3), np.uint8)}, r"bad\.npz: 3 (reference|sample) images"),
    ],
)
def test_bad_archives_are_rejected_naming_file_and_key(photos, tmp_path, arrays, message):
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **arrays)
    with pytest.raises(UserError, match=message):
        _score(photos["a"], bad)
    with pytest.raises(UserError, match=message):
        _score(bad, photos["a"])


def test_command_errors_are_one_line_and_inputs_are_never_overwritten(photos, tmp_path):
    proc = run_cli("evaluate_npz", photos["a"], tmp_path / "nope.npz", check=False)
    assert "nope.npz: sample file not found" in error_line(proc)
    before = open(photos["a"], "rb").read()
    proc = run_cli("evaluate_npz", photos["a"], photos["b"], "--out", photos["a"], check=False)
    assert re.search("--out .*square.npz is one of the input files", error_line(proc))
    assert open(photos["a"], "rb").read() == before
    proc = run_cli("evaluate_npz", photos["a"], photos["b"], "--json", "x.json", check=False)
    assert "--json was renamed: use --out" in error_line(proc)


def test_reference_pool_of_the_wrong_width_is_rejected(tmp_path):
    d = 16
    stats = write_statistics(
        str(tmp_path / "stats.npz"),
        np.zeros(d),
        np.eye(d),
        np.zeros(d),
        np.eye(d),
        pool=np.zeros((5, d + 1), np.float32),
    )
    with pytest.raises(UserError, match=r"stats\.npz: 'pool' has shape \(5, 17\); expected"):
        _score(stats, stats)


def test_memory_does_not_grow_with_the_number_of_samples(tmp_path, capsys):
    """10x the samples, the same peak of Python/numpy memory (numpy reports its buffers to
    tracemalloc): images stream batch by batch, features wait on disk, metrics run in blocks.
    Peak RSS at 512x512 (2000 vs 200 samples) is measured by `python -m fitv2_jax.bench --suite
    eval --rss 200,2000`."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((40, POOL_DIM)).astype(np.float32)
    mu, sigma = feature_statistics(pool)
    ref = write_statistics(
        str(tmp_path / "ref.npz"), mu, sigma, np.zeros(SPATIAL_DIM), np.eye(SPATIAL_DIM), pool=pool
    )
    photo = data.astronaut()
    paths = {}
    for n in (8, 80):  # whole batches of 8: one compiled shape
        paths[n] = str(tmp_path / f"s{n}.npz")
        np.savez(paths[n], arr_0=_crops(photo, n, 64, 96, n))
    load_inception(None, batch_size=8)(np.zeros((8, 64, 96, 3), np.uint8))  # compile outside
    peaks = {}
    for n, path in paths.items():
        tracemalloc.start()
        try:
            _score(ref, path)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    capsys.readouterr()
    # Holding the 80 samples would add 72 x 64 x 96 x 3 = 1.3 MB, their pool features 0.6 MB.
    assert peaks[80] - peaks[8] < 256 * 1024, peaks
