"""The picture worker: a child process that renders the pictures while the run goes on.

Why a process: before its first picture, Open3D costs a process about 1 s (0.45 s to import, half of
it the ``dash`` web framework its ``visualization`` package imports unconditionally; then Filament's
engine, the Vulkan software device and its shaders), and it holds the GIL while it renders. In a
child started with the run, that start-up overlaps the scan and compute, and the pictures render
there while this process writes the PLY, ``scene.html``, the summary and the report's charts.

    from wdiff import worker
    job = worker.shared().submit(fn, *args, **kwargs)   # fn: a module-level function, args picklable
    ...
    job.result()   # fn's return value, or its exception raised here

Jobs run one at a time, in the order submitted; ``submit`` never waits (a thread writes the
requests). The child runs ``main`` of this very wdiff. It ignores Ctrl-C (this process decides what
an interruption ends) and exits when its requests pipe closes: when this process closes it
(``close``) or ends, however it ends. Its stdout is the reply pipe, so what native code prints there
goes to stderr instead. Warnings a job raises are raised again here, from ``Job.result``.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wdiff import _heap

_ROOT = str(Path(__file__).resolve().parent.parent)  # the folder holding this wdiff package
# The child imports this very wdiff: its folder goes first on the path unless the path has it already
# (an installed wdiff: its site-packages keeps its place, after the standard library).
_START = (
    "import sys; r = {root!r}; r in sys.path or sys.path.insert(0, r); import wdiff.worker as w; w.main()"
)


class WorkerError(RuntimeError):
    """The picture worker ended before it answered (killed, crashed, or could not start)."""


class RemoteTraceback(Exception):
    """The traceback of a job's exception, as the worker printed it: the ``__cause__`` of the
    exception ``Job.result`` raises (what ``concurrent.futures`` does for its process pools)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


