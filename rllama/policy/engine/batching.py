"""Pure helpers of batched forward passes: attention masks for padded and packed rows, prompts grouped by length."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token-id sequences."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def attention_mask(allowed: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``[B, 1, Q, K]`` mask in the form the attention implementation takes: as it is, or additive
    (``eager``)."""
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def causal_mask(mask2d: torch.Tensor, q_len: int) -> torch.Tensor:
    """``[B, 1, Q, K]`` causal mask of the last ``q_len`` positions over the keys ``mask2d`` ``[B, K]`` marks real.

    A padding query sees itself, so that no row is empty (an empty row would give NaN states).
    """
    K = mask2d.shape[1]
    q = torch.arange(K - q_len, K, device=mask2d.device)[:, None]  # [Q, 1] absolute positions
    k = torch.arange(K, device=mask2d.device)[None, :]
    allowed = (k <= q)[None] & mask2d.bool()[:, None, :]
    allowed = allowed | (k == q)[None]
    return allowed[:, None]


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """``[B, Q, Q]``: which packed token each token of ``seg`` ``[B, Q]`` (its segment's index, ``-1`` for
    padding) may see: the earlier tokens of its own segment, and itself (so a padding row is not empty)."""
    q = torch.arange(seg.shape[1], device=seg.device)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & (q[None, None, :] <= q[None, :, None])
    return same | (q[:, None] == q[None, :])[None]


def length_groups(lengths: Sequence[int], shared: int, overhead: int = 16, max_groups: int = 4) -> list[list[int]]:
    """Prompt indices in groups of similar length, so that left padding wastes little compute.

    Cost model in token positions: a group of ``n`` prompts whose longest has ``u`` tokens after
    the batch's common prefix costs ``n * u``; each group after the first costs the common prefix
    again plus ``overhead``. The grouping of least cost among at most ``max_groups`` contiguous
    groups of the length-sorted prompts is returned (one group when splitting does not pay).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    unique = [lengths[i] - shared for i in range(len(lengths))]
    step = max(1, -(-(max(unique) - min(unique)) // 64))  # at most ~64 distinct lengths: the search is O(m^2)
    key = [-(-u // step) * step for u in unique]  # rounded up: the cost never underestimates a group
    values = sorted(set(key))
    m = len(values)
    if m == 1:
        return [order]
    tally = {v: 0 for v in values}
    for v in key:
        tally[v] += 1
    before = [0]  # before[j]: prompts among the j shortest distinct lengths
    for v in values:
        before.append(before[-1] + tally[v])
    inf = float("inf")
    # best[k][j]: least cost of the prompts with the j shortest distinct lengths, in k groups
    best = [[inf] * (m + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (m + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        extra = 0 if k == 1 else shared + overhead
        for j in range(1, m + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (before[j] - before[i]) * values[j - 1] + extra
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_groups + 1), key=lambda k: best[k][m])
    bounds, j = [], m
    while k:
        i = cut[k][j]
        bounds.append((values[i], values[j - 1]))
        j, k = i, k - 1
    return [[i for i in order if lo <= key[i] <= hi] for lo, hi in reversed(bounds)]

