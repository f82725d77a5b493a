"""Sample data contributions (npe2): synthetic multimodal pairs made from the MNI template,
and one real histology pair with human landmarks.

The synthetic samples are made with :mod:`napari_discreg.core.data.template` from the template
that nilearn ships (no download). The moving layers carry the true displacement in their
metadata (``"true_displacement"``, pixels, row/col, same convention as
:attr:`napari_discreg.RegistrationResult.displacement`), so a registration can be
compared with the truth.

The histology pair (:func:`histology_pair`) ships in ``samples/`` (two RGB JPEGs and their
landmarks, BSD-3-Clause, see ``samples/README.md``): a real pair has no true field, but
its landmarks give the target registration error (the Register widget reports it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.io import imread

SAMPLE_SIZE = 192
"""Side of the sample images in pixels."""
TARGET_PAIRS = 8
"""Number of pairs in the adaptation target set."""
_SEED = 0

#: the shipped histology pair (see samples/README.md)
SAMPLES = Path(__file__).parent / "samples"
HISTOLOGY_FIXED = "Izd2-29-041-w35_HE"
HISTOLOGY_MOVING = "Izd2-29-041-w35_proSPC"
HISTOLOGY_SOURCE = (
    "BIRL repository (github.com/Borda/BIRL, data-images/), CIMA / ANHIR data set, "
    "Borovec et al., IEEE TMI 2020; BSD-3-Clause"
)

_CONVENTION = "warped(r, c) = moving(r + u[0, r, c], c + u[1, r, c]); fixed ~ warped"


def _config():
    from .core.config import DataConfig

    return DataConfig(size=SAMPLE_SIZE)


def _middle_test_slice(config) -> int:
    lo, hi = config.test_slices
    return (lo + hi) // 2


def multimodal_pair():
    """A T1 fixed image, a T2-like moving image and the fixed image's tissue labels.

    ``make_pair`` at 192 x 192 with seed 0 on the middle slice of the held-out test range:
    the fixed T1 is the template warped by a smooth random field, the moving image is the
    same slice in the synthetic T2-like contrast. The moving layer's metadata holds the
    true field; a hidden Labels layer holds the moving image's tissue labels (to try
    *apply the field to a Labels layer* and compare with the fixed labels).
    """
    from .core.data.template import load_template, make_pair

    config = _config()
    template = load_template(config.size)
    index = _middle_test_slice(config)
    pair = make_pair(template, index, "t1", "t2", np.random.default_rng(_SEED), config)
    meta = {"slice_index": index, "size": config.size, "seed": _SEED}
    return [
        (
            pair.fixed,
            {"name": "fixed (T1)", "colormap": "gray", "metadata": {**meta, "contrast": "t1"}},
            "image",
        ),
        (
            pair.moving,
            {
                "name": "moving (T2-like)",
                "colormap": "gray",
                "metadata": {
                    **meta,
                    "contrast": "t2",
                    "true_displacement": pair.displacement,
                    "convention": _CONVENTION,
                },
            },
            "image",
        ),
        (
            pair.fixed_labels,
            {
                "name": "fixed tissue labels",
                "opacity": 0.35,
                "visible": False,
                "metadata": {"labels": {0: "background", 1: "CSF", 2: "GM", 3: "WM"}},
            },
            "labels",
        ),
        (
            pair.moving_labels,
            {
                "name": "moving tissue labels",
                "opacity": 0.35,
                "visible": False,
                "metadata": {"labels": {0: "background", 1: "CSF", 2: "GM", 3: "WM"}},
            },
            "labels",
        ),
    ]


def adaptation_target_set():
    """Eight unlabelled target pairs as two 3D stacks: fixed T1 and moving T2-like.

    ``fixed_test_pairs`` (n = 8, seed 0) from the held-out slice range at 192 x 192. The
    true fields are in the moving layer's metadata for evaluation only; adaptation never
    reads them.
    """
    from .core.data.template import fixed_test_pairs, load_template

    config = _config()
    template = load_template(config.size)
    pairs = fixed_test_pairs(
        template, config, n=TARGET_PAIRS, fixed_contrast="t1", moving_contrast="t2", seed=_SEED
    )
    fixed = np.stack([p.fixed for p in pairs])
    moving = np.stack([p.moving for p in pairs])
    meta = {"slice_indices": [p.index for p in pairs], "size": config.size, "seed": _SEED}
    return [
        (
            fixed,
            {
                "name": "target fixed (T1)",
                "colormap": "gray",
                "metadata": {**meta, "contrast": "t1"},
            },
            "image",
        ),
        (
            moving,
            {
                "name": "target moving (T2-like)",
                "colormap": "gray",
                "metadata": {
                    **meta,
                    "contrast": "t2",
                    "true_displacement": np.stack([p.displacement for p in pairs]),
                    "convention": _CONVENTION,
                },
            },
            "image",
        ),
    ]


def read_landmarks(path) -> tuple[np.ndarray, np.ndarray]:
    """An ImageJ landmark CSV (columns ``,X,Y``: X the column, Y the row) as
    ``(index, points)``: the index column and the points in (row, col) order."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    if table.shape[1] != 3:
        raise ValueError(f"{path}: expected the columns ',X,Y', got {table.shape[1]} columns")
    return table[:, 0].astype(int), table[:, [2, 1]].astype(np.float64)


def histology_pair():
    """A real stain pair: HE (fixed) and proSPC (moving) sections of a mouse lung lesion,
    RGB, of different sizes, with 78 corresponding landmarks as two Points layers.

    The images are the original JPEGs (``samples/``); the landmarks are in (row, col)
    pixel coordinates of their own image, point ``i`` of one layer matching point ``i``
    of the other (their ``landmark`` feature is the files' index column).
    """
    images, landmarks = [], []
    for role, stem, stain, colour in (
        ("fixed", HISTOLOGY_FIXED, "HE", "cyan"),
        ("moving", HISTOLOGY_MOVING, "proSPC", "magenta"),
    ):
        name = f"{role} ({stain})"
        source = {"source": HISTOLOGY_SOURCE, "stain": stain}
        images.append(
            (
                imread(SAMPLES / f"{stem}.jpg"),
                {"name": name, "rgb": True, "metadata": {**source, "file": f"{stem}.jpg"}},
                "image",
            )
        )
        index, points = read_landmarks(SAMPLES / f"{stem}.csv")
        landmarks.append(
            (
                points,
                {
                    "name": f"{name} landmarks",
                    "size": 12,
                    "face_color": colour,
                    "features": {"landmark": index},
                    "metadata": {
                        **source,
                        "file": f"{stem}.csv",
                        "order": "(row, col) pixels of the image; point i matches point i "
                        "of the other landmark layer",
                    },
                },
                "points",
            )
        )
    return images + landmarks
