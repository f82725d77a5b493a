"""The Adaptation widget's forms for its targets and resumable states, and its texts.

:class:`LayerTargetsBox` picks a fixed and a moving Image layer and gives
:class:`~napari_discreg.runs.ArrayTargets`; :class:`FolderTargetsBox` names a
fixed-contrast and a moving-contrast folder (paired subject by subject when their file
counts match, with a held-out evaluation at the end) and gives
:class:`~napari_discreg.runs.FolderTargets`; :class:`StateBox` holds "save a resumable
state every N iterations", the state file and the *Resume…* button. The forms only read
and check their fields (in the GUI thread); the run happens elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
)

from ..core.config import AdaptConfig, DataConfig, FolderConfig
from ..core.data.folders import list_images
from ..core.files.checkpoint import read_checkpoint
from ..runs import ArrayTargets, FolderTargets
from ._layers import check_image_pair
from ._pickers import LayerCombo, preferring
from ._qt import OUTPUT_WORDS, row

#: where target pairs come from: key -> label of the "Target source" choice
TARGET_SOURCES = {
    "layers": "Image layers",
    "registered": "The registered pair (Register widget)",
    "folders": "Folders (fixed / moving contrast)",
}
#: what the state file dialogs show
STATE_FILTER = "Adaptation states (*.state.safetensors);;All files (*)"


def state_folder() -> Path:
    """Where states go when no state file is given: the user's data folder of
    napari-discreg (e.g. ``~/.local/share/napari-discreg/adaptation-states`` on Linux),
    kept across sessions, unlike a temporary folder."""
    try:
        from platformdirs import user_data_dir
    except ImportError:  # pragma: no cover - napari depends on platformdirs
        return Path.home() / ".napari-discreg" / "adaptation-states"
    return Path(user_data_dir("napari-discreg")) / "adaptation-states"


def default_state_path() -> Path:
    """A new state file in :func:`state_folder`, named after the time of the run."""
    return state_folder() / f"adaptation-{time.strftime('%Y%m%d-%H%M%S')}.state.safetensors"


def target_source_combo() -> QComboBox:
    """The "Target source" choice (:data:`TARGET_SOURCES`)."""
    combo = QComboBox()
    for key, text in TARGET_SOURCES.items():
        combo.addItem(text, key)
    combo.setToolTip(
        "Image layers: the pairs as they are; the registered pair: the pair the Register "
        "widget registered last, after its pre-alignment, in overlapping 192 px tiles (the "
        "network stage adapted to your own images); folders: pairs made with a synthetic "
        "deformation from a fixed- and a moving-contrast folder"
    )
    return combo


class LayerTargetsBox(QGroupBox):
    """Target pairs from a fixed and a moving Image layer (2D pairs or 3D stacks)."""

    def __init__(self, viewer, parent=None) -> None:
        super().__init__("Target pairs (unlabelled)", parent)
        avoid = OUTPUT_WORDS
        self.fixed_combo = LayerCombo(
            viewer, (Image,), prefer=preferring("target fixed", "fixed", avoid=avoid, ndim=3)
        )
        self.moving_combo = LayerCombo(
            viewer,
            (Image,),
            prefer=preferring(
                "target moving",
                "moving",
                avoid=avoid,
                ndim=3,
                exclude=lambda layer: layer is self.fixed_combo.layer(),
            ),
        )
        self.fixed_combo.setToolTip(
            "Fixed images of the target pairs: a 2D image or a stack (N, H, W) of the new contrast"
        )
        self.moving_combo.setToolTip(
            "Moving images of the target pairs, same shape as the fixed ones (no labels needed)"
        )
        self.moving_combo.select_preferred()
        form = QFormLayout(self)
        form.addRow("Fixed", self.fixed_combo)
        form.addRow("Moving", self.moving_combo)
        form.setWidget(
            2,
            QFormLayout.ItemRole.SpanningRole,
            QLabel("3D layers: one pair per slice along axis 0"),
        )

    def targets(self) -> ArrayTargets:
        """The layers' data as run targets; ``ValueError`` for a missing or bad pair."""
        fixed, moving = self.fixed_combo.layer(), self.moving_combo.layer()
        check_image_pair(
            fixed,
            moving,
            what="target ",
            missing="choose the fixed and moving target image layers (2D pairs or 3D stacks)",
        )
        if fixed is moving:  # as the Register widget refuses it: nothing to adapt to
            raise ValueError(
                f"{fixed.name!r} is chosen as both the fixed and the moving target; choose "
                "two different layers (the fixed and the moving contrast)"
            )
        f, m = np.asarray(fixed.data), np.asarray(moving.data)
        f, m = (f[None], m[None]) if f.ndim == 2 else (f, m)
        desc = f"{f.shape[0]} pairs of the layers '{fixed.name}' (fixed) / '{moving.name}'"
        return ArrayTargets(f, m, description=desc)


