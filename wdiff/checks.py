"""The range of every numeric parameter and the syntax of a scheduler, checked before any work.

Each check names the parameter (``workers must be an integer from 1 to 1024, got -1``) and raises an
:class:`OptionError`; ``wdiff.run``, ``wdiff.watch`` and the CLI use the same checks, and the CLI shows
the flag of the parameter instead (``--workers must be ...``). A distributed scheduler's address can
only be reached later; its syntax is checked here.
"""

from __future__ import annotations

import math
import numbers
import operator
import re

from wdiff.errors import WdiffError

__all__ = ["OptionError", "number", "run_parameters", "scheduler", "size"]

# (lowest, highest) of each parameter. Points: a scene cannot hold more than its weights anyway.
WORKERS = (1, 1024)  # threads, processes or local:N workers: more than any machine has cores
POINTS = (1, 10**12)  # max_points, frame_points, html_points (0 there means: no scene.html)
CHUNK_ELEMENTS = (1, 1 << 38)  # float32 output per Dask task: 1 TiB at most
CHUNK_MB = (0.0, float(CHUNK_ELEMENTS[1] * 4 >> 20))  # the CLI's unit: MiB, above 0
POLL = (0.1, 86_400.0)  # seconds between two looks of wdiff watch: a tenth of a second to a day

LOCAL_SCHEDULERS = ("threads", "processes", "sync")
#: the schedulers ``wdiff.compute`` runs on, as an error says them
SCHEDULERS = "threads, processes, sync, local:N (N worker processes) or a dask.distributed address"
# Protocols of dask.distributed addresses (distributed.comm.registry): tcp://host:8786, tls://..., ...
_PROTOCOLS = ("tcp", "tls", "ucx", "ws", "wss", "inproc")
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
_ADDRESS = re.compile(rf"(?:(?P<protocol>[a-z]+)://)?(?P<host>{_HOST})(?::(?P<port>[0-9]{{1,5}}))?")


NO_MAP = "none"  # the ``map_dtype`` of a run that stores no accumulated map (wdiff.update.map_dtypes)
MAP_DTYPE_CHOICES = ("float32", "bfloat16", NO_MAP)  # how a run's map is stored (wdiff.update.map_dtypes)
MAP_AUTO = "auto"  # the default ``map_dtype``: chosen by the map's size (wdiff.update.chosen_map_dtype)
MAP_DTYPE_OPTIONS = (MAP_AUTO, *MAP_DTYPE_CHOICES)  # what ``map_dtype`` may be asked as


class OptionError(WdiffError):
    """A parameter outside its range. ``parameter`` is its Python name, ``detail`` the rest of the line."""

    def __init__(self, parameter: str, detail: str) -> None:
        self.parameter = parameter
        self.detail = detail
        super().__init__(None, f"{parameter} {detail}")


def number(
    name: str, value: object, low: float, high: float, *, integer: bool = True, above: bool = False
) -> int | float:
    """``value`` if it is a number from ``low`` (or ``above`` it) to ``high``: never NaN or infinite,
    an integer when ``integer`` (a bool is not one). Returns it as int or float."""
    if integer:
        try:
            if isinstance(value, bool):
                raise TypeError
            n: int | float = operator.index(value)  # type: ignore[arg-type]  # numpy ints too
        except TypeError:
            raise OptionError(name, f"must be an integer from {low} to {high}, got {value!r}") from None
        if not low <= n <= high:
            raise OptionError(name, f"must be an integer from {low} to {high}, got {n}")
        return n
    span = f"above {_g(low)} and at most {_g(high)}" if above else f"from {_g(low)} to {_g(high)}"
    wanted = f"a number {span}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # not "10": a str is no number
        raise OptionError(name, f"must be {wanted}, got {value!r}")
    n = float(value)
    if not math.isfinite(n) or n > high or n < low or (above and n == low):
        raise OptionError(name, f"must be {wanted}, got {value!r}")
    return n


def _g(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def scheduler(name: str, value: object) -> str:
    """``value`` if it is one of the ``SCHEDULERS`` ``wdiff.compute`` knows: ``threads``,
    ``processes``, ``sync``, ``local:N`` or a dask.distributed address such as ``tcp://host:8786``."""
    text = value if isinstance(value, str) else ""
    if text in LOCAL_SCHEDULERS:
        return text
    if text.startswith("local:"):
        n = text.removeprefix("local:")
        if not (n.isascii() and n.isdigit() and WORKERS[0] <= int(n) <= WORKERS[1]):
            most = WORKERS[1]
            raise OptionError(name, f"{text!r}: N in local:N must be a positive integer, at most {most}")
        return _distributed(name, text)
    match = _ADDRESS.fullmatch(text)
    protocol = match and match["protocol"]
    if text.startswith("inproc://") and text.isprintable() and len(text) > len("inproc://"):
        return _distributed(name, text)  # an address within this process: inproc://ip/pid/n
    if (
        match is None
        or (protocol is not None and protocol not in _PROTOCOLS)
        or (protocol is None and match["port"] is None)  # "bogus" is no address; "host:8786" is
        or (match["port"] is not None and not 1 <= int(match["port"]) <= 65535)
    ):
        raise OptionError(name, f"{value!r} is an unknown scheduler: use {SCHEDULERS}")
    return _distributed(name, text)


def _distributed(name: str, text: str) -> str:
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise OptionError(name, f"{text}: needs the dask.distributed package (pip install distributed)")
    return text


def size(name: str, text: str) -> str:
    """``text`` if it looks like ``1280x800`` in ASCII digits (the sizes are checked with the scene)."""
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*[xX]\s*[0-9]{1,9}\s*", text):
        raise OptionError(name, f"must look like 1280x800 (width x height in pixels), got {text!r}")
    return text


def run_parameters(
    *,
    max_points: object = 1,
    frame_points: object = 1,
    chunk_elements: object = None,
    scheduler_name: object = "threads",
    workers: object = None,
    map_dtype: object = MAP_AUTO,
) -> None:
    """The numeric parameters of ``wdiff.run`` (and of ``wdiff.watch``, which passes them on), and the
    accumulated map's storage."""
    if map_dtype not in MAP_DTYPE_OPTIONS:
        raise OptionError("map_dtype", f"must be one of {', '.join(MAP_DTYPE_OPTIONS)}, got {map_dtype!r}")
    number("max_points", max_points, *POINTS)
    number("frame_points", frame_points, *POINTS)
    if chunk_elements is not None:
        number("chunk_elements", chunk_elements, *CHUNK_ELEMENTS)
    scheduler("scheduler", scheduler_name)
    if workers is not None:
        number("workers", workers, *WORKERS)
