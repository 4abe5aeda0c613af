"""The picture worker (``wdiff.worker``): a real child process, called with real functions.

Answers come back in order and to the right job, exceptions and warnings are raised in the caller,
what the child prints on its stdout cannot corrupt the answers, Ctrl-C is left to the caller, and the
child ends, silently, when its caller closes it, kills it or dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from wdiff import worker


@pytest.fixture
def pool():
    w = worker.Worker()
    yield w
    w.kill()


def test_answers_arrive_in_order_to_their_own_job(pool):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    jobs = [pool.submit(np.multiply, a, k) for k in range(5)]
    child = pool.submit(os.getpid)
    for k in reversed(range(5)):  # waited for last to first: earlier answers are kept for their jobs
        np.testing.assert_array_equal(jobs[k].result(), a * k)
    assert child.result() != os.getpid()
    assert all(job.done() for job in jobs)


def test_a_jobs_exception_is_raised_here_with_the_workers_traceback(pool):
    job = pool.submit(int, "twelve")
    with pytest.raises(ValueError, match="twelve") as caught:
        job.result()
    assert isinstance(caught.value.__cause__, worker.RemoteTraceback)
    assert "Traceback" in str(caught.value.__cause__)
    assert pool.submit(int, "12").result() == 12  # the worker goes on


def test_an_exception_that_does_not_pickle_back_is_said_as_text(pool):
    # WdiffError(path, problem) cannot be rebuilt from its args: it comes back as a RuntimeError
    from wdiff.checkpoints import scan

    with pytest.raises(RuntimeError, match="WdiffError: .*no-such-folder"):
        pool.submit(scan, "/no-such-folder").result()


def test_warnings_of_a_job_are_raised_here(pool):
    job = pool.submit(warnings.warn, "careful", RuntimeWarning)
    with pytest.warns(RuntimeWarning, match="careful"):
        assert job.result() is None


def test_what_native_code_prints_on_stdout_cannot_corrupt_the_answers(pool):
    assert pool.submit(os.write, 1, b"stray bytes on stdout\n").result() == 22
    assert pool.submit(sum, [1, 2, 3]).result() == 6


def test_ctrl_c_is_left_to_the_caller(pool):
    pid = pool.submit(os.getpid).result()
    os.kill(pid, signal.SIGINT)
    time.sleep(0.2)
    assert pool.submit(sum, [4, 5]).result() == 9


def test_a_worker_that_dies_fails_its_jobs_and_the_next_shared_one_is_new():
    w = worker.shared()
    first = w.submit(os.getpid).result()
    doomed = w.submit(os._exit, 3)
    after = w.submit(sum, [1])
    for job in (doomed, after):
        with pytest.raises(worker.WorkerError, match="exit code 3"):
            job.result()
    assert worker.shared().submit(os.getpid).result() != first


def test_kill_ends_a_busy_worker_at_once():
    w = worker.shared()
    busy = w.submit(time.sleep, 30)
    t0 = time.monotonic()
    w.kill()
    with pytest.raises(worker.WorkerError):
        busy.result()
    assert time.monotonic() - t0 < 10
    assert not w.alive()
    assert worker.shared() is not w


def test_close_lets_the_worker_finish_then_it_exits(pool):
    job = pool.submit(sum, [2, 3])
    pool.close()
    assert job.result() == 5
    assert pool._process.returncode == 0


def test_the_worker_ends_quietly_when_its_caller_dies(tmp_path):
    """The caller ends with os._exit (as the CLI does) while its worker is busy and another job is
    queued: the worker finishes, finds nobody to answer, and exits without a word on stderr."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from wdiff import worker
        w = worker.shared()
        print(w.submit(os.getpid).result(), flush=True)
        w.submit(time.sleep, 0.5)
        w.submit(sum, [1, 2])
        os._exit(0)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    pid = int(p.stdout.split()[0])
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the worker outlived its caller"
    assert p.stderr == ""


def test_the_worker_runs_the_very_wdiff_of_its_caller():
    """A caller that found wdiff through its own sys.path (a notebook's ``sys.path.insert``), with no
    PYTHONPATH: the worker imports the same files."""
    import wdiff

    root = os.path.dirname(os.path.dirname(wdiff.__file__))
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {root!r})
        from wdiff import worker
        print(worker.shared().submit(eval, "__import__('wdiff').__file__").result())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == wdiff.__file__


def test_jobs_submitted_from_several_threads_each_get_their_own_answer(pool):
    import threading

    got: dict[int, object] = {}

    def ask(k: int) -> None:
        got[k] = pool.submit(sum, [k, k]).result()

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {k: 2 * k for k in range(16)}


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")
def test_the_worker_hands_back_what_a_job_freed(pool):
    """A job allocates 200 MiB in 64 KiB arrays (glibc serves them from its heap) and frees all but
    the last, which pins the top of the heap: glibc alone would keep the 200 MiB. The worker sits
    beside the run, so after each job it hands what was freed back to the system."""
    pid = pool.submit(os.getpid).result()
    before = _status_kib(pid, "VmRSS:")
    allocate = (
        "import builtins, numpy as np; xs = [np.ones(8192) for _ in range(3200)]; builtins.pin = xs[-1]"
    )
    pool.submit(exec, allocate, {}).result()
    pool.submit(sum, [1]).result()  # the worker trims after it replies: after the next answer, it has
    assert _status_kib(pid, "VmHWM:") - before > 190 * 1024  # the job's arrays were resident
    assert _status_kib(pid, "VmRSS:") - before < 20 * 1024