def registered_targets(run) -> ArrayTargets:
    """Target pairs from the Register widget's last run: for each registered slice, the
    fixed image and the moving image resampled by that slice's pre-alignment, in
    overlapping tiles (:func:`~napari_discreg.core.learning.self_train.registered_pair_tiles`):
    what the network saw. ``ValueError`` when there is no registered pair."""
    from ..core.learning.self_train import registered_pair_tiles

    results = getattr(run, "results", None)
    if run is None or not results:
        raise ValueError(
            "register a pair first (Register widget): this target source adapts the network "
            "to the pair you registered"
        )
    fixed, moving = run.layer("fixed"), run.layer("moving")
    if fixed is None or moving is None:
        raise ValueError("the registered layers no longer exist; register the pair again")
    tiles_f, tiles_m, registered = [], [], []
    for index, result in results.items():
        f, m = np.asarray(fixed.data), np.asarray(moving.data)
        if index is not None:
            f, m = np.take(f, index, axis=run.axis), np.take(m, index, axis=run.axis)
        tf, tm = registered_pair_tiles(f, m, result.affine)
        tiles_f.append(tf)
        tiles_m.append(tm)
        registered.append((f, m, np.asarray(result.affine)))
    f_all, m_all = np.concatenate(tiles_f), np.concatenate(tiles_m)
    desc = (
        f"{f_all.shape[0]} tiles of the registered pair '{fixed.name}' (fixed) / "
        f"'{moving.name}' (moving, pre-aligned)"
    )
    # the run keeps adapted weights only if they register the pair(s) better
    return ArrayTargets(f_all, m_all, description=desc, registered=tuple(registered))


