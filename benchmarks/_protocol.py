"""The adaptation benchmark (docs/benchmarks.md, "Adaptation"): one function, used by
``benchmarks/adaptation.py``.

Protocol
--------
* Source model: the shipped model (or a checkpoint), trained on mono-modal pairs only.
* Adaptation data (unlabelled): T1 fixed vs ``moving_contrast`` moving pairs made from
  the *training* slice range; their ground truth is never read.
* Test data: ``n_test`` seeded T1 vs ``moving_contrast`` pairs from the held-out test
  slice range, the same for every row.
* Rows: identity, source-only, the product's default adaptation (self-training on the
  refined fields, :class:`AdaptConfig` as shipped; one run per seed), MCD with each
  discrepancy (the paper's method, :meth:`AdaptConfig.mcd`; one run per seed), a
  target-supervised oracle (the source model fine-tuned with the target labels for
  the same number of iterations), and classical peers (elastix, SimpleITK). With
  ``refine``: the instance-optimisation refinement alone (from a zero field), and
  after the source-only and the ``refine_rows`` MCD models ("... + refine").
* Mean +- std over seeds of the per-seed mean over test pairs; rows that do not depend
  on the seed are run once and have std 0 across seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _peers as peers_mod
import numpy as np
import torch

from napari_discreg.core.config import AdaptConfig, DataConfig, RefineConfig, TrainConfig
from napari_discreg.core.data import template as data_mod
from napari_discreg.core.files.atomic import replace_atomically
from napari_discreg.core.files.checkpoint import load_model
from napari_discreg.core.learning.adapt import adapt_steps
from napari_discreg.core.learning.discrepancy import DISPLAY_NAMES
from napari_discreg.core.learning.evaluate import (
    METRICS,
    evaluate_model,
    identity_metrics,
    pair_metrics,
    summarise,
)
from napari_discreg.core.learning.model import DiscreteRegistrationNet, clone_model
from napari_discreg.core.learning.train import StepRecord, train_steps

ROW_NAMES = {kind.value: name for kind, name in DISPLAY_NAMES.items()}
SELF_TRAINING_ROW = "self-training (the default)"


@dataclass
class BenchmarkSettings:
    """What one benchmark run does; :meth:`quick` is the CI-sized variant."""

    n_test: int = 100
    n_adapt: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = AdaptConfig.mcd().steps  # the discrepancies are compared by MCD
    discrepancies: tuple[str, ...] = ("l1", "swd", "pemd")
    moving_contrast: str = "t2"
    peers: tuple[str, ...] = ("elastix", "simpleitk")
    peer_options: dict = field(default_factory=dict)
    oracle: bool = True
    refine: RefineConfig | None = field(default_factory=RefineConfig)
    refine_rows: tuple[str, ...] = ("pemd",)
    model_path: str | None = None
    adapt: AdaptConfig = field(default_factory=AdaptConfig.mcd)
    #: the product's default adaptation, a row of its own (None: no such row)
    self_training: AdaptConfig | None = field(default_factory=AdaptConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def quick(cls) -> BenchmarkSettings:
        return cls(
            n_test=3,
            n_adapt=4,
            seeds=(0,),
            steps=2,
            peer_options={"elastix": {"iterations": 20}, "simpleitk": {"iterations": 10}},
            adapt=AdaptConfig.mcd(batch_size=2, select_every=1),
            self_training=AdaptConfig(steps=2, select_every=1),
            refine=RefineConfig(steps=2),
        )


def adaptation_pairs(
    template, config: DataConfig, *, n: int, moving_contrast: str, seed: int = 999
):
    """Unlabelled target pairs from the training slice range (fixed T1)."""
    lo, hi = config.train_slices
    indices = np.linspace(lo, hi - 1, n).round().astype(int)
    pairs = [
        data_mod.make_pair(
            template, int(i), "t1", moving_contrast, np.random.default_rng([seed, k]), config
        )
        for k, i in enumerate(indices)
    ]
    return np.stack([p.fixed for p in pairs]), np.stack([p.moving for p in pairs])


def _oracle_batches(
    template, config: DataConfig, moving_contrast: str, batch_size: int, seed: int
) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    while True:
        yield data_mod.sample_batch(
            template, "train", batch_size, rng, config, pairs=(("t1", moving_contrast),)
        )


def run_benchmark(
    settings: BenchmarkSettings,
    *,
    progress: Callable[[str], None] | None = None,
    on_record: Callable[[str, int, StepRecord], None] | None = None,
) -> dict:
    """Run every row and return ``{"settings": ..., "rows": {name: {metric: [per-seed means]}}, "curves": ...}``."""
    say = progress or (lambda msg: None)
    cfg = settings.data
    template = data_mod.load_template(cfg.size)
    test = data_mod.fixed_test_pairs(
        template,
        cfg,
        n=settings.n_test,
        fixed_contrast="t1",
        moving_contrast=settings.moving_contrast,
        seed=123,
    )
    adapt_fixed, adapt_moving = adaptation_pairs(
        template, cfg, n=settings.n_adapt, moving_contrast=settings.moving_contrast
    )
    base = load_model(settings.model_path, device="cpu")
    mc = base.config
    rows: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, list[dict]] = {}

    def add(name: str, per_pair: dict[str, list[float]]):
        row = rows.setdefault(name, {m: [] for m in METRICS})
        for key, value in summarise(per_pair).items():
            row[key].append(value)

    say("identity")
    add("identity", identity_metrics(test, mc.stride, mc.num_labels, mc.capture_range))
    say("source-only")
    add("source-only", evaluate_model(base, test))
    if settings.refine is not None:
        say("refinement")
        add(
            "refine only (from zero)",
            evaluate_model(
                None,
                test,
                refine=settings.refine,
                stride=mc.stride,
                k=mc.num_labels,
                q=mc.capture_range,
            ),
        )
        add("source-only + refine", evaluate_model(base, test, refine=settings.refine))

    runs: list[tuple[str, str, AdaptConfig, int | None]] = []
    if settings.self_training is not None:
        runs.append((SELF_TRAINING_ROW, "pemd", settings.self_training, None))
    runs += [
        (f"MCD-{ROW_NAMES.get(kind, kind)}", kind, settings.adapt, settings.steps)
        for kind in settings.discrepancies
    ]
    for seed in settings.seeds:
        for name, kind, adapt_config, steps in runs:
            say(f"{name} seed {seed}")
            model = load_model(settings.model_path, device="cpu")
            t0 = time.perf_counter()
            curve = []
            for rec in adapt_steps(
                model,
                adapt_fixed,
                adapt_moving,
                discrepancy=kind,
                steps=steps,
                seed=seed,
                config=adapt_config,
                data_config=cfg,
                device="cpu",
            ):
                curve.append(
                    {
                        "iteration": rec.iteration,
                        "criterion": rec.criterion,
                        "discrepancy": rec.discrepancy,
                        **rec.losses,
                    }
                )
                if on_record is not None:
                    on_record(name, seed, rec)
            seconds = time.perf_counter() - t0
            curves[f"{name} seed {seed}"] = curve
            per_pair = evaluate_model(model, test)
            add(name, per_pair)
            rows[name].setdefault("adapt_seconds", []).append(seconds)
            rows[name].setdefault("best_iteration", []).append(float(rec.best_iteration or 0))
            if (
                settings.refine is not None
                and name != SELF_TRAINING_ROW
                and kind in settings.refine_rows
            ):
                add(f"{name} + refine", evaluate_model(model, test, refine=settings.refine))
        if settings.oracle:
            say(f"oracle seed {seed}")
            model = load_model(settings.model_path, device="cpu")
            tcfg = TrainConfig(
                steps=max(settings.steps, 1),
                batch_size=settings.adapt.batch_size,
                lr=settings.adapt.lr,
                seed=seed,
            )
            batches = _oracle_batches(
                template, cfg, settings.moving_contrast, tcfg.batch_size, seed
            )
            for _ in train_steps(
                model, config=tcfg, data_config=cfg, batches=batches, device="cpu"
            ):
                pass
            add("oracle (target-supervised)", evaluate_model(model, test))

    for peer in settings.peers:
        say(peer)

        fn = peers_mod.PEERS[peer]
        per_pair = {m: [] for m in METRICS}
        for pair in test:
            t0 = time.perf_counter()
            disp = fn(pair.fixed, pair.moving, **settings.peer_options.get(peer, {}))
            seconds = time.perf_counter() - t0
            vals = pair_metrics(pair, disp, None, mc.stride, mc.num_labels, mc.capture_range)
            vals["seconds"] = seconds
            for key in METRICS:
                per_pair[key].append(vals.get(key, float("nan")))
        add(peer, per_pair)

    return {
        "settings": {
            "n_test": settings.n_test,
            "n_adapt": settings.n_adapt,
            "seeds": list(settings.seeds),
            "steps": settings.steps,
            "moving_contrast": settings.moving_contrast,
            "adapt_config": settings.adapt.to_dict(),
            "self_training_config": (
                settings.self_training.to_dict() if settings.self_training else None
            ),
            "refine_config": settings.refine.to_dict() if settings.refine else None,
            "data_config": cfg.to_dict(),
            "model_config": mc.to_dict(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
        "curves": curves,
    }


def format_table(result: dict) -> str:
    """Markdown table of ``result["rows"]``: mean +- std over seeds."""
    cols = [
        ("label_accuracy", "label acc. (%)", 100.0),
        ("epe", "EPE (px)", 1.0),
        ("dice_gm", "Dice GM", 1.0),
        ("dice_wm", "Dice WM", 1.0),
        ("dice_csf", "Dice CSF", 1.0),
        ("folding", "folding (%)", 100.0),
        ("seconds", "s / pair", 1.0),
    ]
    lines = [
        "| row | runs | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name, row in result["rows"].items():
        cells = []
        for key, _, scale in cols:
            vals = np.asarray(row.get(key, []), dtype=float) * scale
            if vals.size == 0 or np.all(np.isnan(vals)):
                cells.append("n/a")
            else:
                digits = (
                    3 if key == "seconds" else 2 if key.startswith("dice") or key == "epe" else 1
                )
                cells.append(f"{np.nanmean(vals):.{digits}f} ± {np.nanstd(vals):.{digits}f}")
        n = len(row.get("epe", []))
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BENCHMARKS_HEADER = (
    "# Benchmarks\n\nEvery number on this page is written by a script in `benchmarks/`; "
    "rerun it to check.\n"
)


def update_section(path, name: str, text: str, *, header: str = BENCHMARKS_HEADER) -> None:
    """Replace (or append) the section ``name`` of a Markdown file, delimited by
    ``<!-- name:start -->`` / ``<!-- name:end -->`` markers, so that several scripts
    can each own one part of a page (``header`` starts a page that does not exist yet)."""

    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else header
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.write_text(new)

    replace_atomically(path, write)  # never half a document


def plot_results(result: dict, path) -> None:
    """Bar chart of label accuracy and EPE per row, and the adaptation curves."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, scale, label in (
        (axes[0], "label_accuracy", 100, "label accuracy (%)"),
        (axes[1], "epe", 1, "EPE (px)"),
    ):
        means = [np.nanmean(np.asarray(rows[n].get(key, [np.nan]), float)) * scale for n in names]
        stds = [np.nanstd(np.asarray(rows[n].get(key, [np.nan]), float)) * scale for n in names]
        ax.bar(range(len(names)), np.nan_to_num(means), yerr=np.nan_to_num(stds), color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
    ax = axes[2]
    for name, curve in result["curves"].items():
        pts = [(c["iteration"], c["criterion"]) for c in curve if c.get("criterion") is not None]
        if pts:
            it, crit = zip(*pts, strict=True)
            ax.plot(it, crit, marker=".", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("selection criterion (target pairs)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timed_adaptation(
    model: DiscreteRegistrationNet,
    fixed,
    moving,
    discrepancy: str,
    config: AdaptConfig,
    eval_pairs: list,
    *,
    device: str = "cpu",
) -> dict:
    """One adaptation run of a copy of ``model``, timed as a user would wait for it.

    The wall time runs from the call of :func:`adapt_steps` to its last record
    (selection criterion included). The raw weights at every criterion evaluation
    (every ``config.select_every`` iterations and the last) are kept and evaluated on
    ``eval_pairs`` only afterwards, untimed: the time-to-accuracy curve. ``kept`` is
    the evaluation of the weights the keep-best rule returned.
    """
    work = clone_model(model)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    times: dict[int, float] = {}
    kept_iteration = 0
    t0 = time.perf_counter()
    for rec in adapt_steps(
        work, fixed, moving, discrepancy=discrepancy, config=config, device=device
    ):
        times[rec.iteration] = time.perf_counter() - t0
        if rec.best_iteration is not None:
            kept_iteration = rec.best_iteration
        if rec.criterion is not None:
            snapshots[rec.iteration] = {k: v.detach().clone() for k, v in work.state_dict().items()}
    seconds = time.perf_counter() - t0
    kept = summarise(evaluate_model(work, eval_pairs))  # the generator restored the kept weights
    probe = clone_model(model)
    curve = []
    for it, weights in sorted(snapshots.items()):
        probe.load_state_dict(weights)
        s = summarise(evaluate_model(probe, eval_pairs))
        curve.append(
            {
                "iteration": it,
                "seconds": times[it],
                "accuracy": s["label_accuracy"],
                "epe": s["epe"],
            }
        )
    return {"seconds": seconds, "kept_iteration": kept_iteration, "kept": kept, "curve": curve}
