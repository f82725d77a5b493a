"""The two-head discrete registration network.

``G`` (:class:`FeatureExtractor`) turns each image into half-resolution features
with instance normalisation (so contrast and intensity scale matter less); the
:func:`correlation_volume` compares fixed features at every control point with
moving features at each of the K x K candidate displacements (cosine similarity);
two classifier heads ``F1``/``F2`` (:class:`ClassifierHead`) turn the cost volume
into K x K logits per control point. The heads have the same architecture and
different random initialisations, which is what maximum classifier discrepancy
needs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..memory import GUARD_FLOOR, MemoryEstimate, check_memory, network_bytes, training_bytes
from ..registration.label_grid import label_offsets
from ..registration.warp import pixels_to_grid_sample

DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Device types napari-discreg runs on."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"mps"`` (any case) as given, when available; anything else is a
    ``ValueError`` that says what to use."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hint = "use 'auto', 'cpu' or 'cuda'"
    if isinstance(device, str):
        device = device.strip().lower()
    elif not isinstance(device, torch.device):
        raise ValueError(f"device must be a name such as 'cpu' or 'cuda', got {device!r}; {hint}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; {hint}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"napari-discreg does not run on device {str(dev)!r}; {hint}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was requested but CUDA is not available; use 'auto' or 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(dev)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' was requested but MPS is not available; use 'auto' or 'cpu'")
    return dev


def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation),
        nn.InstanceNorm2d(cout, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
    )


class FeatureExtractor(nn.Module):
    """Shared feature extractor G: (B, 1, H, W) -> (B, C, H/2, W/2).

    Downsampling is a 2 x 2 average pool, so half-resolution pixel ``j`` sits at
    full-resolution coordinate ``2 j + 0.5`` exactly (used by the cost volume).
    """

    def __init__(self, features: int = 24) -> None:
        super().__init__()
        half = max(features // 2, 4)
        self.full = _block(1, half)
        self.body = nn.Sequential(
            _block(half, features),
            _block(features, features),
            _block(features, features, dilation=2),
            nn.Conv2d(features, features, 1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(F.avg_pool2d(self.full(image), 2))


class ClassifierHead(nn.Module):
    """Classifier head F: cost volume (B, K^2, h, w) -> logits (B, K^2, h, w).

    Convolutions over the control grid let neighbouring control points share
    evidence (a learned regulariser); the raw cost enters the logits through a
    learnable gain, so a freshly initialised head already prefers similar offsets.
    With ``bottleneck > 0`` a 1 x 1 convolution first maps the K^2 costs to that many
    channels: the first 3 x 3 convolution over all K^2 = 225 channels was most of the
    network's FLOPs (``bottleneck=0`` is the original head, kept for old checkpoints).
    """

    def __init__(self, num_classes: int, channels: int = 64, bottleneck: int = 0) -> None:
        super().__init__()
        first: list[nn.Module]
        if bottleneck > 0:
            first = [
                nn.Conv2d(num_classes, bottleneck, 1),
                nn.LeakyReLU(0.1, inplace=True),
                nn.Conv2d(bottleneck, channels, 3, padding=1),
            ]
        else:
            first = [nn.Conv2d(num_classes, channels, 3, padding=1)]
        self.net = nn.Sequential(
            *first,
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(channels, num_classes, 1),
        )
        self.cost_gain = nn.Parameter(torch.ones(()))

    def forward(self, cost: torch.Tensor) -> torch.Tensor:
        return self.cost_gain * cost + self.net(cost)


def control_point_coords(
    h: int, w: int, stride: int, *, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Full-resolution pixel coordinates (2, h, w) of the control points (block centres)."""
    r = (torch.arange(h, device=device, dtype=dtype) + 0.5) * stride - 0.5
    c = (torch.arange(w, device=device, dtype=dtype) + 0.5) * stride - 0.5
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr, cc])


