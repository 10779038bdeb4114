"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

Same conventions as torch-fidelity (and, up to the shuffle, the original improved-gan code): logits are
turned into class probabilities with a softmax in float64, the samples are shuffled with a fixed seed and
cut into `splits` equal chunks (chunk i is rows [i*N//splits, (i+1)*N//splits)), p(y) is each chunk's mean
prediction, and the result is the mean and population standard deviation of the per-chunk scores.
For Inception these logits are the 1008-way output without its bias, as torch-fidelity's default
('logits_unbiased') and NVIDIA's StyleGAN metrics use.
"""

from __future__ import annotations

import numpy as np

DEFAULT_SPLITS = 10
DEFAULT_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(
    logits: np.ndarray,
    splits: int = DEFAULT_SPLITS,
    shuffle: bool = True,
    seed: int = DEFAULT_SHUFFLE_SEED,
) -> tuple[float, float]:
    """(mean, std) of the Inception Score of (N, C) logits (or log-probabilities).

    With fewer than `splits` samples the number of splits drops to N, so that no chunk is empty.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"logits must be (N, C) with N > 0, got shape {x.shape}")
    n = x.shape[0]
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    splits = max(1, min(int(splits), n))
    log_p = _log_softmax(x)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        log_marginal = np.log(p_chunk.mean(axis=0, keepdims=True))
        kl = (p_chunk * (log_p_chunk - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
