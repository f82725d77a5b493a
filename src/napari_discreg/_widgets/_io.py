"""File access for the widgets' dialogs: file filters, layer names, images to open as layers.

Reading and writing live in :mod:`napari_discreg.core.files.imagefiles` (the command line uses the same
functions): images with :func:`~napari_discreg.core.files.imagefiles.read_stack`, displacement fields
with :func:`~napari_discreg.core.files.imagefiles.save_field` / :func:`~napari_discreg.core.files.imagefiles.load_field`
(float32 ``.npy`` or TIFF: ``(2, H, W)`` for one slice, ``(N, 2, H, W)`` for every slice
of a stack, slice ``n`` along the registered axis). The file filters below are built
from that module's extension lists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.files.imagefiles import FIELD_EXTENSIONS, IMAGE_EXTENSIONS, read_stack


def _file_filter(description: str, extensions: tuple[str, ...]) -> str:
    """A Qt file-dialog filter, e.g. ``"Images (*.png *.tif)"``."""
    return f"{description} ({' '.join('*' + ext for ext in extensions)})"


IMAGE_FILTER = _file_filter("Images", IMAGE_EXTENSIONS) + ";;All files (*)"
FIELD_FILTER = _file_filter("Displacement field", FIELD_EXTENSIONS)
CHECKPOINT_FILTER = _file_filter("napari-discreg checkpoint", (".safetensors",))


def layer_name_for(path: str | os.PathLike) -> str:
    """The file name without its (possibly double, e.g. ``.nii.gz``) image extension."""
    name = Path(path).name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """A 2D image ``(H, W)`` or a stack ``(N, H, W)`` (float32) from ``path``.

    Colour images become gray; NIfTI volumes are returned with their third voxel axis
    first (one axial slice per index). Raises ``ValueError`` with a clear message.
    """
    stack = read_stack(path)
    return stack[0] if stack.shape[0] == 1 else stack
