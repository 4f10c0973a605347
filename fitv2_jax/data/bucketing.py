"""Bucketing by token count: a deterministic global batch schedule with few static lengths.

Every host computes the same schedule from the per-record token counts (written by `prepare`),
so all hosts agree on each step's sequence length without talking to each other, and a batch
index alone says what a batch holds (which makes the iterator state a single integer).

Epoch e: permute the records (seed, e); pick each record's variant (Algorithm 1: resize or crop
with p = 1/2 when both exist) and flip; sort by token count (ties stay in random order) and cut
into batches of `global_batch` records; shuffle the batch order; each batch is padded to the
smallest bucket >= its longest record. So a batch holds records of similar length drawn from the
whole epoch, and only batches straddling a bucket boundary (at most one per boundary) pad more
than the bucket rounding. `window` > 0 limits the sort to windows of that many batches instead
(more mixing of lengths inside an epoch, more padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fitv2_jax.utils.errors import UserError


def choose_buckets(
    tokens: np.ndarray, weights: np.ndarray | None, num_buckets: int, multiple: int = 1
) -> tuple[int, ...]:
    """Bucket lengths minimising the expected per-record padding (exact DP).

    tokens: (M,) token counts, weights: (M,) how often each occurs. Lengths are rounded up to
    `multiple`; the largest bucket always covers the longest record.
    """
    tokens = np.asarray(tokens)
    weights = np.ones(len(tokens)) if weights is None else np.asarray(weights, np.float64)
    keep = (tokens > 0) & (weights > 0)
    t = -(-tokens[keep] // multiple) * multiple
    vals, inv = np.unique(t, return_inverse=True)
    w = np.bincount(inv, weights=weights[keep], minlength=len(vals))
    u = len(vals)
    k = min(num_buckets, u)
    # cost[i, j]: padding of records with values vals[i..j] all padded to vals[j]
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cwt = np.concatenate([[0.0], np.cumsum(w * vals)])
    i_idx, j_idx = np.triu_indices(u)
    cost = np.full((u, u), np.inf)
    cost[i_idx, j_idx] = vals[j_idx] * (cw[j_idx + 1] - cw[i_idx]) - (cwt[j_idx + 1] - cwt[i_idx])
    # best[b, j]: min padding covering vals[0..j] with b+1 buckets, the last one at vals[j]
    best = np.full((k, u), np.inf)
    arg = np.zeros((k, u), np.int64)
    best[0] = cost[0]
    for b in range(1, k):
        # previous bucket ends at i-1 (i >= 1), this one covers i..j
        cand = best[b - 1][:-1, None] + cost[1:, :]  # (i-1, j)
        arg[b] = np.argmin(cand, axis=0) + 1
        best[b] = cand[arg[b] - 1, np.arange(u)]
    b = int(np.argmin(best[:, u - 1]))
    out, j = [], u - 1
    while True:
        out.append(int(vals[j]))
        if b == 0:
            break
        j = arg[b, j] - 1
        b -= 1
    return tuple(sorted(out))


def variant_weights(tokens: np.ndarray, mode: str) -> np.ndarray:
    """(N, V) token counts (0 = variant absent) -> (N, V) probability of each variant."""
    present = tokens > 0
    if mode == "random":
        return present / present.sum(1, keepdims=True)
    col = {"resize": 0, "crop": 1}[mode]
    w = np.zeros(tokens.shape)
    has = present[:, col] if col < tokens.shape[1] else np.zeros(len(tokens), bool)
    w[has, col] = 1.0
    w[~has, 0] = 1.0  # no crop variant: fall back to the resize one
    return w


class BatchPlan:
    """Global schedule: batch index b -> (record ids, variant ids, flips, length L).

    tokens: (N, V) int token counts per record and variant; global_batch: records per step
    (all hosts); buckets: sorted static lengths; window: batches per sorting window (0 = the
    whole epoch).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        global_batch: int,
        buckets: Sequence[int],
        window: int,
        seed: int,
        variant: str = "random",
        flip: bool = True,
    ):
        self.tokens = np.asarray(tokens, np.int32)
        self.global_batch, self.window, self.seed = global_batch, window, seed
        self.buckets = np.asarray(sorted(buckets), np.int64)
        self.probs = variant_weights(self.tokens, variant)
        self.flip = flip
        self.batches_per_epoch = len(self.tokens) // global_batch
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset has {len(self.tokens)} records, fewer than one global batch "
                f"({global_batch}): lower config.data.global_batch_size."
            )
        longest = int((self.tokens * (self.probs > 0)).max())
        if longest > self.buckets[-1]:
            raise UserError(
                f"records have up to {longest} tokens but the largest bucket is "
                f"{int(self.buckets[-1])}: raise config.data.buckets / max_tokens."
            )
        self._cache: dict[int, tuple] = {}  # two epochs: reader threads straddle a boundary

    def _epoch(self, e: int):
        if e in self._cache:
            return self._cache[e]
        rng = np.random.default_rng([self.seed, e])
        n, B = len(self.tokens), self.global_batch
        K = self.window or self.batches_per_epoch
        perm = rng.permutation(n)[: self.batches_per_epoch * B]
        cum = np.cumsum(self.probs[perm], axis=1)
        var = (rng.random(len(perm))[:, None] > cum).sum(1)  # inverse-CDF variant choice
        var = np.minimum(var, self.tokens.shape[1] - 1)
        flips = rng.integers(0, 2, len(perm)) if self.flip else np.zeros(len(perm), np.int64)
        tok = self.tokens[perm, var]
        order = np.empty_like(perm)
        for w0 in range(0, len(perm), K * B):
            sl = slice(w0, min(w0 + K * B, len(perm)))
            srt = np.argsort(tok[sl], kind="stable") + w0
            order[sl] = srt
        batch_order = rng.permutation(self.batches_per_epoch)  # steps don't rise in length
        order = order.reshape(-1, B)[batch_order].reshape(-1)
        perm, var, flips, tok = perm[order], var[order], flips[order], tok[order]
        longest = tok.reshape(-1, B).max(1)
        lengths = self.buckets[np.searchsorted(self.buckets, longest)]
        plan = (perm, var, flips, lengths)
        self._cache = {k: v for k, v in self._cache.items() if k == e - 1} | {e: plan}
        return plan

    def __call__(self, b: int):
        """-> ids (B,), variant ids (B,), flips (B,), L: batch b's records, longest-first free."""
        e, j = divmod(int(b), self.batches_per_epoch)
        perm, var, flips, lengths = self._epoch(e)
        sl = slice(j * self.global_batch, (j + 1) * self.global_batch)
        return perm[sl], var[sl], flips[sl], int(lengths[j])

    def efficiency(self, epochs: int = 1) -> float:
        """Valid tokens / padded tokens over whole epochs of this schedule."""
        valid = padded = 0
        for e in range(epochs):
            perm, var, _, lengths = self._epoch(e)
            valid += int(self.tokens[perm, var].sum())
            padded += int(lengths.sum()) * self.global_batch
        return valid / padded
