"""What the two heads believe at one control point: the numbers the histogram inspector draws.

:func:`point_summary` takes the two heads' ``K x K`` displacement histograms of one
control point (``RegistrationResult.probabilities[:, i, j]``) and returns their row and
column marginals, the cumulative sums of those (the area between two cumulative sums is
the 1D Earth Mover's distance that the projected EMD averages), the expected
displacement of each head and of their mean
(:func:`~napari_discreg.core.registration.label_grid.expected_displacement`), and the pEMD, L1 and
sliced-Wasserstein discrepancies of that point
(:mod:`napari_discreg.core.learning.discrepancy`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..learning.discrepancy import (
    emd_1d,
    histogram_projections,
    l1,
    projected_emd,
    sliced_wasserstein,
)
from .label_grid import expected_displacement

__all__ = ["HISTOGRAM_KEYS", "point_summary"]

HISTOGRAM_KEYS: tuple[str, ...] = (
    "f1",
    "f2",
    "rows_f1",
    "rows_f2",
    "cols_f1",
    "cols_f2",
    "cdf_rows_f1",
    "cdf_rows_f2",
    "cdf_cols_f1",
    "cdf_cols_f2",
    "offsets",
)
"""Keys of :func:`point_summary` whose values are arrays (the rest are numbers)."""


def point_summary(probabilities, offsets) -> dict:
    """Marginals, cumulative sums, expected displacements and discrepancies of one point.

    Parameters
    ----------
    probabilities : array_like, shape (2, K, K)
        The histograms of heads F1 and F2 at one control point (row displacement on
        axis -2).
    offsets : array_like, shape (K,)
        Displacement in pixels of each bin along one axis.

    Returns
    -------
    dict
        Arrays (:data:`HISTOGRAM_KEYS`, float32): ``"f1"``, ``"f2"`` (K, K);
        ``"rows_f1"``, ``"rows_f2"``, ``"cols_f1"``, ``"cols_f2"`` (K,) marginals;
        ``"cdf_rows_f1"`` ... their cumulative sums; ``"offsets"`` (K,).
        Numbers: ``"pemd"``, ``"l1"``, ``"swd"`` between the heads, ``"emd_rows"``,
        ``"emd_cols"`` (1D EMDs of the marginals, bins; ``pemd`` is their mean);
        ``"expected_f1"``, ``"expected_f2"``, ``"expected"`` (of the mean histogram):
        ``(row, col)`` displacement in pixels.

    Raises
    ------
    ValueError
        If ``probabilities`` is not ``(2, K, K)`` or ``offsets`` not ``(K,)``.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    off = np.asarray(offsets, dtype=np.float32)
    if p.ndim != 3 or p.shape[0] != 2 or p.shape[1] != p.shape[2]:
        raise ValueError(f"probabilities of one control point have shape (2, K, K), got {p.shape}")
    if off.shape != (p.shape[-1],):
        raise ValueError(f"offsets must have shape ({p.shape[-1]},), got {off.shape}")
    p1, p2 = p[0], p[1]
    t1, t2 = torch.from_numpy(p1)[None], torch.from_numpy(p2)[None]
    with torch.no_grad():
        rows1, cols1 = (x[0] for x in histogram_projections(t1))
        rows2, cols2 = (x[0] for x in histogram_projections(t2))
        # F1, F2 and their mean as (3, 1, 1, K, K): expected_displacement -> (3, 2, 1, 1)
        heads = torch.stack([t1[0], t2[0], 0.5 * (t1[0] + t2[0])])[:, None, None]
        expected = expected_displacement(heads, torch.from_numpy(off))[..., 0, 0].tolist()
        summary: dict[str, Any] = {
            "pemd": float(projected_emd(t1, t2)),
            "l1": float(l1(t1, t2)),
            "swd": float(sliced_wasserstein(t1, t2)),
            "emd_rows": float(emd_1d(rows1, rows2)),
            "emd_cols": float(emd_1d(cols1, cols2)),
        }
    r1, c1, r2, c2 = (x.numpy() for x in (rows1, cols1, rows2, cols2))
    summary.update(
        expected_f1=tuple(expected[0]),
        expected_f2=tuple(expected[1]),
        expected=tuple(expected[2]),
        f1=p1,
        f2=p2,
        rows_f1=r1,
        rows_f2=r2,
        cols_f1=c1,
        cols_f2=c2,
        cdf_rows_f1=np.cumsum(r1),
        cdf_rows_f2=np.cumsum(r2),
        cdf_cols_f1=np.cumsum(c1),
        cdf_cols_f2=np.cumsum(c2),
        offsets=off,
    )
    return summary