def _sample_features(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample half-resolution features at full-resolution pixel coords.

    features (B, C, H2, W2); coords (B, 2, ...) in full-resolution pixels.
    Returns (B, C, ...).
    """
    b = features.shape[0]
    h2, w2 = features.shape[-2:]
    half = (coords - 0.5) / 2.0  # full-res p -> half-res index j, since p = 2 j + 0.5
    spatial = half.shape[2:]
    grid = pixels_to_grid_sample(half.reshape(b, 2, -1, 1), h2, w2)
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(b, features.shape[1], *spatial)


class _ShiftCorrelation(torch.autograd.Function):
    """Dot products of ``fixed`` (B, C, h, w) with strided shifted views of ``grid``.

    Label ``a*K + b`` reads ``grid[:, :, a*g + s*i, b*g + s*j]`` for control point
    ``(i, j)``. Forward and backward loop over the K^2 shifts and never hold the
    (B, C, K^2, h, w) tensor that a gather would build (4x faster forward and 2.6x
    faster backward than ``grid_sample`` on 2 CPU cores at 192 px).
    """

    @staticmethod
    def forward(ctx, fixed, grid, k: int, g: int, s: int):  # type: ignore[override]
        ctx.save_for_backward(fixed, grid)
        ctx.shape = (k, g, s)
        b, _, h, w = fixed.shape
        out = fixed.new_empty(b, k * k, h, w)
        for a in range(k):
            for c in range(k):
                view = grid[:, :, a * g : a * g + s * h : s, c * g : c * g + s * w : s]
                torch.sum(view * fixed, 1, out=out[:, a * k + c])
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        fixed, grid = ctx.saved_tensors
        k, g, s = ctx.shape
        h, w = fixed.shape[-2:]
        grad_fixed = torch.zeros_like(fixed)
        grad_grid = torch.zeros_like(grid)
        for a in range(k):
            for c in range(k):
                gk = grad[:, a * k + c : a * k + c + 1]
                rows = slice(a * g, a * g + s * h, s)
                cols = slice(c * g, c * g + s * w, s)
                grad_fixed.addcmul_(grid[:, :, rows, cols], gk)
                grad_grid[:, :, rows, cols].addcmul_(fixed, gk)
        return grad_fixed, grad_grid, None, None, None


def integer_shift_spacing(offsets: torch.Tensor, stride: int) -> int | None:
    """The label spacing in whole pixels when the cost volume can be built from integer
    shifts (even stride, offsets ``g * (k - K//2)`` with integer ``g >= 1``), else ``None``."""
    k = offsets.numel()
    if stride % 2 or k < 2:
        return None
    g = float(offsets[1] - offsets[0])
    gi = round(g)
    if gi < 1 or abs(g - gi) > 1e-6:
        return None
    expected = gi * (torch.arange(k, dtype=torch.float64) - k // 2)
    if not torch.allclose(offsets.double().cpu(), expected, atol=1e-6):
        return None
    return gi


def correlation_volume(
    fixed_features: torch.Tensor,
    moving_features: torch.Tensor,
    offsets: torch.Tensor,
    stride: int,
    grid_size: tuple[int, int],
) -> torch.Tensor:
    """Cosine similarity between fixed features at the control points and moving
    features at each candidate displacement: (B, K^2, h, w), label ``a*K + b`` is the
    displacement ``(offsets[a], offsets[b])``.

    Features are sampled bilinearly with border clamping. With an even stride and
    whole-pixel label offsets every sample falls on the grid of half-resolution
    positions ``j / 2`` (control point at full-resolution ``p``, half-resolution
    ``(p - 0.5) / 2``), so the features are upsampled once onto that grid and the
    volume is built from integer shifts (:class:`_ShiftCorrelation`); otherwise from
    ``grid_sample``. Both give the same values (tested).
    """
    b = fixed_features.shape[0]
    h, w = grid_size
    k = offsets.numel()
    # Normalising before sampling keeps the (B, C, K^2, h, w) tensor out of the norm's
    # backward pass (10x faster training on CPU); a bilinear blend of unit vectors is
    # within a few percent of unit length, so this is cosine similarity in practice.
    fixed_features = F.normalize(fixed_features, dim=1, eps=1e-6)
    moving_features = F.normalize(moving_features, dim=1, eps=1e-6)
    g = integer_shift_spacing(offsets, stride)
    if g is not None:
        h2, w2 = fixed_features.shape[-2:]
        size = (2 * h2 - 1, 2 * w2 - 1)  # index u <-> half-resolution position u / 2
        up_f = F.interpolate(fixed_features, size=size, mode="bilinear", align_corners=True)
        up_m = F.interpolate(moving_features, size=size, mode="bilinear", align_corners=True)
        first = stride // 2 - 1  # grid index of control point 0: p - 0.5 = stride/2 - 1
        fixed = up_f[:, :, first::stride, first::stride][:, :, :h, :w].contiguous()
        r = g * (k // 2)
        # replicate padding = grid_sample's border clamping on the feature grid
        padded = F.pad(up_m, (r, r, r, r), mode="replicate")[:, :, first:, first:]
        cost = _ShiftCorrelation.apply(fixed, padded, k, g, stride)
    else:
        cp = control_point_coords(
            h, w, stride, device=fixed_features.device, dtype=fixed_features.dtype
        )
        fixed = _sample_features(fixed_features, cp[None].expand(b, -1, -1, -1))
        dr, dc = torch.meshgrid(offsets, offsets, indexing="ij")
        disp = torch.stack([dr.reshape(-1), dc.reshape(-1)])  # (2, K^2)
        coords = cp[:, None] + disp[:, :, None, None]  # (2, K^2, h, w)
        moving = _sample_features(moving_features, coords[None].expand(b, -1, -1, -1, -1))
        cost = (fixed[:, :, None] * moving).sum(1)
    assert cost.shape == (b, k * k, h, w)
    return cost


class DiscreteRegistrationNet(nn.Module):
    """G + cost volume + heads F1, F2.

    ``forward(fixed, moving)`` takes (B, 1, H, W) tensors with H and W multiples of
    ``config.stride`` and returns the logits of both heads, each (B, h, w, K, K).

    Train and eval mode compute the same function: the network has no batch norm, no
    dropout and its instance norms keep no running statistics (:func:`mode_independent`,
    tested), so inference never needs to switch a model's mode.
    """

    offsets: torch.Tensor  # (K*K, 2) label displacements in px, a non-persistent buffer

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        k2 = self.config.num_labels**2
        self.G = FeatureExtractor(self.config.features)
        bottleneck = self.config.head_bottleneck
        self.F1 = ClassifierHead(k2, self.config.head_channels, bottleneck)
        self.F2 = ClassifierHead(k2, self.config.head_channels, bottleneck)
        # F1 and F2 are built one after the other, so they draw different initial weights
        self.register_buffer(
            "offsets",
            label_offsets(self.config.num_labels, self.config.capture_range),
            persistent=False,
        )

    def cost_volume(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Scaled cost volume (B, K^2, h, w) of G's features."""
        self._check(fixed, moving)
        self._check_memory(fixed)
        s = self.config.stride
        h, w = fixed.shape[-2] // s, fixed.shape[-1] // s
        feats = self.G(torch.cat([fixed, moving], dim=0))
        ff, mf = feats.split(fixed.shape[0], dim=0)
        return self.config.temperature * correlation_volume(ff, mf, self.offsets, s, (h, w))

    def heads(self, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of F1 and F2, each (B, h, w, K, K)."""
        return self._to_hist(self.F1(cost)), self._to_hist(self.F2(cost))

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.cost_volume(fixed, moving))

    def _to_hist(self, logits: torch.Tensor) -> torch.Tensor:
        b, _, h, w = logits.shape
        k = self.config.num_labels
        return logits.permute(0, 2, 3, 1).reshape(b, h, w, k, k)

    def _check_memory(self, fixed: torch.Tensor) -> None:
        """Refuse a pass whose estimated peak (:mod:`.memory`: inference, or a training
        forward and backward when autograd records) exceeds the memory limit."""
        b, _, h, w = (int(n) for n in fixed.shape)
        grad = torch.is_grad_enabled()
        need = (training_bytes if grad else network_bytes)(self.config, (h, w), b)
        if need > GUARD_FLOOR:
            kind = "training pass" if grad else "pass"
            check_memory(
                MemoryEstimate(need, f"a network {kind} over {b} pair(s) of {h} x {w} px"),
                hint="use smaller images or batches, or a model with fewer labels or a larger stride",
                device=fixed.device,
            )

    def _check(self, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        if fixed.shape != moving.shape or fixed.ndim != 4 or fixed.shape[1] != 1:
            raise ValueError(
                f"fixed and moving must both be (B, 1, H, W) tensors of one shape, got "
                f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        s = self.config.stride
        if fixed.shape[-2] % s or fixed.shape[-1] % s:
            raise ValueError(f"H and W must be multiples of the stride {s}; pad the images first")


def mode_independent(model: nn.Module) -> bool:
    """Whether ``model`` computes the same in train and eval mode: no dropout, no batch
    norm, no norm layer that tracks running statistics."""
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)):
            return False
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            return False
    return True


def expected_state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of a model of ``config``, built on
    the ``meta`` device: no memory is allocated for the weights, so a checkpoint's tensors
    can be checked against its config before anything is built."""
    with torch.device("meta"):
        net = DiscreteRegistrationNet(config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the K x K labels of (B, h, w, K, K) logits."""
    shape = logits.shape
    return torch.softmax(logits.flatten(-2), dim=-1).reshape(shape)


def clone_model(model: DiscreteRegistrationNet) -> DiscreteRegistrationNet:
    """An independent copy (weights and config) of ``model``."""
    return copy.deepcopy(model)