class Job:
    """One call submitted to the worker; ``result()`` waits for it."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._outcome: tuple[bool, Any, list] | None = None  # (ok, value or exception, warnings)

    def done(self) -> bool:
        """Whether the answer has arrived (``result`` would not wait)."""
        return self._outcome is not None

    def result(self) -> Any:
        """The function's return value; its exception (with the worker's traceback as the cause),
        or ``WorkerError`` when the worker ended first. Warnings it raised are raised here."""
        if self._outcome is None:
            self._worker.wait_for(self)
        assert self._outcome is not None
        ok, value, caught = self._outcome
        if caught:  # once, at the first call
            self._outcome = (ok, value, [])
            for message, category, filename, lineno, module in caught:
                warnings.warn_explicit(message, category, filename, lineno, module=module)
        if ok:
            return value
        error, text = value
        raise error from (RemoteTraceback(text) if text else None)


class Worker:
    """The child process and the two pipes to it (see the module's docstring)."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # the process this worker belongs to (a fork must make its own)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _START.format(root=_ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.warmed = False  # whether ``warm`` had it load Open3D
        self._pending: collections.deque[Job] = collections.deque()  # submitted, not answered, in order
        self._lock = threading.Lock()  # one reader of the replies at a time
        self._submitting = threading.Lock()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="wdiff-worker-requests", daemon=True)
        self._writer.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
        """Run ``fn(*args, **kwargs)`` in the worker; returns at once. Arguments are pickled here, so
        one that cannot be pickled fails here."""
        request = _frame(pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
        job = Job(self)
        with self._submitting:  # the answers come in the order of the requests
            self._pending.append(job)
            self._outbox.put(request)
        return job

    def _write(self) -> None:
        pipe = self._process.stdin
        assert pipe is not None
        while (request := self._outbox.get()) is not None:
            try:
                pipe.write(request)
                pipe.flush()
            except (OSError, ValueError):  # the worker ended (or was closed): the readers say so
                break
        try:
            pipe.close()
        except OSError:
            pass

    def wait_for(self, job: Job) -> None:
        """Read answers, in order, until ``job``'s has arrived."""
        with self._lock:
            while not job.done():
                if not self._pending:  # never submitted to this worker: nothing will answer it
                    raise WorkerError("the job was not submitted to this picture worker")
                first = self._pending[0]
                first._outcome = self._read()
                self._pending.popleft()

    def _read(self) -> tuple[bool, Any, list]:
        pipe = self._process.stdout
        assert pipe is not None
        try:
            answer = _unframe(pipe)
        except OSError:
            answer = None
        except BaseException:  # an interruption in the middle of a reply: this worker is unusable
            self.kill()
            raise
        if answer is not None:
            try:
                return pickle.loads(answer)
            except Exception as e:  # noqa: BLE001 - a value that does not unpickle here: that job's failure
                return False, (WorkerError(f"the picture worker's answer cannot be read: {e}"), ""), []
        code = self._process.wait()
        return False, (WorkerError(f"the picture worker ended (exit code {code})"), ""), []

    def alive(self) -> bool:
        return self._process.poll() is None

    def kill(self) -> None:
        """End the worker now, whatever it is doing; unanswered jobs then fail with ``WorkerError``."""
        self._process.kill()
        self._process.wait()
        global _shared
        if _shared is self:
            _shared = None

    def close(self) -> None:
        """Let the worker finish what was submitted, then end it (it exits when its pipe closes)."""
        self._outbox.put(None)
        self._writer.join()
        self._process.wait()


_shared: Worker | None = None
_shared_lock = threading.Lock()


def shared() -> Worker:
    """This process's picture worker, started on first use (and again if it has ended)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.pid != os.getpid() or not _shared.alive():
            _shared = Worker()
        return _shared


def started() -> bool:
    """Whether this process has a picture worker running (without starting one)."""
    return _shared is not None and _shared.pid == os.getpid() and _shared.alive()


def warm() -> None:
    """Start this process's worker, if it has none, and have it load Open3D (``load_pictures``);
    returns at once."""
    w = shared()
    if not w.warmed:
        w.warmed = True
        w.submit(load_pictures)


def load_pictures() -> None:
    """The worker's first job: import Open3D (about 0.45 s) and the scene's modules, and keep the
    renderer between pictures (``render.keep_renderer``).

    Not more: making the renderer and drawing a frame to throw away would save the first picture
    about 0.15 s, but that is work the worker would do while the run still computes, on a 2-core
    machine where compute uses both, and the run does not wait for the first picture (it draws the
    report's charts meanwhile, which take longer)."""
    import open3d  # noqa: F401

    from wdiff.scene import picture, render  # noqa: F401

    render.keep_renderer()


_LENGTH = 8  # bytes of the length that goes before each message, little-endian


def _frame(message: bytes) -> bytes:
    return len(message).to_bytes(_LENGTH, "little") + message


def _unframe(pipe: Any) -> bytes | None:
    """The next message on ``pipe``, or None when it has ended (or ended in the middle of one)."""
    head = pipe.read(_LENGTH)
    if len(head) < _LENGTH:
        return None
    size = int.from_bytes(head, "little")
    message = pipe.read(size)
    return message if len(message) == size else None


def _module_of(filename: str) -> str:
    """The name of the loaded module whose file is ``filename`` (a warning's ``module``)."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return Path(filename).stem


def _answer(request: bytes) -> bytes:
    """Make the call ``request`` says and pickle what ``Job.result`` needs: the value or (exception,
    traceback), and the warnings."""
    fn: Any = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every one goes back; the caller's filters then decide
        try:
            fn, args, kwargs = pickle.loads(request)
            outcome: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            outcome = (False, (e, "".join(traceback.format_exception(e))))
    said = [(str(w.message), w.category, w.filename, w.lineno, _module_of(w.filename)) for w in caught]
    try:
        answer = pickle.dumps((*outcome, said), protocol=pickle.HIGHEST_PROTOCOL)
        if not outcome[0]:
            pickle.loads(answer)  # an exception whose args do not rebuild it (WdiffError) fails here
        return answer
    except Exception:  # noqa: BLE001 - an exception or value that does not pickle: said as text
        if outcome[0]:
            value: Any = TypeError(f"{getattr(fn, '__name__', fn)} returned a value that does not pickle")
            text = ""
        else:
            e, text = outcome[1]
            value = RuntimeError(f"{type(e).__name__}: {e}")
        return pickle.dumps((False, (value, text), said), protocol=pickle.HIGHEST_PROTOCOL)


def main() -> None:
    """The worker's loop: read a request, answer it; end quietly when the requests pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # fd 1 is no longer the reply pipe: native prints cannot corrupt the answers
    while True:
        try:
            request = _unframe(requests)
        except OSError:
            request = None
        if request is None:  # closed: the caller is done, or gone
            return
        answer = _frame(_answer(request))
        del request  # the job's arguments (a frame's points) are not kept while waiting for the next
        try:
            replies.write(answer)
            replies.flush()
        except OSError:  # nobody reads the answers any more
            return
        del answer
        # What the job freed goes back to the system: this process sits beside the run, and a render
        # frees tens of MiB (Open3D's copies of the points) that glibc would otherwise keep.
        _heap.give_back_memory()