class FolderTargetsBox(QGroupBox):
    """Target pairs made from folders of the fixed and the moving contrast."""

    def __init__(self, parent=None) -> None:
        super().__init__("Target folders (unlabelled)", parent)
        self.fixed_edit = QLineEdit()
        self.fixed_edit.setPlaceholderText("folder of fixed-contrast images")
        self.moving_edit = QLineEdit()
        self.moving_edit.setPlaceholderText("folder of moving-contrast images")
        self.fixed_browse = QPushButton("Browse…")
        self.moving_browse = QPushButton("Browse…")
        tip = (
            "2D images (PNG, TIFF, .npy) or volumes (NIfTI, TIFF/.npy stacks), one subject "
            "per file; pairs are made with a synthetic deformation between the contrasts"
        )
        for w in (self.fixed_edit, self.moving_edit):
            w.setToolTip(tip)
        self.fixed_browse.setToolTip("Choose the folder of fixed-contrast images")
        self.moving_browse.setToolTip("Choose the folder of moving-contrast images")
        self.unpaired_check = QCheckBox("unpaired (different subjects)")
        self.unpaired_check.setToolTip(
            "The folders are not the same subjects: pair slices at random (no ground truth, "
            "so no held-out evaluation). Folders with different file counts are always "
            "paired at random."
        )
        self.holdout_spin = QDoubleSpinBox()
        self.holdout_spin.setRange(0.0, 0.9)
        self.holdout_spin.setSingleStep(0.05)
        self.holdout_spin.setDecimals(2)
        self.holdout_spin.setValue(FolderConfig().val_fraction)
        self.holdout_spin.setToolTip(
            "Share of the subjects (files) held out of adaptation and evaluated before and "
            "after it (paired folders only); 0: no evaluation"
        )
        form = QFormLayout(self)
        form.addRow("Fixed folder", row(self.fixed_edit, self.fixed_browse))
        form.addRow("Moving folder", row(self.moving_edit, self.moving_browse))
        form.addRow("", self.unpaired_check)
        form.addRow("Hold-out fraction", self.holdout_spin)
        self.fixed_browse.clicked.connect(lambda *_: self._browse(self.fixed_edit, "fixed"))
        self.moving_browse.clicked.connect(lambda *_: self._browse(self.moving_edit, "moving"))
        self.unpaired_check.toggled.connect(lambda on: self.holdout_spin.setEnabled(not on))

    def _browse(self, edit: QLineEdit, which: str) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, f"Folder of {which}-contrast target images", edit.text()
        )
        if folder:
            edit.setText(folder)

    def targets(self) -> FolderTargets:
        """The folders as run targets; ``ValueError`` (a message for the user) when a
        folder is not given, does not exist or holds no images."""
        fixed, moving = self.fixed_edit.text().strip(), self.moving_edit.text().strip()
        if not fixed or not moving:
            raise ValueError("choose a folder of fixed-contrast and one of moving-contrast images")
        list_images(fixed, name="fixed folder")  # raises with the reason
        list_images(moving, name="moving folder")
        return FolderTargets(paths=[fixed], moving=moving, unpaired=self.unpaired_check.isChecked())

    def folder_config(self, base: FolderConfig) -> FolderConfig:
        """``base`` with the hold-out fraction of the form."""
        return replace(base, val_fraction=float(self.holdout_spin.value()))

    def show_saved(self, settings: dict[str, Any]) -> None:
        """Fill the form with the folders of a saved run (what a resume reads)."""
        target = settings.get("target") or []
        if target:
            self.fixed_edit.setText(str(target[0]))
        if settings.get("target_moving"):
            self.moving_edit.setText(str(settings["target_moving"]))
        self.unpaired_check.setChecked(bool(settings.get("unpaired")))
        if settings.get("val_fraction") is not None:
            self.holdout_spin.setValue(float(settings["val_fraction"]))


class StateBox(QGroupBox):
    """Resumable states: save one every N iterations, and resume a saved one."""

    def __init__(self, parent=None) -> None:
        super().__init__("Resumable state", parent)
        self.every_spin = QSpinBox()
        self.every_spin.setRange(0, 100000)
        self.every_spin.setSpecialValueText("off")
        self.every_spin.setToolTip(
            "Save a resumable state (current and best weights, optimisers, iteration) every "
            "N iterations and at the end, stopped or finished; 0: off"
        )
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText(f"default: a new file in {state_folder()}")
        self.path_edit.setToolTip(
            "The state file (.state.safetensors). Left empty, each run writes a new file "
            f"named after its start time in {state_folder()}; a resumed run writes back to "
            "the file it resumed."
        )
        self.path_browse = QPushButton("Browse…")
        self.path_browse.setToolTip("Choose where the resumable state is written")
        self.resume_button = QPushButton("Resume…")
        self.resume_button.setToolTip(
            "Continue a saved state (of this widget or `napari-discreg adapt "
            "--checkpoint-every`): its model, targets and settings, up to its total "
            "iterations, or to Steps when that is larger"
        )
        form = QFormLayout(self)
        form.addRow("Save a resumable state every N iterations", self.every_spin)
        form.addRow("State file", row(self.path_edit, self.path_browse))
        form.addRow("", self.resume_button)
        self.path_browse.clicked.connect(lambda *_: self._browse())

    def _browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Resumable state file", self.path_edit.text() or str(state_folder()), STATE_FILTER
        )
        if path:
            self.path_edit.setText(path)

    def every(self) -> int | None:
        """Iterations between saved states; ``None``: off."""
        return int(self.every_spin.value()) or None

    def state_path(self, *, resuming: bool = False) -> Path | None:
        """The state file a run writes: the one given; else, when states are saved, a new
        one in :func:`state_folder` (``None`` when resuming: the resumed file)."""
        text = self.path_edit.text().strip()
        if text:
            return Path(text).expanduser()
        if resuming or not self.every():
            return None
        return default_state_path()

    def choose_resume(self) -> str | None:
        """Ask for the state file to resume."""
        start = self.path_edit.text() or str(state_folder())
        path, _ = QFileDialog.getOpenFileName(self, "Resume an adaptation", start, STATE_FILTER)
        return path or None


