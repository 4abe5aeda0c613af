"""Run one command; report its wall time and the memory of its whole process tree, like a small
``/usr/bin/time -v`` that also sees the command's children.

    python -I -S benchmarks/measure.py RESULT.json -- CMD ARGS...

Why a separate process: Linux carries a process's peak RSS (``ru_maxrss``) across ``exec``, and a
child made by ``fork``/``vfork`` starts out sharing (and counting) its parent's memory. Measured
straight from the harness, every child would report at least the harness's own peak (numpy, the data
generator's buffers: hundreds of MiB). This launcher imports nothing heavy (run it with ``-I -S``, it is
a few MiB), so what it reports is the command's own peak.

The command's children count too: wdiff draws its pictures in a child process (``wdiff/worker.py``)
that the command never waits for (it ends with ``os._exit``; the worker exits when its pipe closes).
So this process makes itself the *child subreaper* of the tree (``prctl(PR_SET_CHILD_SUBREAPER)``:
a descendant orphaned by its parent becomes this process's child instead of init's), and a thread
samples, every ``INTERVAL`` seconds while the command runs, every live descendant (found through
``/proc/PID/task/*/children``): its ``VmRSS`` and ``VmHWM`` (``/proc/PID/status``) and its PSS
(``Pss:`` of ``/proc/PID/smaps_rollup``). After the command exits, the descendants it left running
are sampled and waited for (at most ``LINGER`` seconds).

PSS costs more to read: ``smaps_rollup`` walks the process's page tables, 8 ms for wdiff's process
during compute on the LLM-shaped run, so reading every process at every sample would take a third
of a core (on 2 cores, beside what is measured). So a process's ``smaps_rollup`` is read at most
``PSS_SHARE`` of the time (after a read that took ``c`` seconds, again ``c / PSS_SHARE`` seconds
later: every sample for a small process, every 0.2 s for that one); at the samples between, its PSS
is its RSS then minus its RSS - PSS at its last read (the part of its pages it shares: libraries,
which change little).

RESULT.json gets:

- ``wall``: seconds from spawn to the command's exit (not its lingering descendants');
- ``maxrss_kib``: ``ru_maxrss`` of the command, from ``os.wait4``;
- ``tree_maxrss_kib``: ``getrusage(RUSAGE_CHILDREN)``, the largest peak of any one process of the
  tree that was waited for (here: all that ended within ``LINGER``; threads share their process's
  RSS);
- ``tree_peak_pss_kib``: the largest sum, at one sample, of the PSS of every live descendant. PSS
  splits each shared page between the processes that map it, so the libraries two processes of the
  tree both load count once: this is the tree's memory. (Pages shared with processes outside the
  tree count in part, so it moves a little with what else runs on the machine.) Sampled, so a peak
  shorter than the interval can be missed;
- ``tree_peak_rss_kib``: the same for RSS (``VmRSS``): shared pages count once per process;
- ``processes``: one entry per descendant seen, in the order first seen: ``pid``, ``ppid``, ``name``
  (``Name:`` of ``/proc/PID/status``, the last seen: a child that exec'd is named after the program
  it became), ``cmdline`` (its first 3 words, at most 100 characters), ``peak_rss_kib`` (its
  ``VmHWM`` at the last sample: the kernel's own peak, not sampled), ``peak_pss_kib`` (sampled),
  ``maxrss_kib`` (from ``wait4`` when this process reaped it, else null);
- ``samples``; ``pss_reads`` and ``pss_estimates``: process PSS values read and estimated;
  ``sampler_cpu_seconds``: the CPU time this process used (what sampling cost the machine);
  ``lingered``: pids still alive after ``LINGER`` (not waited for); ``returncode``: the command's.
"""

import ctypes
import json
import os
import resource
import sys
import threading
import time

INTERVAL = 0.02  # seconds between samples
PSS_SHARE = 0.04  # at most this share of the time goes to reading one process's smaps_rollup
LINGER = 60.0  # seconds to wait, after the command exits, for the descendants it left running
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _field(text, key):
    """The number (kB) after ``key`` in a /proc status or smaps_rollup text, or None."""
    at = text.find("\n" + key)
    if at < 0:
        return None
    return int(text[at + len(key) + 1 :].split(None, 1)[0])


def _field_text(text, key):
    """The text after ``key`` on its line of a /proc status text ("" when absent)."""
    at = text.find("\n" + key)
    return "" if at < 0 else text[at + len(key) + 1 :].split("\n", 1)[0].strip()


def _read(path):
    try:
        with open(path, "rb") as f:
            return "\n" + f.read().decode("utf-8", "replace")
    except OSError:  # gone, or a zombie that no longer has the file
        return None


