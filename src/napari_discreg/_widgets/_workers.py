"""Background work: napari ``thread_worker`` jobs that can be stopped and are never leaked.

Every slow call (registration, model loading, adaptation) runs in a
:func:`napari.qt.threading.thread_worker`. A :class:`Job` wraps one worker with a
stop flag that the job's generator checks between complete units of work (a
registered slice, an adaptation iteration), so *Stop* takes effect within one unit.
Widgets call :meth:`Job.stop_and_wait` when they close, so no worker outlives them.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from napari.qt.threading import thread_worker
from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import QApplication, QLabel, QProgressBar, QPushButton, QWidget

from . import _notify
from ._notify import notify_exception


class Failure:
    """Returned by a job instead of raising, for errors the user caused."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Failure({self.exc!r})"


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised by a job's progress callback when Stop was asked for (inside a unit)."""


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (a queued signal)."""

    progressed = Signal(int, int)


class Job:
    """A running (or finished) stoppable background job.

    Parameters
    ----------
    body : callable
        ``body(stop: threading.Event)`` returning a generator; every value it yields is
        passed to ``on_yield`` in the GUI thread, its return value to ``on_return``.
        Any exception is turned into a :class:`Failure`, shown as a notification
        (unexpected ones are also logged with their traceback) and passed to
        ``on_failure``.
    context : str
        Prefix of error notifications ("registration", "adaptation").
    """

    def __init__(
        self,
        body: Callable[[threading.Event], Iterator[Any]],
        *,
        context: str,
        on_yield: Callable[[Any], None] | None = None,
        on_return: Callable[[Any], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        on_finish: Callable[[], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.stop_event = threading.Event()
        # progress from inside a unit of work (``job.report(done, total)`` in the body)
        self._relay = _Relay()
        if on_progress is not None:
            self._relay.progressed.connect(on_progress)
        self.context = context
        self._done = False
        self._started = False
        self._exited = threading.Event()  # set by the worker thread when the body is over
        # ``on_return`` may return an iterator of GUI steps (e.g. one output layer each):
        # they run one per event-loop turn, and the job ends after the last one
        self._steps: Iterator[Any] | None = None
        self._finish_pending = False
        stop = self.stop_event
        exited = self._exited

        def run():
            # Every exception becomes a returned Failure: superqt's generator workers
            # swallow a RuntimeError (taking it for a deleted Qt object) without
            # emitting ``finished``, which would leave the job "running" forever.
            try:
                result = yield from body(stop)
            except Exception as exc:  # noqa: BLE001 - reported by ``returned``
                return Failure(exc)
            finally:
                exited.set()
            return result

        worker = thread_worker(run, start_thread=False)()
        # napari relays worker errors to its notification manager with a traceback;
        # we report them ourselves with a clear message instead.
        relay = getattr(worker, "_relay_error", None)
        if relay is not None:
            try:
                worker.errored.disconnect(relay)
            except (TypeError, RuntimeError):  # pragma: no cover - napari internals changed
                pass
        if on_yield is not None:
            worker.yielded.connect(on_yield)

        def returned(value):
            if isinstance(value, Failure):
                notify_exception(value.exc, context)
                if on_failure is not None:
                    on_failure(value.exc)
            elif on_return is not None:
                steps = on_return(value)
                if isinstance(steps, Iterator):  # GUI work in slices: one per event-loop turn
                    self._steps = steps
                    self._next_step()

        def errored(exc):
            notify_exception(exc, context)
            if on_failure is not None:
                on_failure(exc)

        def finished():
            if self._steps is not None:
                self._finish_pending = True  # after the last GUI step
                return
            self._done = True
            if on_finish is not None:
                on_finish()

        self._finished = finished
        self._on_failure = on_failure

        worker.returned.connect(returned)
        worker.errored.connect(errored)
        worker.finished.connect(finished)
        self.worker = worker

    def _next_step(self) -> None:
        """Run one GUI step of ``on_return``'s iterator, then come back after the event
        loop has had its turn (a zero-delay timer)."""
        steps = self._steps
        if steps is None:
            return
        try:
            next(steps)
        except StopIteration:
            self._end_steps()
        except Exception as exc:  # noqa: BLE001 - shown like a worker's error
            self._end_steps()
            notify_exception(exc, self.context)
            if self._on_failure is not None:
                self._on_failure(exc)
        else:
            QTimer.singleShot(0, self._next_step)

    def _end_steps(self) -> None:
        self._steps = None
        if self._finish_pending:
            self._finish_pending = False
            self._finished()

    def report(self, done: int, total: int) -> None:
        """From the worker thread: show progress (``on_progress``) and raise
        :class:`StopRequested` when Stop was asked for, so a long unit of work (a
        registration's optimiser steps) stops within one step."""
        self._relay.progressed.emit(int(done), int(total))
        if self.stop_event.is_set():
            raise StopRequested

    def start(self) -> Job:
        self._started = True
        self.worker.start()
        return self

    @property
    def is_running(self) -> bool:
        """True from :meth:`start` until the worker finished and its handlers ran."""
        return self._started and not self._done

    def request_stop(self) -> None:
        """Ask the job to stop after the current unit of work."""
        self.stop_event.set()

    def stop_and_wait(self, timeout: float = 60.0) -> bool:
        """Stop the job and wait (processing Qt events) until it has finished.

        Returns True when the worker finished within ``timeout`` seconds.
        """
        self.request_stop()
        if not self._started:
            return True
        deadline = time.monotonic() + timeout
        app = QApplication.instance()
        # first the thread, then the queued ``returned``/``finished`` signals and the
        # GUI steps (they end early: the widget is going away)
        while not self._done and time.monotonic() < deadline:
            if self._steps is not None:
                self._steps.close()
                self._end_steps()
            if app is not None:
                app.processEvents()
            self._exited.wait(0.01)
        return self._exited.is_set()


class _AncestorWatcher(QObject):
    """Event filter on a widget's ancestors: a Close stops the jobs, a re-parenting
    extends the watch to the new ancestors (napari docks a widget in two steps)."""

    def __init__(self, owner: WorkerWidgetMixin) -> None:
        super().__init__(owner)
        self._owner = owner

    def eventFilter(self, obj, event):  # noqa: N802 - Qt API
        kind = event.type()
        if kind == QEvent.Type.Close:
            self._owner.shutdown()
        elif kind == QEvent.Type.ParentChange:
            self._owner._watch_ancestors()
        return False


@functools.cache
def warm_up() -> None:
    """What a job would otherwise do the first time, with Python's GIL held: torch's
    first optimiser imports ``torch._dynamo`` (about 800 modules, 1 s), which froze the
    window in the middle of the first adaptation or refinement. Done once per process,
    when the first widget opens."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


class WorkerWidgetMixin:
    """For widgets with background jobs: ``shutdown()`` runs when the widget closes, when
    any widget it is docked in (the dock, the napari main window) closes, and when the
    application quits, so no worker outlives its widget or viewer.

    Subclasses implement ``shutdown()`` (stop and wait for their jobs).
    """

    def _init_lifecycle(self) -> None:
        warm_up()
        self._watcher = _AncestorWatcher(self)
        self._watched: set[int] = set()  # ids only: no references to the napari window
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)
        self._watch_ancestors()

    def shutdown(self) -> None:  # pragma: no cover - overridden
        """Stop and wait for the widget's jobs."""

    def _watch_ancestors(self) -> None:
        parent = self.parentWidget()
        while parent is not None:
            if id(parent) not in self._watched:
                parent.installEventFilter(self._watcher)
                self._watched.add(id(parent))
            parent = parent.parentWidget()

    def event(self, event):
        if event.type() == QEvent.Type.ParentChange:
            if self.parentWidget() is None and self._watched:
                # napari closes a dock panel (its x) by un-parenting the widget, with
                # no close event: that is a close for the widget's jobs too
                self._closed_by_panel()
            self._watch_ancestors()
        return QWidget.event(self, event)

    def _closed_by_panel(self) -> None:
        running = getattr(self, "is_running", False)
        self.shutdown()
        if running:
            _notify.info(
                f"{getattr(self, 'job_title', 'the job')} was stopped because its panel was closed"
            )

    def closeEvent(self, event):  # noqa: N802 - Qt API
        self.shutdown()
        QWidget.closeEvent(self, event)


def job_controls(owner: QWidget) -> None:
    """Give a job-running widget its standard controls: ``stop_button`` (disabled until a
    job runs), ``progress`` (a bar at 0 of 1) and ``status_label`` (wrapping text)."""
    owner.stop_button = QPushButton("Stop")
    owner.stop_button.setEnabled(False)
    owner.progress = QProgressBar()
    owner.progress.setRange(0, 1)
    owner.progress.setValue(0)
    owner.status_label = QLabel("")
    owner.status_label.setWordWrap(True)
