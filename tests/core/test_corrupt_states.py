"""Corrupt adaptation states (issue 26, items 8 and 16): every damaged value is refused as
"the adaptation state is corrupt", one line, by the Python API (``ValueError``) and by
``napari-discreg adapt --resume`` (exit 2), never a traceback or a run on bad values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import napari_discreg as nd
from napari_discreg.cli import main
from napari_discreg.core.config import AdaptConfig, DataConfig, ModelConfig
from napari_discreg.core.data import template as data
from napari_discreg.core.files.checkpoint import OPTIMIZER_PREFIX
from napari_discreg.core.files.resume import load_adaptation_state, save_adaptation_state
from napari_discreg.core.learning.adapt import AdaptState
from napari_discreg.core.learning.model import DiscreteRegistrationNet

TINY = ModelConfig(  # as tests/core/conftest.py's tiny_model
    num_labels=5, capture_range=2.0, stride=4, features=4, head_channels=8, head_bottleneck=0
)
SIZE = 32
DATA = DataConfig(size=SIZE)
MCD = AdaptConfig.mcd(batch_size=2, select_every=2, generator_updates=1)
CORRUPT = "the adaptation state is corrupt"
#: NaN in any tensor: refused by read_checkpoint already, in one line of its own
REFUSED = f"{CORRUPT}|hold NaN or infinite values"


def rewrite(src: Path, dst: Path, *, meta=None, tensors=None) -> Path:
    """A copy of the state ``src`` with its JSON metadata (``meta(training_state, extra)``)
    and/or its tensors (``tensors(dict)``) edited in place."""
    with safe_open(str(src), framework="pt") as fh:
        metadata = dict(fh.metadata())
        values = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
    training, extra = json.loads(metadata["training_state"]), json.loads(metadata["extra"])
    if meta is not None:
        meta(training, extra)
    if tensors is not None:
        tensors(values)
    metadata["training_state"], metadata["extra"] = json.dumps(training), json.dumps(extra)
    save_file(values, str(dst), metadata=metadata)
    return dst


def _set(where: str, key: str, value):
    """An edit setting ``extra[where][key]`` (``where`` "training": the training state)."""

    def edit(training, extra):
        (training if where == "training" else extra[where])[key] = value

    return edit


def _group(key: str, value):
    def edit(training, extra):
        training["optimizers"]["generator"]["param_groups"][0][key] = value

    return edit


def _tensor(name: str, change):
    def edit(values):
        values[name] = change(values[name])

    return edit


ADAM = OPTIMIZER_PREFIX + "generator/0/"

#: (case, metadata edit, tensors edit): each one a state the loader must refuse
CASES = [
    ("best_score NaN", _set("adaptation_state", "best_score", float("nan")), None),
    ("best_score Infinity", _set("adaptation_state", "best_score", float("inf")), None),
    ("best_score a string", _set("adaptation_state", "best_score", "high"), None),
    ("best_iteration 1e30", _set("adaptation_state", "best_iteration", 1e30), None),
    ("best_iteration after step", _set("adaptation_state", "best_iteration", 3), None),
    ("best_iteration -1", _set("adaptation_state", "best_iteration", -1), None),
    ("step Infinity", _set("adaptation_state", "step", float("inf")), None),
    ("step 2.5", _set("adaptation_state", "step", 2.5), None),
    ("step true", _set("adaptation_state", "step", True), None),
    ("training step Infinity", _set("training", "step", float("inf")), None),
    ("step counters differ (adaptation 1, training 2)", _set("adaptation_state", "step", 1), None),
    ("pseudo_gain NaN", _set("adaptation_state", "pseudo_gain", float("nan")), None),
    ('"adaptation": []', lambda t, e: e.update(adaptation=[]), None),
    (
        '"adaptation_state" lacks best_score',
        lambda t, e: e["adaptation_state"].pop("best_score"),
        None,
    ),
    ("rng_state {}", _set("adaptation_state", "rng_state", {}), None),
    (
        "rng_state of another bit generator",
        _set("adaptation_state", "rng_state", {"bit_generator": "MT19937"}),
        None,
    ),
    ("rng_state 'abc'", _set("adaptation_state", "rng_state", "abc"), None),
    ("torch_rng of 5 bytes", None, _tensor("__state__/torch_rng", lambda t: t[:5])),
    ("torch_rng as float", None, _tensor("__state__/torch_rng", lambda t: t.float())),
    ("torch_rng missing, rng_state kept", None, lambda v: v.pop("__state__/torch_rng")),
    ("negative Adam step", None, _tensor(ADAM + "step", lambda t: -t)),
    ("Adam step NaN", None, _tensor(ADAM + "step", lambda t: t * float("nan"))),
    ("Adam exp_avg of the wrong shape", None, _tensor(ADAM + "exp_avg", lambda t: t.flatten()[:3])),
    ("Adam exp_avg_sq negative", None, _tensor(ADAM + "exp_avg_sq", lambda t: t - 1)),
    ("Adam exp_avg NaN", None, _tensor(ADAM + "exp_avg", lambda t: t * float("nan"))),
    ("betas [2, 3]", _group("betas", [2, 3]), None),
    ("betas [0.9]", _group("betas", [0.9]), None),
    ("betas 'abc'", _group("betas", "abc"), None),
    ('lr "abc"', _group("lr", "abc"), None),
    ("lr -1", _group("lr", -1.0), None),
    ("eps NaN", _group("eps", float("nan")), None),
    ("optimiser layout a list", lambda t, e: t["optimizers"].update(generator=[]), None),
    (
        "best weights NaN",
        None,
        _tensor("__state__/best/G.full.0.weight", lambda t: t * float("nan")),
    ),
    (
        "best weight of the wrong shape",
        None,
        _tensor("__state__/best/G.full.0.weight", lambda t: t[:1]),
    ),
]


@pytest.fixture(scope="module")
def target():
    template = data.load_template(SIZE)
    pairs = data.fixed_test_pairs(
        template, DATA, n=3, fixed_contrast="t1", moving_contrast="t2", seed=0
    )
    return np.stack([p.fixed for p in pairs]), np.stack([p.moving for p in pairs])


def _tiny() -> DiscreteRegistrationNet:
    torch.manual_seed(0)
    return DiscreteRegistrationNet(TINY).eval()


@pytest.fixture(scope="module")
def good_state(tmp_path_factory, target) -> Path:
    """An MCD state after 2 of 4 iterations (Adam moments, random streams, best weights)."""
    model, state = _tiny(), AdaptState()
    steps = nd.adapt_steps(
        model, *target, steps=4, config=MCD, data_config=DATA, device="cpu", state=state
    )
    for record in steps:
        if record.iteration == 2:
            break
    steps.close()
    path = tmp_path_factory.mktemp("state") / "good.state.safetensors"
    return save_adaptation_state(path, model, state, {}, running=False)


def test_the_good_state_loads_and_resumes(good_state, target):
    model, state, _ = load_adaptation_state(good_state, MCD.lr, device="cpu")
    assert state.step == 2
    records = list(
        nd.adapt_steps(
            model, *target, steps=4, config=MCD, data_config=DATA, device="cpu", state=state
        )
    )
    assert [r.iteration for r in records] == [2, 3, 4]


@pytest.mark.parametrize(("case", "meta", "tensors"), CASES, ids=[c[0] for c in CASES])
def test_a_corrupt_state_is_refused_in_one_line(tmp_path, good_state, target, case, meta, tensors):
    bad = rewrite(good_state, tmp_path / "bad.state.safetensors", meta=meta, tensors=tensors)
    with pytest.raises(ValueError, match=REFUSED) as info:
        model, state, _ = load_adaptation_state(bad, MCD.lr, device="cpu")
        # what loaded must also run: a resume may not fail later, or run on bad values
        for _ in nd.adapt_steps(
            model, *target, steps=4, config=MCD, data_config=DATA, device="cpu", state=state
        ):
            pass
    assert "\n" not in str(info.value)


# ----------------------------------------------------------- the command line (exit 2)


@pytest.fixture(scope="module")
def cli_state(tmp_path_factory) -> Path:
    """A state ``napari-discreg adapt --checkpoint-every`` wrote: MCD, 2 of 2 iterations."""
    from napari_discreg.core.files.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("cli")
    model = save_checkpoint(_tiny(), folder / "tiny.safetensors")
    argv = ["adapt", "-o", folder / "a.safetensors", "--model", model, "--demo-target", 2]
    argv += ["--size", SIZE, "--method", "mcd", "--batch-size", 2, "--steps", 2]
    assert main([str(a) for a in [*argv, "--checkpoint-every", 1]]) == 0
    return folder / "a.state.safetensors"


#: the cases the command line is tried on (each one of the damage kinds), and damage to
#: the run's recorded settings that only a resume through the runs layer reads
CLI_CASES = [
    c
    for c in CASES
    if c[0]
    in {
        "best_score NaN",
        "best_iteration 1e30",
        "step Infinity",
        "step counters differ (adaptation 1, training 2)",
        '"adaptation": []',
        "rng_state {}",
        "torch_rng of 5 bytes",
        "negative Adam step",
        "Adam exp_avg of the wrong shape",
        "betas [2, 3]",
        'lr "abc"',
    }
] + [
    ('"adaptation_run": []', lambda t, e: e.update(adaptation_run=[]), None),
    ("run setting lr 'abc'", _set("adaptation_run", "lr", "abc"), None),
    ("run setting batch_size -3", _set("adaptation_run", "batch_size", -3), None),
    ("run steps 1 (fewer than done)", _set("adaptation_run", "steps", 1), None),
    ("completed_steps 7", _set("adaptation", "completed_steps", 7), None),
]


def _cli_resume(tmp_path, good: Path, meta, tensors, capsys) -> tuple[int, str]:
    bad = rewrite(good, tmp_path / "bad.state.safetensors", meta=meta, tensors=tensors)
    capsys.readouterr()
    code = main(["adapt", "-o", str(tmp_path / "out.safetensors"), "--resume", str(bad)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(("case", "meta", "tensors"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_resume_of_a_corrupt_state_exits_2_in_one_line(
    tmp_path, cli_state, case, meta, tensors, capsys
):
    code, err = _cli_resume(tmp_path, cli_state, meta, tensors, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert CORRUPT in err and err.startswith("napari-discreg: error: ")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_resume_of_the_good_state_still_runs(tmp_path, cli_state, capsys):
    code, err = _cli_resume(tmp_path, cli_state, None, None, capsys)
    assert code == 0, err