def _children_files(pid):
    """The children of ``pid`` from ``/proc/PID/task/*/children`` (one file per thread), or None
    when the kernel has no such files (``CONFIG_PROC_CHILDREN``)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended
            return None
        except OSError:
            continue
    return found


def _scan_parents():
    """{pid: ppid} of every process, from ``/proc/*/stat`` (the slower way: every process)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it
            parent[int(name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return parent


def descendants(root):
    """{pid: ppid} of every process below ``root`` (itself excluded; zombies included)."""
    below, todo = {}, [root]
    children = None
    while todo:
        pid = todo.pop()
        kids = _children_files(pid) if children is None else children.get(pid, ())
        if kids is None:  # no children files: one scan of /proc gives every parent
            children = {}
            for child, parent in _scan_parents().items():
                children.setdefault(parent, []).append(child)
            kids = children.get(pid, ())
        for child in kids:
            if child not in below:
                below[child] = pid
                todo.append(child)
    return below


class Sampler:
    """Samples the memory of this process's descendants on a thread (see the module's docstring)."""

    def __init__(self):
        self.root = os.getpid()
        self.processes = {}  # pid -> entry of RESULT.json's "processes"
        self.peak_pss = 0
        self.peak_rss = 0
        self.samples = 0
        self.pss_reads = 0
        self.pss_estimates = 0
        self._last_read = {}  # pid -> (RSS - PSS at its last smaps_rollup read, when to read it next)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="measure-sampler", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()  # one last look

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(INTERVAL)

    def _pss(self, pid, rss):
        """The PSS of ``pid`` now: read, or estimated from its RSS when its last read is recent."""
        now = time.monotonic()
        gap, due = self._last_read.get(pid, (None, now))
        if now >= due:
            t0 = time.perf_counter()
            rollup = _read(f"/proc/{pid}/smaps_rollup")
            cost = time.perf_counter() - t0
            if rollup is not None:
                pss, rss_then = _field(rollup, "Pss:"), _field(rollup, "Rss:")
                if pss is not None and rss_then is not None:
                    self._last_read[pid] = (rss_then - pss, now + cost / PSS_SHARE)
                    self.pss_reads += 1
                    return pss
        if gap is None:
            return None
        self.pss_estimates += 1
        return max(rss - gap, 0)

    def sample(self):
        pss_sum = rss_sum = 0
        for pid, ppid in descendants(self.root).items():
            status = _read(f"/proc/{pid}/status")
            if status is None:
                continue
            rss, hwm = _field(status, "VmRSS:"), _field(status, "VmHWM:")
            if rss is None:  # a zombie: its memory is gone
                continue
            comm = _field_text(status, "Name:")
            entry = self.processes.get(pid)
            if entry is None:
                entry = self.processes[pid] = {
                    "pid": pid,
                    "ppid": ppid,
                    "name": None,
                    "cmdline": None,
                    "peak_rss_kib": 0,
                    "peak_pss_kib": 0,
                    "maxrss_kib": None,
                }
            if entry["name"] != comm:  # new, or it exec'd another program (a fork of Python, then ffmpeg)
                words = (_read(f"/proc/{pid}/cmdline") or "").lstrip("\n").split("\0")
                entry["name"], entry["cmdline"] = comm, " ".join(words[:3]).strip()[:100]
            entry["peak_rss_kib"] = max(entry["peak_rss_kib"], hwm or 0)
            pss = self._pss(pid, rss)
            if pss is not None:
                entry["peak_pss_kib"] = max(entry["peak_pss_kib"], pss)
                pss_sum += pss
            rss_sum += rss
        self.peak_pss = max(self.peak_pss, pss_sum)
        self.peak_rss = max(self.peak_rss, rss_sum)
        self.samples += 1


def reap(sampler, deadline):
    """Wait for this process's remaining children (the command's orphans) until ``deadline``;
    returns the pids still alive then."""
    while True:
        try:
            pid, status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid:
            if pid in sampler.processes:
                sampler.processes[pid]["maxrss_kib"] = ru.ru_maxrss
            continue
        if time.monotonic() > deadline:
            return sorted(descendants(os.getpid()))
        time.sleep(0.005)


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print("usage: measure.py RESULT.json -- CMD ARGS...", file=sys.stderr)
        return 2
    result, cmd = sys.argv[1], sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = os.strerror(ctypes.get_errno())
        print(f"measure.py: prctl(PR_SET_CHILD_SUBREAPER): {error}", file=sys.stderr)
        return 2
    sampler = Sampler()
    t0 = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    sampler.start()
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    lingered = reap(sampler, time.monotonic() + LINGER)
    sampler.stop()
    if pid in sampler.processes:
        sampler.processes[pid]["maxrss_kib"] = ru.ru_maxrss
    tree = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as f:
        json.dump(
            {
                "wall": wall,
                "maxrss_kib": ru.ru_maxrss,
                "tree_maxrss_kib": tree,
                "tree_peak_pss_kib": sampler.peak_pss,
                "tree_peak_rss_kib": sampler.peak_rss,
                "processes": list(sampler.processes.values()),
                "samples": sampler.samples,
                "pss_reads": sampler.pss_reads,
                "pss_estimates": sampler.pss_estimates,
                "sampler_cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
                "lingered": lingered,
                "returncode": code,
            },
            f,
            indent=1,
        )
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
