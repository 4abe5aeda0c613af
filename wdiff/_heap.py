"""Hand freed memory back to the system: ``give_back_memory`` (glibc's ``malloc_trim``).

glibc keeps much of what a process frees, to serve its next allocations, and the CLI tells it to
keep up to 1 GiB (``wdiff._warm.tune_process``: fresh pages cost page faults). That costs the machine
memory while a second process grows beside the first: a run with pictures is two processes, the
run and the picture worker (``wdiff.worker``), and what counts is the sum of the two. Measured on
the LLM-shaped run with ``--frames --mesh`` (docs/performance.md): the run held 100-170 MiB it had
freed (compute, the scene, ``points.ply``, ``mesh.ply``) while the worker's renderer grew by about
300 MiB over the film's frames, and the worker kept tens of MiB each render freed.

Called by the film before its frames (in the run's process), by the picture worker after each job,
and when the worker drops its renderer (``wdiff.scene.render.release_renderer``).
"""

from __future__ import annotations


def give_back_memory() -> None:
    """Return the heap's free pages to the system now (glibc only; elsewhere nothing happens).

    Takes about a millisecond for a heap of a few hundred MiB; the pages are faulted in again if
    the process allocates that much once more."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
