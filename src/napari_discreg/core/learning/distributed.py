"""Data-parallel training on several processes (``torchrun``), and no-ops without it.

Launch any training command with ``torchrun --nproc-per-node N ...``: torchrun
starts N processes and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins
the process group (NCCL with one GPU per process when CUDA is available, gloo on
CPU). Without those variables (a plain ``python``/``napari-discreg`` run, the GUI,
the tests) it returns a single-process :class:`DistContext` and every helper here
does nothing, so the training functions of :mod:`.train` run unchanged.

Two ways of keeping the replicas identical:

* :func:`ddp_source_loss` wraps the source cross-entropy in
  :class:`torch.nn.parallel.DistributedDataParallel`: one forward and one backward
  per step, gradients averaged in buckets while the backward runs. This is what
  :func:`~napari_discreg.core.learning.train.train_steps` uses (``loss_fn=``).
* :func:`average_gradients` averages the gradients of a module's parameters over the
  ranks right before every optimiser step. MCD adaptation
  (:func:`~napari_discreg.core.learning.adapt.adapt_steps`) updates G and the heads in three
  partial steps with frozen parts and several backward passes per iteration, which
  DDP's one-forward-one-backward contract does not cover; averaging at the optimiser
  step gives the same synchronous data-parallel update for any such loop.

Only rank 0 should print, show progress bars and write files (:attr:`DistContext.is_main`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ENV_PREFIX, limit_setting
from .model import resolve_device
from .train import source_cross_entropy

__all__ = [
    "DistContext",
    "DistributedError",
    "collective_failure",
    "collective_timeout",
    "all_reduce_mean",
    "average_gradients",
    "barrier",
    "broadcast_module",
    "ddp_source_loss",
    "init_distributed",
    "launched_by_torchrun",
    "max_weight_difference",
    "shutdown",
]


TIMEOUT_ENV = ENV_PREFIX + "DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
"""How long a collective waits for the other ranks before failing (5 minutes; torch's
own default is 30). Set with ``--dist-timeout`` or ``$NAPARI_DISCREG_DIST_TIMEOUT``."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and its device.

    ``backend`` is ``None`` when no process group was started (a single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process with a process group."""
        return self.backend is not None and self.world_size > 1

    def describe(self) -> str:
        if not self.distributed:
            return f"1 process on {self.device}"
        return f"{self.world_size} processes ({self.backend}), rank 0 on {self.device}"


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    """Whether ``RANK`` and ``WORLD_SIZE`` are set (torchrun, or a cluster launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class DistributedError(RuntimeError):
    """A collective failed: another rank hung, died or did not answer in time."""


def collective_timeout(timeout_s: float | None = None) -> float:
    """The timeout in force: ``timeout_s``, else ``$NAPARI_DISCREG_DIST_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT_S` (seconds)."""
    timeout_s, _ = limit_setting(timeout_s, TIMEOUT_ENV, DEFAULT_TIMEOUT_S, unit="seconds")
    return float(timeout_s)


def collective_failure(exc: BaseException, ctx: DistContext) -> BaseException:
    """``exc`` as a :class:`DistributedError` with a clear message when it is the failure
    of a collective (a timeout, a lost peer) in a distributed run; else ``exc`` itself."""
    if not ctx.distributed or not isinstance(exc, RuntimeError):
        return exc
    text = str(exc)
    dist_error = getattr(dist, "DistError", ())
    markers = ("Timed out", "timed out", "Timeout", "gloo", "NCCL", "Connection closed", "peer")
    if not (isinstance(exc, dist_error) or any(m in text for m in markers)):
        return exc
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return DistributedError(
        f"rank {ctx.rank} of {ctx.world_size}: another process did not answer within the "
        f"collective timeout ({ctx.timeout_s:g} s) or went away; stopping this one too. "
        f"Check the other ranks' logs; --dist-timeout / {TIMEOUT_ENV} set the timeout. "
        f"({first[:300]})"
    )


def init_distributed(
    device=None, *, backend: str | None = None, timeout_s: float | None = None
) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Parameters
    ----------
    device : str or torch.device, optional
        ``None``/``"auto"``: CUDA when available, else CPU. Under torchrun with CUDA,
        each process takes GPU ``LOCAL_RANK`` (one process per GPU).
    backend : str, optional
        Default ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
    timeout_s : float, optional
        How long a collective may wait for the other ranks before failing (default
        :func:`collective_timeout`: ``$NAPARI_DISCREG_DIST_TIMEOUT``, else 300 s); a
        hung or stopped rank then makes the others fail instead of waiting.

    Returns
    -------
    DistContext
        A single-process context when not launched by torchrun (or ``WORLD_SIZE=1``);
        then no process group is created.

    Raises
    ------
    ValueError
        More processes on a node than GPUs, or malformed environment variables.
    """
    timeout_s = collective_timeout(timeout_s)
    if not launched_by_torchrun() or _env_int("WORLD_SIZE") <= 1:
        return DistContext(device=resolve_device(device), timeout_s=timeout_s)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    dev = resolve_device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"local rank {local_rank} has no GPU: this node has {count}; start at most "
                f"{count} processes per node (torchrun --nproc-per-node {count})"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        # binding the GPU (torch >= 2.3) lets NCCL set up eagerly and barriers know it
        binds = "device_id" in inspect.signature(dist.init_process_group).parameters
        if backend == "nccl" and binds:
            dist.init_process_group(backend, timeout=timeout, device_id=dev)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistContext(rank, world, local_rank, dev, backend, timeout_s)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of each value over the ranks; NaN values (e.g. no foreground) are left out."""
    if not ctx.distributed or not values:
        return dict(values)
    keys = sorted(values)
    raw = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    finite = torch.isfinite(raw)
    both = torch.cat([torch.where(finite, raw, torch.zeros_like(raw)), finite.double()])
    dist.all_reduce(both)
    sums, counts = both[: len(keys)], both[len(keys) :]
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    return dict(zip(keys, means.tolist(), strict=True))


def broadcast_module(module: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (in place)."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def max_weight_difference(module: nn.Module, ctx: DistContext) -> float:
    """Largest absolute difference between any rank's weights and rank 0's (0.0 alone).

    A cheap end-of-run check that the replicas stayed in sync.
    """
    if not ctx.distributed:
        return 0.0
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in module.state_dict().values()]).float()
        ref = flat.clone()
        dist.broadcast(ref, 0)
        diff = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


class _SourceLoss(nn.Module):
    """The source cross-entropy as a module, so that DDP can wrap one forward per step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fixed, moving, displacement, mask):

        batch = {"fixed": fixed, "moving": moving, "displacement": displacement, "mask": mask}
        return source_cross_entropy(self.model, batch)  # type: ignore[arg-type]


def ddp_source_loss(
    model: nn.Module, ctx: DistContext
) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    """The ``loss_fn`` for :func:`~napari_discreg.core.learning.train.train_steps`.

    Distributed: the model wrapped in DistributedDataParallel (which broadcasts rank
    0's weights when it is built, and averages gradients during every backward).
    Single process: plain :func:`~napari_discreg.core.learning.train.source_cross_entropy`.
    The model must already be on ``ctx.device``.
    """
    loss = _SourceLoss(model)
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        loss = DistributedDataParallel(loss, device_ids=ids)  # type: ignore[assignment]

    def loss_fn(batch: dict[str, torch.Tensor]):
        return loss(batch["fixed"], batch["moving"], batch["displacement"], batch["mask"])

    loss_fn.module = loss  # type: ignore[attr-defined]  # for tests and introspection
    return loss_fn


@contextmanager
def average_gradients(module: nn.Module, ctx: DistContext) -> Iterator[None]:
    """Inside the block, every optimiser step over ``module``'s parameters first
    averages their gradients over the ranks (one all-reduce per step).

    Every rank must run the same sequence of backward passes and optimiser steps
    (true for the seeded loops of :mod:`.train`); parameters without a gradient are
    skipped on every rank alike. Start from identical weights
    (:func:`broadcast_module`). A no-op for a single process.
    """
    if not ctx.distributed:
        yield
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    owned = {id(p) for p in module.parameters()}

    def hook(optimizer, args, kwargs):
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in owned and p.grad is not None
        ]
        if not grads:
            return None
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= ctx.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return None

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
