"""The one scoring function: FID, KID, sFID, Inception Score, precision and recall of samples
against a reference, used by `evaluate`, `evaluate_npz` and evaluation during training.

    scores = score(sample_features, reference_features, k=3)
    scores["fid"], scores["kid"], scores["sfid"], scores["inception_score"], scores["precision"],
    scores["recall"], scores["kid_std"]

FID and sFID use the samples' raw features with the exact low-rank form when there are no more
samples than feature dimensions (`metrics.frechet_distance`), otherwise ADM's computation on the
streamed statistics (`metrics.fid`, method "sqrtm" as ADM or the faster "eigh"). KID and its std
over subsets (as is; tables print KID x 1e3) need pool features on both sides, at least 2 of
each; precision and recall more than k of each; the Inception Score needs the samples' logits.
A metric that cannot be computed is None.
"""

from __future__ import annotations

from fitv2_jax.eval import metrics
from fitv2_jax.eval.features import Features
from fitv2_jax.utils.errors import UserError

# (key, label) of every score in table order: the paper's, with KID beside FID. Tables print KID
# x 1e3 (`report.fmt_score`); the scores themselves hold it as is.
SCORES = (("fid", "FID"), ("kid", "KID x1e3"), ("sfid", "sFID"), ("inception_score", "IS"),
          ("precision", "Prec"), ("recall", "Rec"))  # fmt: skip
IS_SPLIT_SIZE = 5000  # ADM: consecutive splits of 5000 samples
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's and clean-fid's defaults


def _frechet(samples: Features, reference: Features, kind: str, method: str) -> float:
    mu_s, sigma_s = samples.stats if kind == "pool" else samples.spatial_stats
    mu_r, sigma_r = reference.stats if kind == "pool" else reference.spatial_stats
    if mu_s.shape != mu_r.shape:
        raise UserError(f"{kind} features of the samples {mu_s.shape} and the reference "
                        f"{mu_r.shape} have different dimensions")  # fmt: skip
    if samples.raw is not None:
        return metrics.frechet_distance(samples.raw[kind], mu_r, sigma_r, method)
    return metrics.fid(mu_s, sigma_s, mu_r, sigma_r, method=method)


def score(
    samples: Features,
    reference: Features,
    *,
    k: int = 3,
    fid_method: str = "sqrtm",
    fp16_distances: bool = True,
) -> dict[str, float | None]:
    """Every score of `samples` against `reference` (see the module docstring)."""
    if k < 1:
        raise UserError(f"--k {k}: precision/recall need k >= 1 nearest neighbours")
    out: dict[str, float | None] = dict.fromkeys([*(k for k, _ in SCORES), "kid_std"])
    out["fid"] = _frechet(samples, reference, "pool", fid_method)
    out["sfid"] = _frechet(samples, reference, "spatial", fid_method)
    if samples.logits is not None:
        out["inception_score"] = metrics.inception_score(samples.logits, split_size=IS_SPLIT_SIZE)
    pools = (reference.pool, samples.pool)
    if all(p is not None and len(p) >= 2 for p in pools):
        out["kid"], out["kid_std"] = metrics.kernel_inception_distance(*pools, KID_SUBSETS,
                                                                       KID_SUBSET_SIZE)  # fmt: skip
    if all(p is not None and len(p) > k for p in pools):
        out["precision"], out["recall"] = metrics.precision_recall(*pools, k=k,
                                                                   fp16=fp16_distances)  # fmt: skip
    return out
