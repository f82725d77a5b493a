"""The deformable methods of :func:`~napari_discreg.core.registration.register.register`, in one table.

Each :class:`Method` says what it runs (the network's field, an optimiser, or both), the
type of its settings, how many optimiser steps it plans and how to describe it; the API,
the command line, the widget and the memory model read the table instead of decoding
the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BSplineConfig, RefineConfig

Settings = BSplineConfig | RefineConfig | None


@dataclass(frozen=True)
class Method:
    """One deformable method.

    Attributes
    ----------
    name, description : str
        The name users give (``method=``, ``--method``) and one line about it.
    network : bool
        Runs the network (its field is the result, or the optimiser's start).
    optimiser : str or None
        ``"bspline"`` (B-spline Gauss-Newton on MIND-SSC), ``"adam"`` (Adam on a dense
        grid) or ``None``.
    """

    name: str
    description: str
    network: bool
    optimiser: str | None = None

    @property
    def settings_type(self) -> type | None:
        """The type ``register(refine=...)`` takes for this method (``None``: none)."""
        return {"bspline": BSplineConfig, "adam": RefineConfig}.get(self.optimiser or "")

    def settings(self, refine: bool | int | RefineConfig | BSplineConfig | None) -> Settings:
        """This method's settings from ``refine`` (``None`` or ``True``: the defaults; an
        int: Adam steps per level); :class:`ValueError` for settings of another method."""
        kind = self.settings_type
        if kind is None:
            if refine not in (None, False, 0):
                raise ValueError(
                    f"method {self.name!r} takes no refinement settings, got {refine!r}"
                )
            return None
        if refine is None or refine is True:
            return kind()
        if isinstance(refine, (BSplineConfig, RefineConfig)) and isinstance(refine, kind):
            return refine
        if kind is RefineConfig and isinstance(refine, int) and not isinstance(refine, bool):
            if refine > 0:
                return RefineConfig(steps=refine)
        what = "a RefineConfig or steps > 0" if kind is RefineConfig else "a BSplineConfig"
        raise ValueError(f"method {self.name!r} takes {what} as refine, got {refine!r}")

    def planned_steps(self, settings: Settings, shape: tuple[int, int]) -> int:
        """Optimiser steps a pair of ``shape`` takes (what the progress counts), the
        network's pass excluded."""
        if isinstance(settings, BSplineConfig):
            from .bspline import level_schedule

            return int(sum(n for _, n in level_schedule(shape, settings)))
        if isinstance(settings, RefineConfig):
            from .refine import refine_step_count

            return refine_step_count(settings, shape)
        return 0

    def summary(self, steps: int) -> str:
        """How the deformable field was made, for messages (``steps``: of the optimiser)."""
        if not self.network and self.optimiser is None:
            return "no deformable stage"
        if self.optimiser is None:
            return "the network (coarse to fine)"
        name, kind = (
            ("Adam", "Adam steps per level")
            if self.optimiser == "adam"
            else ("B-spline Gauss-Newton", "Gauss-Newton steps")
        )
        start = "the network, then " if self.network else ""
        return f"{start}{name} ({steps} {kind})"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "network",
            "the network's field, coarse to fine (the default: most accurate on real pairs)",
            network=True,
        ),
        Method("bspline", "B-spline Gauss-Newton on MIND-SSC", network=False, optimiser="bspline"),
        Method(
            "network+bspline",
            "the network's field, refined by B-spline Gauss-Newton",
            network=True,
            optimiser="bspline",
        ),
        Method(
            "network+adam",
            "the network's field, refined by Adam on a dense grid",
            network=True,
            optimiser="adam",
        ),
        Method("none", "no deformable stage: the pre-alignment alone", network=False),
    )
}
"""Every deformable method (run after the pre-alignment) by name."""

DEFAULT_METHOD = "network"
"""What ``register()``, ``napari-discreg register`` and the Register widget run after the
pre-alignment unless told otherwise: chosen on the real stain pairs with human landmarks
(``benchmarks/landmarks.py``, "Real pairs" in docs/benchmarks.md), where the network was
more accurate than the B-spline method and than elastix and ANTs, and invents no motion
on unmoved pairs."""


def method_named(name: str) -> Method:
    """The :class:`Method` called ``name``; :class:`ValueError` naming the choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def resolve_method(
    method: str | None, refine: bool | int | RefineConfig | BSplineConfig | None
) -> tuple[Method, Settings]:
    """The method and its settings from :func:`register`'s ``method`` and ``refine``.

    Without ``method`` the ``refine`` forms of earlier releases still choose one: a
    :class:`BSplineConfig` ``"bspline"``, ``False``/``0`` ``"network"``, ``True``, an int
    or a :class:`RefineConfig` ``"network+adam"``; nothing: :data:`DEFAULT_METHOD`.
    """
    if isinstance(refine, int) and not isinstance(refine, bool) and refine < 0:
        raise ValueError(f"refine must be >= 0 steps, got {refine}")
    if refine is not None and not isinstance(refine, (bool, int, RefineConfig, BSplineConfig)):
        raise TypeError(
            "refine must be a BSplineConfig, a RefineConfig, an int or a bool, got "
            f"{type(refine).__name__}"
        )
    if method is None:
        if refine is None:
            method = DEFAULT_METHOD
        elif isinstance(refine, BSplineConfig):
            method = "bspline"
        elif refine is False or refine == 0:
            method = "network"
        else:
            method = "network+adam"
    chosen = method_named(method)
    return chosen, chosen.settings(refine)
