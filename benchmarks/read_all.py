"""The floor: read every byte of FILES into one 8 MiB buffer with ``readinto`` (one thread), as a
program that must see the bytes does. ``cat FILES > /dev/null`` is no floor on Linux: GNU cat splices
into /dev/null, and for cached pages that copies nothing (12.4 GB in 0.4 s).

    python benchmarks/read_all.py FILES...
"""

import sys


def main() -> int:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    total = 0
    for path in sys.argv[1:]:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    print(total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