# ------------------------------------------------------------------ saved runs


def saved_run(path) -> tuple[dict[str, Any], int]:
    """(settings, iterations done) of the adaptation run saved in the state file ``path``."""
    _, _, extra = read_checkpoint(path)
    settings = extra.get("adaptation_run")
    if not isinstance(settings, dict) or "adaptation_state" not in extra:
        raise ValueError(
            f"{path} holds no adaptation run to resume; choose a *.state.safetensors file "
            "written with 'Save a resumable state every N iterations' (or by "
            "`napari-discreg adapt --checkpoint-every`)"
        )
    return settings, int(extra["adaptation_state"].get("step", 0))


def array_run(settings: dict[str, Any]) -> bool:
    """Whether a saved run adapted to arrays (layers), which a resume must give again."""
    return not any(settings.get(k) for k in ("target", "target_fixed", "demo_target"))


def saved_configs(
    config: AdaptConfig, data_config: DataConfig, saved: dict[str, Any]
) -> tuple[AdaptConfig, DataConfig, str]:
    """(config, data_config, discrepancy) with the settings of a saved run, exactly."""
    config = replace(
        config,
        method=saved.get("method", "mcd"),  # runs saved before self-training were MCD
        lr=saved["lr"],
        batch_size=saved["batch_size"],
        seed=saved["seed"],
    )
    return config, replace(data_config, size=saved["size"]), saved["discrepancy"]


# ------------------------------------------------------------------ texts


def evaluation_text(evaluation: dict | None) -> str:
    """The held-out evaluation before and after adaptation, in one sentence."""
    if not evaluation:
        return ""
    b, a, i = evaluation["before"], evaluation["after"], evaluation["identity"]
    return (
        f"Held-out evaluation ({evaluation['pairs']} pairs): label accuracy "
        f"{b['label_accuracy']:.1%} before -> {a['label_accuracy']:.1%} after (identity "
        f"{i['label_accuracy']:.1%}); EPE {b['epe']:.3f} -> {a['epe']:.3f} px (identity "
        f"{i['epe']:.3f})."
    )


def unchanged(result) -> bool:
    """True when a run kept its starting weights (no later iteration scored better)."""
    return result is not None and result.unchanged


def result_text(result) -> str:
    """The status line at the end of a run (an :class:`~napari_discreg.runs.AdaptationResult`,
    or ``None`` for a run closed before its first iteration)."""
    if result is None:
        return "stopped before the first iteration"
    how = "stopped" if result.interrupted else "finished"
    check = result.pair_check
    if check and not check["kept"]:
        text = [f"{how} after {result.completed_steps} of {result.total_steps} iterations."]
    elif unchanged(result):
        crit = (
            f" (criterion {result.initial_criterion:.4f} at the start)"
            if result.initial_criterion is not None
            else ""
        )
        text = [
            f"{how} after {result.completed_steps} of {result.total_steps} iterations; no "
            f"iteration scored better than the start by the selection criterion{crit}, so "
            "the model is unchanged (nothing to keep)."
        ]
    else:
        text = [
            f"{how} after {result.completed_steps} of {result.total_steps} iterations; the "
            f"model holds the weights of iteration {result.best_iteration} (best selection "
            "criterion)."
        ]
    if result.diverged:
        text.append(f"The run diverged: {result.diverged}.")
    text.append(result.note())
    text.append(result.selection_text())
    text.append(result.pair_check_text())
    text.append(evaluation_text(result.evaluation))
    state = result.state_path
    if state is not None and state.is_file():
        last = "" if result.state_saved else " (the last one saved)"
        text.append(f"Resumable state{last}: {state} (Resume… continues it).")
    text.append(
        "Run more iterations (or Resume…), or Revert."
        if unchanged(result)
        else "Keep, Revert, Save or Re-register."
    )
    return " ".join(t for t in text if t)


def warnings_text(warnings: list[str], shown: int = 5) -> str:
    """A run's warnings (e.g. files skipped) in one notification."""
    more = [f"… and {len(warnings) - shown} more"] if len(warnings) > shown else []
    return "\n".join(warnings[:shown] + more)
