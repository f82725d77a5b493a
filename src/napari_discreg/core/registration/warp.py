"""Displacement fields, backward warping and Jacobians: the axis conventions, stated once.

Conventions used everywhere in napari-discreg
---------------------------------------------
* Images are 2D arrays indexed ``(row, col)``; batches are ``(B, 1, H, W)`` tensors.
* A displacement field has shape ``(2, H, W)`` (or ``(B, 2, H, W)``), in **pixels**,
  channel 0 the row and channel 1 the column component.
* Backward warping, as ``skimage.registration.optical_flow_tvl1``::

      warped(r, c) = moving(r + u[0, r, c], c + u[1, r, c])

  with bilinear interpolation and border-replicating padding (``mode="edge"`` in
  scikit-image terms).
* Control points sit at the centres of ``stride x stride`` blocks:
  control point ``(i, j)`` is at pixel ``((i + 0.5) * s - 0.5, (j + 0.5) * s - 0.5)``.
  Bilinear upsampling with ``align_corners=False`` maps such a grid onto pixels
  exactly, so :func:`upsample_field` and :func:`control_point_field` are
  consistent with each other.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pixel_grid(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity sampling positions ``(2, H, W)`` in pixels (row, col)."""
    rows = torch.arange(height, device=device, dtype=dtype)
    cols = torch.arange(width, device=device, dtype=dtype)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([rr, cc])


def pixels_to_grid_sample(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Convert absolute pixel coordinates ``(B, 2, ...)`` (row, col) into the
    ``(B, ..., 2)`` (x, y) normalised layout that ``grid_sample(align_corners=True)`` reads."""
    row = coords[:, 0] * (2.0 / max(height - 1, 1)) - 1.0
    col = coords[:, 1] * (2.0 / max(width - 1, 1)) - 1.0
    return torch.stack([col, row], dim=-1)


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    *,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Backward-warp ``image`` (B, C, H, W) with ``displacement`` (B, 2, H, W) in pixels.

    ``mode`` is ``"bilinear"`` for intensities or ``"nearest"`` for label maps.
    Differentiable with respect to both arguments.
    """
    if image.ndim != 4 or displacement.ndim != 4 or displacement.shape[1] != 2:
        raise ValueError(
            f"warp expects image (B, C, H, W) and displacement (B, 2, H, W), got "
            f"{tuple(image.shape)} and {tuple(displacement.shape)}"
        )
    if image.shape[-2:] != displacement.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape[-2:])} and displacement {tuple(displacement.shape[-2:])} "
            "must have the same spatial size"
        )
    h, w = image.shape[-2:]
    coords = pixel_grid(h, w, device=image.device, dtype=displacement.dtype) + displacement
    grid = pixels_to_grid_sample(coords, h, w).to(image.dtype)
    return F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)


def sample(image: torch.Tensor, positions: torch.Tensor, *, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image`` (B, C, Hm, Wm) at pixel positions ``positions`` (B, 2, H, W)
    (row, col) of that image: the output (B, C, H, W) lives on the positions' grid.

    :func:`warp` for images of another size than the field (a moving image on its own
    grid, a field on the fixed grid). Border-replicating, differentiable.
    """
    hm, wm = image.shape[-2:]
    grid = pixels_to_grid_sample(positions, hm, wm).to(image.dtype)
    return F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)


def affine_positions(matrix, height: int, width: int, *, device=None) -> torch.Tensor:
    """Positions (1, 2, H, W) ``matrix @ (r, c, 1)`` of every pixel of an H x W grid,
    for a (3, 3) or (2, 3) matrix in pixels (row, col)."""
    a = torch.as_tensor(np.asarray(matrix, dtype=np.float64)[:2], device=device)
    grid = pixel_grid(height, width, device=device, dtype=torch.float64).reshape(2, -1)
    out = a[:, :2] @ grid + a[:, 2:3]
    return out.reshape(1, 2, height, width).float()


def warp_numpy(image: np.ndarray, displacement: np.ndarray, *, order: int = 1) -> np.ndarray:
    """NumPy convenience: warp a 2D ``image`` with a ``(2, H, W)`` field.

    ``order=1`` interpolates linearly, ``order=0`` picks the nearest pixel (labels).
    The dtype of integer label images is preserved for ``order=0``.
    """
    img = np.asarray(image)
    disp = np.asarray(displacement, dtype=np.float32)
    if img.ndim != 2 or disp.shape != (2, *img.shape):
        raise ValueError(
            f"warp_numpy expects a 2D image and a (2, H, W) field of the same size, got "
            f"{img.shape} and {disp.shape}"
        )
    t_img = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    t_disp = torch.from_numpy(np.ascontiguousarray(disp))[None]
    out = warp(t_img, t_disp, mode="nearest" if order == 0 else "bilinear")[0, 0].numpy()
    if order == 0 and not np.issubdtype(img.dtype, np.floating):
        return np.rint(out).astype(img.dtype)
    return out


def upsample_field(
    field: torch.Tensor, stride: int, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Dense field (B, 2, H, W) from a control-point field (B, 2, h, w) (bilinear).

    Values are in pixels and need no rescaling. ``size`` defaults to ``(h*s, w*s)``.
    """
    if size is None:
        size = (field.shape[-2] * stride, field.shape[-1] * stride)
    if stride == 1 and tuple(field.shape[-2:]) == tuple(size):
        return field
    # interpolate with a scale factor keeps the control points at the block centres
    up = F.interpolate(field, scale_factor=float(stride), mode="bilinear", align_corners=False)
    return up[..., : size[0], : size[1]]


def control_point_field(field: torch.Tensor, stride: int) -> torch.Tensor:
    """Sample a dense field (B, 2, H, W) at the control points (B, 2, H//s, W//s).

    Block centres lie between pixels for even strides; the block mean equals the
    bilinear value there for fields that are locally linear.
    """
    if stride == 1:
        return field
    return F.avg_pool2d(field, kernel_size=stride, stride=stride)


def jacobian_determinant(displacement: np.ndarray | torch.Tensor) -> np.ndarray:
    """Jacobian determinant of the map ``x -> x + u(x)`` for a (2, H, W) field.

    Central differences inside, one-sided at the border (``numpy.gradient``).
    Values <= 0 mark folding.
    """
    u = (
        displacement.detach().cpu().numpy()
        if isinstance(displacement, torch.Tensor)
        else displacement
    )
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 3 or u.shape[0] != 2:
        raise ValueError(f"expected a (2, H, W) displacement, got {u.shape}")
    du0_dr, du0_dc = np.gradient(u[0])
    du1_dr, du1_dc = np.gradient(u[1])
    return (1.0 + du0_dr) * (1.0 + du1_dc) - du0_dc * du1_dr
