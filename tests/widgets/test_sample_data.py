"""The npe2 sample-data contributions, opened through napari as a user would."""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels

from napari_discreg.core.warp import warp_numpy


def test_multimodal_pair_sample(viewer):
    viewer.open_sample("napari-discreg", "multimodal_pair")
    fixed, moving = viewer.layers["fixed (T1)"], viewer.layers["moving (T2-like)"]
    labels = viewer.layers["fixed tissue labels"]
    assert isinstance(fixed, Image) and isinstance(moving, Image) and isinstance(labels, Labels)
    assert fixed.data.shape == moving.data.shape == labels.data.shape == (192, 192)
    assert set(np.unique(labels.data)) <= {0, 1, 2, 3} and labels.data.max() == 3
    truth = moving.metadata["true_displacement"]
    assert truth.shape == (2, 192, 192)
    # the stored field is the one that aligns moving with fixed: warping the moving
    # tissue labels with it gives the fixed tissue labels (nearest neighbour)
    warped = warp_numpy(viewer.layers["moving tissue labels"].data, truth, order=0)
    assert (warped == labels.data).mean() > 0.98


def test_adaptation_target_set_sample(viewer):
    viewer.open_sample("napari-discreg", "adaptation_target_set")
    fixed, moving = viewer.layers["target fixed (T1)"], viewer.layers["target moving (T2-like)"]
    assert fixed.data.shape == moving.data.shape == (8, 192, 192)
    assert moving.metadata["true_displacement"].shape == (8, 2, 192, 192)
    # eight different slices, all with brain in them
    assert len(set(fixed.metadata["slice_indices"])) == 8
    assert all(fixed.data[i].std() > 0.05 and moving.data[i].std() > 0.05 for i in range(8))
