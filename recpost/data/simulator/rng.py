"""Randomness of the simulated world: counter-based hashes, per-purpose generators, categorical draws.

Every random quantity is a function of the seed and of what it is for (a stream, a block of users,
or a hash key such as ``(seed, tag, user, step, j)``), never of what else was drawn before, so any
single history's ``pi_beta`` can be recomputed and results do not depend on how users are batched.
"""

from __future__ import annotations

import torch

_MERSENNE = 2_147_483_647  # 2^31 - 1: residues times 31-bit constants stay below 2^62 (no overflow)
_HASH_MULT = 0x45D9F3B
TAG_SLATE, TAG_POOL = 1, 2  # hash streams
STREAM_WORLD, STREAM_LENGTHS, STREAM_CHOICES, STREAM_NOISE, STREAM_FEEDBACK, STREAM_SHUFFLE = 0, 1, 2, 3, 4, 5


def _mix(h: torch.Tensor) -> torch.Tensor:
    """One avalanche round on 31-bit non-negative int64 values."""
    h = h ^ (h >> 16)
    h = (h * _HASH_MULT) % _MERSENNE
    h = h ^ (h >> 15)
    h = (h * _HASH_MULT) % _MERSENNE
    return h ^ (h >> 16)


def hash_keys(*keys: torch.Tensor | int) -> torch.Tensor:
    """Pseudo-random int64 in ``[0, 2^31)`` from non-negative integer keys (broadcast together).

    Counter-based: the value for ``(seed, tag, user, step, j)`` never depends on which other values
    are computed, which is what lets ``pi_beta`` be recomputed for any single history.
    """
    h = torch.tensor(0x1234567, dtype=torch.int64)
    for k in keys:
        k = torch.as_tensor(k, dtype=torch.int64)
        h = _mix((h * 1_000_003 + k % _MERSENNE) % _MERSENNE)
    return h


def stream_generator(seed: int, stream: int, block: int = 0) -> torch.Generator:
    """An independent random stream per (seed, purpose, block of users)."""
    key = int(hash_keys(seed, stream, block)) * _MERSENNE + int(hash_keys(block, stream, seed))
    return torch.Generator().manual_seed(key)


def take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` along dim 0 for an index of any shape (``index_select``: on CPU plain advanced
    indexing of small rows can be ~100x slower when several threads are busy)."""
    out = table.index_select(0, index.reshape(-1))
    return out.view(*index.shape, *table.shape[1:])


def sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from ``softmax(logits)`` ``[n, K] -> [n]`` by inverse CDF (one uniform per row).

    2-3x faster on CPU than Gumbel-max, which needs K random numbers per row. Entries at ``-inf``
    have probability 0 and are never drawn: the CDF is flat there and ``u`` stays below its total.
    """
    dtype = torch.float64 if logits.shape[1] > 4096 else torch.float32  # long CDFs accumulate in fp64
    cdf = torch.softmax(logits, dim=1, dtype=dtype).cumsum_(1)  # [n, K]
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding never reaches the end
    return torch.searchsorted(cdf, u, right=True).squeeze(1)
