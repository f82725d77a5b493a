"""Registration, training and adaptation runs as an application layer, shared by the command line and
the widgets: a spec of plain values in, a generator of progress records out, and a
result (model, metadata record, evaluation, state file) at its end.

::

    run = run_adaptation(AdaptationSpec(targets=DemoTargets(4), model="default"))
    for progress in run:
        print(progress.iteration, progress.best_iteration)
    result = run.result          # or run.close() to stop early and get it

No Qt, napari or argparse here: messages go to the spec's ``log``/``warn`` callables.
"""

from .adaptation import AdaptationProgress, AdaptationResult, run_adaptation
from .adaptation_spec import AdaptationSpec, resolve_adaptation
from .base import Run, load_base_model
from .registration import (
    RegistrationSpec,
    SliceRegistered,
    StackResult,
    register_pair,
    run_registration,
)
from .targets import (
    ArrayTargets,
    DemoTargets,
    FolderTargets,
    PairFiles,
    TargetOptions,
    read_targets,
)
from .training import (
    TrainingProgress,
    TrainingResult,
    TrainingSpec,
    resolve_training,
    run_training,
)

__all__ = [
    "AdaptationProgress",
    "AdaptationResult",
    "AdaptationSpec",
    "ArrayTargets",
    "DemoTargets",
    "FolderTargets",
    "PairFiles",
    "RegistrationSpec",
    "Run",
    "SliceRegistered",
    "StackResult",
    "TargetOptions",
    "TrainingProgress",
    "TrainingResult",
    "TrainingSpec",
    "load_base_model",
    "read_targets",
    "register_pair",
    "resolve_adaptation",
    "resolve_training",
    "run_adaptation",
    "run_registration",
    "run_training",
]
