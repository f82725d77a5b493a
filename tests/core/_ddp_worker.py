"""Worker for tests/core/test_distributed.py, started by ``torch.distributed.run``.

``python -m torch.distributed.run --standalone --nproc-per-node 2 _ddp_worker.py DATA OUT``

Each rank trains a tiny model on its shard of DATA/t1 (DistributedDataParallel via
``ddp_source_loss``), then adapts it to DATA/t1 -> DATA/t2 pairs (gradients averaged
by ``average_gradients``, last weights kept), and writes what it ended with to OUT:
``rank{r}_train.safetensors``, ``rank{r}_adapt.safetensors`` and ``rank{r}.json``
(its losses and which slices its batches held). Ranks start from *different* random
weights on purpose: DDP and ``broadcast_module`` must make them equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from napari_discreg.core.config import AdaptConfig, DataConfig, ModelConfig, TrainConfig
from napari_discreg.core.data.folders import (
    PairBatches,
    PairMaker,
    SliceDataset,
    load_paired,
    make_pairs,
    shard,
)
from napari_discreg.core.learning.adapt import adapt_steps
from napari_discreg.core.learning.distributed import (
    all_reduce_mean,
    average_gradients,
    broadcast_module,
    ddp_source_loss,
    init_distributed,
    shutdown,
)
from napari_discreg.core.learning.model import DiscreteRegistrationNet
from napari_discreg.core.learning.train import train_steps

TINY = ModelConfig(num_labels=5, capture_range=2.0, features=4, head_channels=8)
DATA = DataConfig(size=48, max_displacement=2.0)
TRAIN = TrainConfig(steps=20, batch_size=2, lr=1e-2, seed=0)
ADAPT = AdaptConfig.mcd(steps=3, batch_size=2, lr=1e-3, generator_updates=2, keep_best=False)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def main(data: Path, out: Path) -> None:
    ctx = init_distributed("cpu")
    assert ctx.distributed and ctx.backend == "gloo", ctx
    torch.manual_seed(100 + ctx.rank)  # different weights per rank: DDP must broadcast rank 0's
    model = DiscreteRegistrationNet(TINY)

    source = SliceDataset.from_paths(data / "t1", size=DATA.size, name="source")
    batches = PairBatches(
        PairMaker(source, config=DATA),
        batch_size=TRAIN.batch_size,
        seed=TRAIN.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    losses = []
    records = train_steps(
        model,
        config=TRAIN,
        data_config=DATA,
        batches=batches.iterate(0),
        device=ctx.device,
        loss_fn=ddp_source_loss(model, ctx),
    )
    for record in records:
        losses.append(all_reduce_mean(record.losses, ctx)["loss"])
    save_file(_weights(model), str(out / f"rank{ctx.rank}_train.safetensors"))

    fixed, moving = load_paired(data / "t1", data / "t2", size=DATA.size)
    maker = PairMaker(fixed, moving, pairing="paired", config=DATA)
    pool = make_pairs(
        maker, shard(range(len(fixed)), ctx.rank, ctx.world_size), 4, stream=(0, ctx.rank)
    )
    broadcast_module(model, ctx)
    with average_gradients(model, ctx):
        discrepancies = [
            r.discrepancy
            for r in adapt_steps(
                model,
                pool.fixed,
                pool.moving,
                config=ADAPT,
                data_config=DATA,
                source=batches.iterate(1000),
                device=ctx.device,
                selection_pairs=2,
            )
            if r.iteration > 0
        ]
    save_file(_weights(model), str(out / f"rank{ctx.rank}_adapt.safetensors"))
    report = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "losses": losses,
        "discrepancies": discrepancies,
        "first_items": batches.items(0).tolist(),
        "target_first_fixed_sum": float(pool.fixed[0].sum()),
    }
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    shutdown(ctx)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
