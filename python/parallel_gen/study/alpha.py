"""Krippendorff's alpha (nominal, ordinal, interval) from coincidence matrices.

Our own implementation (the ``krippendorff`` package is GPL-3.0, statsmodels' is not
released yet); tests/test_agreement.py holds it equal to ``krippendorff.alpha`` on fixed
and random data. Written over coincidence matrices so that a bootstrap replicate (items
drawn with replacement) is one weighted sum of per-item matrices, not a Python loop.

Reference: K. Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import ParamError

LEVELS = ("nominal", "ordinal", "interval")


def item_coincidences(codes: np.ndarray, n_values: int) -> np.ndarray:
    """Each item's coincidence matrix, items x values x values.

    ``codes`` is coders x items of value indices, -1 where missing. An item with m >= 2
    values adds count_c * count_k (less the pairing of a value with itself on the
    diagonal) / (m - 1); an item with fewer values is not pairable and adds nothing.
    """
    n_items = codes.shape[1]
    counts = np.zeros((n_items, n_values), dtype=np.float64)
    for row in codes:
        seen = row >= 0
        np.add.at(counts, (np.nonzero(seen)[0], row[seen]), 1.0)
    m = counts.sum(axis=1)
    pairable = m >= 2
    out = np.einsum("ic,ik->ick", counts, counts)
    out[:, np.arange(n_values), np.arange(n_values)] -= counts
    out[pairable] /= (m[pairable] - 1)[:, None, None]
    out[~pairable] = 0.0
    return out


def distances(level: str, marginals: np.ndarray, values: Optional[np.ndarray] = None) -> np.ndarray:
    """The squared distance matrices delta^2 (... x values x values) of ``level`` for
    coincidence marginals ``marginals`` (... x values); ``values``: the interval level's
    numeric values of the labels."""
    k = marginals.shape[-1]
    if level == "nominal":
        d = 1.0 - np.eye(k)
        return np.broadcast_to(d, marginals.shape[:-1] + (k, k))
    if level == "interval":
        v = np.arange(k, dtype=np.float64) if values is None else np.asarray(values, dtype=np.float64)
        d = (v[:, None] - v[None, :]) ** 2
        return np.broadcast_to(d, marginals.shape[:-1] + (k, k))
    if level == "ordinal":
        # delta_ck = (sum of n_g for g from c to k) - (n_c + n_k) / 2, squared.
        cum = np.cumsum(marginals, axis=-1)
        lo = np.minimum.outer(np.arange(k), np.arange(k))
        hi = np.maximum.outer(np.arange(k), np.arange(k))
        before = np.where(lo > 0, np.take(cum, np.maximum(lo - 1, 0), axis=-1), 0.0)
        between = np.take(cum, hi, axis=-1) - before
        d = between - (marginals[..., :, None] + marginals[..., None, :]) / 2.0
        return d ** 2
    raise ParamError(f"level={level!r}: must be one of {', '.join(map(repr, LEVELS))}", "level")


def alpha_from_coincidences(o: np.ndarray, level: str, values: Optional[np.ndarray] = None) -> np.ndarray:
    """Alpha of coincidence matrices ``o`` (... x values x values): 1 - D_o / D_e, NaN
    where it is undefined (no pairable values, or one value only: D_e = 0)."""
    n_c = o.sum(axis=-1)
    n = n_c.sum(axis=-1)
    d = distances(level, n_c, values)
    observed = (o * d).sum(axis=(-2, -1))
    expected = (n_c[..., :, None] * n_c[..., None, :] * d).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected > 0, 1.0 - (n - 1.0) * observed / expected, np.nan)


def krippendorff_alpha(codes: Sequence[Sequence[Optional[int]]], n_values: int, level: str = "nominal",
                       values: Optional[Sequence[float]] = None) -> float:
    """Krippendorff's alpha of ``codes`` (coders x items of value indices 0..n_values-1,
    None or -1 where a coder gave no value) at ``level``; NaN when undefined.

    Raises:
        ParamError: fewer than two coders, an unknown level, a value out of range.
    """
    arr = np.array([[-1 if c is None else c for c in row] for row in codes], dtype=np.int64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ParamError(f"Krippendorff's alpha needs two coders or more, got {arr.shape[0] if arr.ndim else 0}",
                         "codings")
    if level not in LEVELS:
        raise ParamError(f"level={level!r}: must be one of {', '.join(map(repr, LEVELS))}", "level")
    if arr.size and (arr.max() >= n_values or arr.min() < -1):
        raise ParamError(f"a value index outside 0..{n_values - 1}", "codings")
    o = item_coincidences(arr, n_values).sum(axis=0)
    return float(alpha_from_coincidences(o, level, None if values is None else np.asarray(values, float)))
