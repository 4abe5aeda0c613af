"""Run one command; report its wall time and peak RSS, like a small ``/usr/bin/time -v``.

    python -I -S benchmarks/measure.py RESULT.json -- CMD ARGS...

Why a separate process: Linux carries a process's peak RSS (``ru_maxrss``) across ``exec``, and a
child made by ``fork``/``vfork`` starts out sharing (and counting) its parent's memory. Measured
straight from the harness, every child would report at least the harness's own peak (numpy, the data
generator's buffers: hundreds of MiB). This launcher imports nothing heavy (run it with ``-I -S``, it is
a few MiB), so what it reports is the command's own peak.

RESULT.json gets ``wall`` (seconds from spawn to exit), ``maxrss_kib`` (``ru_maxrss`` of the command
from ``os.wait4``), ``tree_maxrss_kib`` (``getrusage(RUSAGE_CHILDREN)``: the largest peak of any process
in the command's tree that was waited for; threads share their process's RSS) and ``returncode``.
"""

import json
import os
import resource
import sys
import time


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print("usage: measure.py RESULT.json -- CMD ARGS...", file=sys.stderr)
        return 2
    result, cmd = sys.argv[1], sys.argv[3:]
    t0 = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    tree = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as f:
        json.dump({"wall": wall, "maxrss_kib": ru.ru_maxrss, "tree_maxrss_kib": tree, "returncode": code}, f)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
