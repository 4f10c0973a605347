"""FID, sFID, Inception Score and improved precision/recall, computed as ADM's evaluator does,
and KID as torch-fidelity / clean-fid compute it.

    mu, sigma = feature_statistics(pool)                 # float64 mean (D,) and covariance (D, D)
    fid(mu_sample, sigma_sample, mu_ref, sigma_ref)      # sFID: the same on spatial features
    inception_score(logits, split_size=5000)             # ADM: consecutive splits of 5000
    precision_recall(ref_pool, sample_pool, k=3)         # (precision, recall)
    frechet_distance(features, mu_ref, sigma_ref)        # FID of raw features, exact when N <= D
    kernel_inception_distance(ref_pool, sample_pool)     # KID: (mean, std) over 100 subsets of 1000

`fitv2_jax.eval.features.features_from_batches` turns image batches into the inputs of all of
these, and `fitv2_jax.eval.scoring.score` computes them all the same way for every command.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
from scipy import linalg

from fitv2_jax.utils.errors import UserError

# ----------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features: (N, D) -> mean (D,), covariance (D, D) (unbiased, N - 1), both float64."""
    x = np.asarray(features, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


class RunningStatistics:
    """Mean and covariance of features that arrive in batches, without keeping them.

    Chan et al.'s pairwise update in float64 (each batch is centred on its own mean before it
    is merged), so the result matches `feature_statistics` on the concatenation to ~1e-12.
    """

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.shape[0] == 0:
            return
        nb = x.shape[0]
        mb = x.mean(axis=0)
        xc = x - mb
        m2b = xc.T @ xc
        delta = mb - self.mean
        n = self.n + nb
        self.m2 += m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


# ----------------------------------------------------------------------------- FID


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) = tr sqrt(R sigma2 R), R = sigma1^(1/2): symmetric eigensolves."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def fid(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    method "sqrtm" is ADM's computation exactly: scipy's sqrtm of sigma1 @ sigma2; when that is
    not finite, retry with eps on both diagonals; an imaginary part is dropped when the
    diagonal's is below 1e-3, an error otherwise. Method "eigh" gives the same trace from two
    symmetric eigensolves (equal to ~1e-6 relative on real features, and several times faster
    at D = 2048: a few seconds instead of tens on two cores).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        with warnings.catch_warnings():
            # sqrtm's own "matrix is singular" warning; the finiteness check below decides.
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"fid: singular product; adding {eps} to the diagonal of the covariances",
                stacklevel=2,
            )
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"fid: imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    else:
        raise ValueError(f"fid: unknown method {method!r} (use 'sqrtm' or 'eigh')")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance(features: np.ndarray, mu_ref, sigma_ref, method: str = "sqrtm") -> float:
    """FID between sample features (N, D) and a reference N(mu_ref, sigma_ref), float64.

    With N - 1 < D the sample covariance is A^T A (A: centred features / sqrt(N - 1), N x D), and
    the nonzero eigenvalues of sigma_s sigma_ref equal those of A sigma_ref A^T (N x N, symmetric
    PSD): tr sqrt(sigma_s sigma_ref) = sum sqrt(eigvalsh(A sigma_ref A^T)), exact. Otherwise
    `metrics.fid` (ADM's sqrtm, or "eigh").
    """
    x = np.asarray(features, np.float64)
    n, d = x.shape
    if n < 2:
        raise UserError(f"FID needs at least 2 samples, got {n}")
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if n - 1 >= d:
        return fid(*feature_statistics(x), mu_ref, sigma_ref, method=method)
    mu = x.mean(axis=0)
    a = (x - mu) / math.sqrt(n - 1)
    ev = np.linalg.eigvalsh(a @ sigma_ref @ a.T)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu - mu_ref
    return float(diff @ diff + np.sum(a * a) + np.trace(sigma_ref) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------- IS


def inception_score(logits, splits: int = 10, split_size: int | None = None) -> float:
    """Mean over splits of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits).

    logits: (N, C) ndarray or FeatureFile. ADM cuts consecutive splits of `split_size` = 5000
    samples (10 splits for 50K); with split_size None the N samples are cut into `splits`
    near-equal parts instead (as np.array_split). One split is in memory at a time. Terms with
    p = 0 count as 0 (ADM would give nan there).
    """
    n = len(logits)
    if split_size is None:
        size, extra = divmod(n, splits)
        bounds = np.cumsum([0] + [size + (i < extra) for i in range(splits)])
    else:
        bounds = [*range(0, n, split_size), n]
    scores = []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        x = np.asarray(logits[a:b], np.float64)
        x -= x.max(axis=1, keepdims=True)
        part = np.exp(x)
        part /= part.sum(axis=1, keepdims=True)
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision/recall


def _sq_norms(x):
    return np.einsum("ij,ij->i", x, x)


def _round16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest float16, in place (kept in float32: fast casts)."""
    x[...] = x.astype(np.float16)
    return x


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray, fp16: bool = True) -> np.ndarray:
    """Squared distances (Nu, Nv) float32 as ADM's DistanceBlock: |u|^2 - 2 u.v + |v|^2, >= 0.

    ADM computes this in float16 and falls back to float32 when anything overflows; fp16=True
    emulates it: inputs, norms, products and each sum are rounded to float16 (the arithmetic
    itself runs in float32, which float16 numpy arithmetic would only make slower). In place
    on one (Nu, Nv) buffer, so a block costs little more than its own size.
    """
    u32, v32 = np.asarray(u, np.float32), np.asarray(v, np.float32)
    if fp16:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> float32 below
            uf, vf = _round16(u32.copy()), _round16(v32.copy())
            d = _round16(uf @ vf.T)
            d *= -2
            d += _round16(_sq_norms(uf))[:, None]
            _round16(d)
            d += _round16(_sq_norms(vf))[None, :]
            np.maximum(_round16(d), 0.0, out=d)
        if np.isfinite(d).all():
            return d
    d = u32 @ v32.T
    d *= -2
    d += _sq_norms(u32)[:, None]
    d += _sq_norms(v32)[None, :]
    return np.maximum(d, 0.0, out=d)


def manifold_radii(features, k: int = 3, batch_size: int = 1000, fp16: bool = True) -> np.ndarray:
    """(N,) squared distance from each point to its k-th nearest neighbour (itself is the 0th).

    features: (N, D) ndarray or FeatureFile. Each row block keeps only its k + 1 smallest
    distances so far, merged block by block, so memory is O(batch_size^2), whatever N is.
    """
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples, got {n}")
    radii = np.zeros(n, np.float32)
    for i in range(0, n, batch_size):
        rows = features[i : i + batch_size]
        nearest = np.full((len(rows), k + 1), np.inf, np.float32)
        for j in range(0, n, batch_size):
            d = pairwise_sq_distances(rows, features[j : j + batch_size], fp16)
            merged = np.concatenate([nearest, d], axis=1)
            nearest = np.partition(merged, k, axis=1)[:, : k + 1]
        radii[i : i + batch_size] = nearest.max(axis=1)
    return radii


def precision_recall(
    real, fake, k: int = 3, batch_size: int = 1000, fp16: bool = True
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them.

    real: (N1, D) reference features, fake: (N2, D) sample features (ndarrays or FeatureFiles).
    Precision is the share of samples inside some real point's k-NN ball; recall the share of
    real points inside some sample's k-NN ball (squared distances, ball boundary included).
    Distances are computed in (batch_size x batch_size) blocks, so memory does not grow with N.
    """
    real_radii = manifold_radii(real, k, batch_size, fp16)
    fake_radii = manifold_radii(fake, k, batch_size, fp16)
    real_in = np.zeros(len(real), bool)
    fake_in = np.zeros(len(fake), bool)
    for i in range(0, len(real), batch_size):
        rows = real[i : i + batch_size]
        for j in range(0, len(fake), batch_size):
            d = pairwise_sq_distances(rows, fake[j : j + batch_size], fp16)
            real_in[i : i + batch_size] |= (d <= fake_radii[None, j : j + batch_size]).any(axis=1)
            fake_in[j : j + batch_size] |= (d <= real_radii[i : i + batch_size, None]).any(axis=0)
    return float(fake_in.mean()), float(real_in.mean())


# ----------------------------------------------------------------------------- KID


def _cubic_kernel_sum(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Sum and trace of the (m, n) kernel matrix k(a_i, b_j) = (a_i.b_j / D + 1)^3, a: (m, D)."""
    g = a @ b.T
    g /= a.shape[1]
    g += 1
    g *= g * g
    return float(g.sum()), float(np.trace(g))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of x: (m, D) and y: (n, D) with the cubic kernel k(a, b) = (a.b / D + 1)^3.

    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n), in float64, one kernel matrix at a time.
    Unbiased, so it scatters around 0 (negative too) when x and y have the same distribution.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if min(m, n) < 2:
        raise ValueError(f"MMD^2 needs at least 2 feature vectors on each side, got {m} and {n}")
    sxx, txx = _cubic_kernel_sum(x, x)
    syy, tyy = _cubic_kernel_sum(y, y)
    sxy, _ = _cubic_kernel_sum(x, y)
    return (sxx - txx) / (m * (m - 1)) + (syy - tyy) / (n * (n - 1)) - 2 * sxy / (m * n)


def _take_rows(x, rows: np.ndarray) -> np.ndarray:
    """x[rows] for sorted row indices of an ndarray, or of a FeatureFile (one slice per run)."""
    if isinstance(x, np.ndarray):
        return x[rows]
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    return np.concatenate([x[r[0] : r[-1] + 1] for r in runs])


def kernel_inception_distance(
    real, fake, num_subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std (ddof 0) of `polynomial_mmd2` over subsets.

    real: (N1, D) reference features, fake: (N2, D) sample features (ndarrays or FeatureFiles).
    Each of `num_subsets` subsets draws m = min(subset_size, N1, N2) rows of each side without
    replacement, so memory is a few (m, m) kernel blocks whatever N is. The draws are
    torch-fidelity's (defaults 100 x 1000, seed 2020): numpy RandomState(seed), per subset
    choice(N2, m) of the samples, then choice(N1, m) of the reference (rows are then read in
    sorted order, which leaves MMD^2 unchanged). Near 0 (and possibly negative) for samples of
    the reference's distribution; tables print it x 1e3.
    """
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {len(real)} and "
                         f"{len(fake)} (subset_size {subset_size})")  # fmt: skip
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(num_subsets):
        f = np.sort(rng.choice(len(fake), m, replace=False))
        r = np.sort(rng.choice(len(real), m, replace=False))
        mmds.append(polynomial_mmd2(_take_rows(real, r), _take_rows(fake, f)))
    return float(np.mean(mmds)), float(np.std(mmds))
