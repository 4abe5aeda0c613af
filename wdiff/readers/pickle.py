"""A pickle reader that never runs pickle code: an opcode loop over an allowlist of wdiff factories.

PyTorch files (``data.pkl`` inside a ``torch.save`` zip, torch.distributed.checkpoint's ``.metadata``)
are pickles. ``pickle.load`` would import and call whatever the file names, so wdiff interprets the
opcodes itself (the shape of torch's ``torch/_weights_only_unpickler.py``) and decides what every
``GLOBAL`` becomes:

- a name in ``allowed`` becomes the wdiff-side value it maps to (usually a factory that returns an
  inert wdiff record; REDUCE/NEWOBJ/INST/OBJ call it with the pickled arguments);
- a name under a prefix given to ``with_placeholders`` becomes a ``Global`` token, and calling it
  (REDUCE, NEWOBJ, ...) yields a ``Placeholder`` that only records its arguments and state
  (hyper-parameters such as ``argparse.Namespace`` or omegaconf containers saved beside the weights);
- anything else is refused in one line.

No attribute of a pickled object is ever looked up or called: BUILD, SETITEMS, APPENDS and ADDITEMS
act on builtin containers and on ``Placeholder`` records only, and the ``copyreg`` extension registry
(EXT1/2/4) is never consulted. Bounds: the pickle size, the number of objects built, the size of every
length-prefixed value (never more than the bytes that remain), and the shape of dict keys and set
members (a deeply nested tuple crashes CPython's ``hash``; ints with equal hashes flood a dict), so
neither a crafted nor a damaged pickle can hang, crash or exhaust memory.
"""

from __future__ import annotations

import _compat_pickle  # pure data: Python 2 module names, as pickle.Unpickler maps them
import codecs
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from wdiff.errors import WdiffError

MAX_PICKLE_BYTES = 1 << 30  # torch's data.pkl holds no tensor bytes: real ones are kilobytes to megabytes
MAX_OBJECTS = 10_000_000  # objects pushed per pickle (a 10k-tensor data.pkl pushes ~200k): ~2 GiB at most
HIGHEST_PROTOCOL = 5

# Dict keys and set members are hashed. Hashes of str/bytes are salted per process; an int's hash is
# the int itself below 2**61 - 1 (distinct ints, distinct hashes), while ints past it, floats and
# tuples of them can be crafted to collide and turn dict insertion quadratic. CPython's tuple hash also
# recurses without a depth check, so a deeply nested tuple key crashes the interpreter.
_HASH_MODULUS = (1 << 61) - 1
MAX_KEY_PARTS = 64  # scalars in one tuple key, however nested
MAX_KEY_DEPTH = 8
MAX_COMPOSITE_KEYS = 100_000  # tuple / float keys per pickle (real ones have none or a few)


@dataclass(frozen=True)
class Global:
    """A class or function the pickle names and wdiff keeps as a name only (see ``with_placeholders``).

    Calling it, as REDUCE/NEWOBJ/INST/OBJ do, records the call in a ``Placeholder``; nothing runs."""

    module: str
    name: str

    def __call__(self, *args: object, **kwargs: object) -> Placeholder:
        return Placeholder(self.module, self.name, args, kwargs)

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True, eq=False)
class Placeholder:
    """An object of a class wdiff does not know, as inert data: what the pickle would have called and
    applied to it, in order. Compared and hashed by identity (its contents are mutable records)."""

    module: str
    name: str
    args: tuple[object, ...] = ()
    kwargs: dict[str, object] = field(default_factory=dict)
    state: list[object] = field(default_factory=list)  # each BUILD's argument (``__setstate__``)
    items: list[tuple[object, object]] = field(default_factory=list)  # SETITEM(S): dict subclasses
    elements: list[object] = field(default_factory=list)  # APPEND(S)/ADDITEMS: list and set subclasses

    def attributes(self) -> dict[str, object]:
        """The instance attributes BUILD would have set: dict states, and ``(dict, slots)`` pairs as
        ``object.__reduce_ex__`` writes them for classes with ``__slots__``. Non-str names are dropped."""
        out: dict[str, object] = {}
        for state in self.state:
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
            for part in parts:
                if isinstance(part, dict):
                    out.update((k, v) for k, v in part.items() if isinstance(k, str))
        return out

    def __repr__(self) -> str:
        return f"Placeholder({self.module}.{self.name})"


def _under(full: str, prefix: str) -> bool:
    return prefix == "" or full == prefix or full.startswith(prefix + ".")


class _WithPlaceholders(Mapping[tuple[str, str], object]):
    """``allowed``, plus a ``Global`` for every name under one of ``prefixes`` and none of ``refused``."""

    def __init__(
        self, allowed: Mapping[tuple[str, str], object], prefixes: Iterable[str], refused: Iterable[str]
    ) -> None:
        self._allowed = allowed
        self._prefixes = tuple(prefixes)
        self._refused = tuple(refused)

    def __getitem__(self, key: tuple[str, str]) -> object:
        if key in self._allowed:
            return self._allowed[key]
        module, name = key
        full = f"{module}.{name}"
        if any(_under(full, p) for p in self._prefixes) and not any(_under(full, r) for r in self._refused):
            return Global(module, name)
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._allowed)

    def __len__(self) -> int:
        return len(self._allowed)


def with_placeholders(
    allowed: Mapping[tuple[str, str], object], prefixes: Iterable[str], refused: Iterable[str] = ()
) -> Mapping[tuple[str, str], object]:
    """An allowlist for ``restricted_load`` where names under ``prefixes`` become ``Placeholder``s.

    A prefix matches ``module.qualname`` whole or up to a dot: ``"omegaconf"`` covers
    ``omegaconf.dictconfig.DictConfig``, ``"argparse.Namespace"`` that one class only, ``""`` every
    name. Names under ``refused`` stay refused even so; names in ``allowed`` win over both.
    A placeholder is inert whatever its name: ``refused`` only decides which names make a file
    suspicious enough to refuse outright (``os.system`` in a checkpoint is an attack, not data).
    """
    return _WithPlaceholders(allowed, prefixes, refused)


# Names whose only use in a pickle is running code. Under ``with_placeholders(..., prefixes=[""])`` they
# stay refused, so a crafted file gets a clear refusal naming them (not a quiet placeholder).
RUNS_CODE = (
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "importlib",
    "runpy", "code", "codeop", "pickle", "_pickle", "pickletools", "copyreg", "copy_reg", "marshal", "types",
    "ctypes", "_ctypes", "shutil", "socket", "_socket", "io", "_io", "pty", "platform", "webbrowser",
    "multiprocessing", "_posixsubprocess", "threading", "_thread", "asyncio", "signal", "operator",
    "_operator", "functools", "_functools", "itertools", "inspect", "pdb", "bdb", "timeit", "trace",
    "cProfile", "profile", "ssl", "http", "urllib", "ftplib", "smtplib", "xmlrpc", "sqlite3", "zipimport",
    "pkgutil", "site", "setuptools", "pip", "imp", "gc", "weakref", "_weakref", "ast", "dis", "tempfile",
    "glob", "fcntl", "resource", "mmap", "select", "selectors", "tkinter", "logging", "unittest", "doctest",
    "torch.load", "torch.hub", "torch.jit", "torch._C", "torch.ops", "torch._ops", "torch._dynamo",
    "torch.utils.cpp_extension", "torch.storage._load_from_bytes", "torch.serialization", "torch.compile",
    "numpy.load", "numpy.lib.npyio", "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib",
    "dill", "cloudpickle", "joblib", "yaml", "jinja2", "IPython",
)  # fmt: skip


def _check_key(key: object, path: str, budget: list[int]) -> None:
    """Refuse a dict key / set member whose hashing could crash or flood (see the module notes)."""
    kind = type(key)
    if kind is str or kind is bytes or kind is bool or key is None:
        return
    if kind is int:
        if -_HASH_MODULUS < key < _HASH_MODULUS:  # type: ignore[operator]
            return
        raise WdiffError(path, "pickle has a dict key or set member int of over 61 bits")
    if kind is float or kind is complex or kind is tuple:
        budget[0] -= 1
        if budget[0] < 0:
            raise WdiffError(path, f"pickle has over {MAX_COMPOSITE_KEYS} tuple or float dict keys")
        if kind is tuple:
            parts = 0
            todo: list[tuple[object, int]] = [(key, 1)]
            while todo:
                item, depth = todo.pop()
                if type(item) is tuple:
                    if depth > MAX_KEY_DEPTH:
                        raise WdiffError(path, f"pickle has a tuple key nested over {MAX_KEY_DEPTH} deep")
                    todo.extend((x, depth + 1) for x in item)  # type: ignore[union-attr]
                    continue
                parts += 1
                if parts > MAX_KEY_PARTS:
                    raise WdiffError(path, f"pickle has a tuple key of over {MAX_KEY_PARTS} values")
                if type(item) is int and not -_HASH_MODULUS < item < _HASH_MODULUS:  # type: ignore[operator]
                    raise WdiffError(path, "pickle has a dict key or set member int of over 61 bits")
                if type(item) not in (str, bytes, bool, int, float, type(None)):
                    raise WdiffError(path, f"pickle has a tuple key holding a {type(item).__name__}")
        return
    if isinstance(key, (Placeholder, Global)):  # identity hash / two str fields
        return
    # Lists and dicts cannot be hashed anyway; other values are the caller's own records.
    if kind in (list, dict, set, bytearray):
        raise WdiffError(path, f"pickle uses a {kind.__name__} as a dict key or set member")
    if kind is frozenset:
        raise WdiffError(path, "pickle uses a frozenset as a dict key or set member")


# Builtin types a pickle may name as values (``defaultdict(list)``'s default factory, the base class in
# ``copyreg._reconstructor``): kept as names, calling one only makes a Placeholder.
_BUILTIN_TYPE_NAMES = ("object", "list", "dict", "tuple", "int", "float", "str", "bool", "bytes")


# ---- the caller's building blocks: plain containers -------------------------------------------------


def plain_containers(path: str) -> dict[tuple[str, str], Callable[..., object]]:
    """Factories for the builtin types a protocol-2 pickle spells as calls (``torch.save`` writes
    protocol 2: a set is ``builtins.set([...])``, bytes are ``_codecs.encode(text, "latin1")``).

    They rebuild the value from plain data only; keys and members pass the same checks as SETITEMS.
    """
    budget = [MAX_COMPOSITE_KEYS]

    def ordered_dict(items: object = ()) -> dict[object, object]:
        # OrderedDict's own __reduce__ passes no items (they follow as SETITEMS); a list of pairs is
        # what protocol 0 writes.
        out: dict[object, object] = {}
        if not isinstance(items, (list, tuple)):
            raise WdiffError(path, "pickle builds an OrderedDict from something other than a list")
        for pair in items:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise WdiffError(path, "pickle builds an OrderedDict from something other than pairs")
            _check_key(pair[0], path, budget)
            out[pair[0]] = pair[1]
        return out

    def default_dict(default_factory: object = None, items: object = ()) -> dict[object, object]:
        return ordered_dict(items)  # the default factory is a name only: never called

    def members(kind: Callable[[list[object]], object], items: object = ()) -> object:
        if not isinstance(items, (list, tuple)):
            raise WdiffError(path, "pickle builds a set from something other than a list")
        for item in items:
            _check_key(item, path, budget)
        return kind(list(items))

    def encode(text: object, encoding: object = "utf-8") -> bytes:
        # protocol 2's spelling of bytes: latin-1 maps code points 0-255 to the same bytes
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise WdiffError(path, "pickle calls _codecs.encode other than as protocol 2 bytes")
        return text.encode("latin-1")

    def byte_array(data: object = b"", encoding: object = None) -> bytearray:
        if isinstance(data, str) and encoding in ("latin1", "latin-1"):
            return bytearray(data.encode("latin-1"))
        if isinstance(data, bytes) and encoding is None:
            return bytearray(data)
        raise WdiffError(path, "pickle builds a bytearray other than from its bytes")  # not bytearray(n)

    def complex_number(real: object = 0.0, imag: object = 0.0) -> complex:
        if not all(type(x) in (int, float) for x in (real, imag)):
            raise WdiffError(path, "pickle builds a complex number from something other than numbers")
        return complex(real, imag)  # type: ignore[arg-type]

    def reconstructor(cls: object, base: object, state: object = None) -> Placeholder:
        # protocol 0/1's spelling of "a plain object of class cls": a Placeholder like NEWOBJ's
        if not isinstance(cls, Global):
            raise WdiffError(
                path, f"pickle rebuilds an object of {describe(cls)} with copyreg._reconstructor"
            )
        # ``state`` is the value of a builtin base (an int or str subclass); __dict__ follows as BUILD
        return Placeholder(cls.module, cls.name, () if state is None else (state,))

    def empty_bytes(*args: object) -> bytes:
        # protocols 0-2 write b"" as a call of bytes() with no arguments
        if args:
            raise WdiffError(path, "pickle calls bytes() with arguments")  # bytes(n) would allocate n
        return b""

    names = {("builtins", kind): Global("builtins", kind) for kind in _BUILTIN_TYPE_NAMES}
    return {
        **names,
        ("builtins", "bytes"): empty_bytes,
        ("copyreg", "_reconstructor"): reconstructor,
        ("collections", "OrderedDict"): ordered_dict,
        ("collections", "defaultdict"): default_dict,
        ("builtins", "set"): lambda items=(): members(set, items),
        ("builtins", "frozenset"): lambda items=(): members(frozenset, items),
        ("builtins", "bytearray"): byte_array,
        ("builtins", "complex"): complex_number,
        ("_codecs", "encode"): encode,
    }


# ---- the opcode loop ----------------------------------------------------------------------------------


class _Truncated(Exception):
    pass


class _Bad(Exception):
    """A malformed pickle: the message is turned into a WdiffError naming the file and the byte."""


_CAUGHT = (
    _Bad,
    ValueError,  # bad literals, int() past 4300 digits, bad unicode escapes
    TypeError,  # a factory called with the wrong arguments, an unhashable key
    KeyError,
    IndexError,
    AttributeError,
    ArithmeticError,  # OverflowError from floats, ZeroDivisionError
    UnicodeError,
    RuntimeError,  # RecursionError among them
    MemoryError,
    struct.error,
)


def restricted_load(
    data: bytes,
    path: str,
    allowed: Mapping[tuple[str, str], Callable[..., object]] | Mapping[tuple[str, str], object],
    persistent_load: Callable[[object], object] | None = None,
    max_objects: int = MAX_OBJECTS,
) -> object:
    """Read one pickle from ``data`` without running any of its code; see the module notes.

    ``allowed`` maps ``(module, qualname)`` to what a GLOBAL of that name becomes; REDUCE/NEWOBJ/
    INST/OBJ call it with the pickled arguments (NEWOBJ_EX also with keywords). ``persistent_load``
    receives each persistent id (torch: ``("storage", storage_type, key, location, numel)``).
    Every problem with the bytes is a one-line ``WdiffError(path, ...)``; errors the factories raise
    as ``WdiffError`` pass through unchanged.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise WdiffError(path, f"pickle of {len(data)} bytes is over the {MAX_PICKLE_BYTES >> 20} MiB limit")
    machine = _Machine(bytes(data), path, allowed, persistent_load, max_objects)
    try:
        return machine.run()
    except WdiffError:
        raise
    except _Truncated:
        raise WdiffError(path, f"pickle is truncated (ends inside the opcode at byte {machine.at})") from None
    except _CAUGHT as e:
        problem = _one_line(e)
        raise WdiffError(path, f"bad pickle at byte {machine.at}: {problem}") from None


def _one_line(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nesting too deep"
    if isinstance(e, MemoryError):
        return "out of memory"
    try:
        text = str(e)
    except Exception:  # a message that cannot even be shown  # noqa: BLE001
        text = ""
    text = " ".join(text.split())
    text = text if len(text) <= 160 else text[:150] + "..."
    return f"{type(e).__name__}: {text}" if not isinstance(e, _Bad) else text


def describe(value: object) -> str:
    """A short, safe description of a value from a pickle for an error line (never its full repr)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:50]) + f"... ({len(value)} chars)"
    if isinstance(value, (bool, type(None), float)) or (
        type(value) is int and -(10**30) < value < 10**30  # type: ignore[operator]
    ):
        return repr(value)
    if isinstance(value, (Global, Placeholder)):
        return f"{type(value).__name__}({value.module}.{value.name})"
    return f"a {type(value).__name__}"


class _Machine:
    """The pickle virtual machine (``pickletools`` documents every opcode), with no foreign calls."""

    def __init__(
        self,
        data: bytes,
        path: str,
        allowed: Mapping[tuple[str, str], object],
        persistent_load: Callable[[object], object] | None,
        max_objects: int,
    ) -> None:
        self.data = data
        self.path = path
        self.allowed = allowed
        self.persistent_load = persistent_load
        self.objects_left = max_objects
        self.max_objects = max_objects
        self.pos = 0
        self.at = 0  # where the current opcode starts, for error lines
        self.stack: list[object] = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.proto = 0
        self.key_budget = [MAX_COMPOSITE_KEYS]

    # -- reading -------------------------------------------------------------------------------------

    def take(self, n: int) -> bytes:
        if n < 0:
            raise _Bad(f"negative length {n}")
        end = self.pos + n
        if end > len(self.data):
            raise _Truncated  # a length past the end: refused before anything is allocated
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise _Truncated
        chunk = self.data[self.pos : end]
        self.pos = end + 1
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    # -- stack ---------------------------------------------------------------------------------------

    def push(self, value: object) -> None:
        self.objects_left -= 1
        if self.objects_left < 0:
            raise WdiffError(self.path, f"pickle builds over {self.max_objects} objects")
        self.stack.append(value)

    def pop(self) -> object:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Bad("stack underflow")
        return self.stack.pop()

    def top(self) -> object:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Bad("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[object]:
        if not self.marks:
            raise _Bad("no MARK for this opcode")
        depth = self.marks.pop()
        items = self.stack[depth:]
        del self.stack[depth:]
        return items

    def key(self, key: object) -> object:
        _check_key(key, self.path, self.key_budget)
        return key

    # -- names ---------------------------------------------------------------------------------------

    def resolve(self, module: object, name: object) -> object:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Bad("a global whose module or name is not a string")
        if self.proto < 3:  # Python 2 names, mapped as pickle.Unpickler(fix_imports=True) maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return self.allowed[(module, name)]
        except KeyError:
            pass
        shown = f"{module}.{name}"
        shown = shown if len(shown) <= 120 else shown[:110] + "..."
        raise WdiffError(
            self.path,
            f"refuses to unpickle {shown}: not a tensor or plain container (wdiff never runs pickle code)",
        )

    def call(self, func: object, args: object, kwargs: object = None) -> object:
        if not isinstance(args, tuple):
            raise _Bad(f"call arguments are {describe(args)}, not a tuple")
        if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            raise _Bad("keyword arguments are not a dict of names")
        if isinstance(func, Placeholder) or not callable(func):
            # Only what a GLOBAL resolved to can be called; built data never is.
            raise _Bad(f"calls {describe(func)}, which is not a class or function")
        return func(*args, **(kwargs or {}))

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> object:
        ops = _OPS
        data = self.data
        while True:
            self.at = self.pos
            if self.pos >= len(data):
                raise _Truncated
            op = data[self.pos]
            self.pos += 1
            handler = ops[op]
            if handler is None:
                raise _Bad(f"unknown opcode {op:#04x}")
            if handler(self):  # STOP
                if not self.stack:
                    raise _Bad("STOP with an empty stack")
                return self.stack[-1]

    # protocol 0/1 values

    def op_mark(self) -> None:
        self.marks.append(len(self.stack))

    def op_stop(self) -> bool:
        return True

    def op_pop(self) -> None:
        if self.marks and self.marks[-1] == len(self.stack):
            self.marks.pop()  # POP of a MARK, as CPython allows
        else:
            self.pop()

    def op_pop_mark(self) -> None:
        self.pop_mark()

    def op_dup(self) -> None:
        self.push(self.top())

    def op_float(self) -> None:
        self.push(float(self.line()))

    def op_int(self) -> None:
        text = self.line()
        self.push(False if text == b"00" else True if text == b"01" else int(text))

    def op_long(self) -> None:
        text = self.line()
        self.push(int(text[:-1] if text.endswith(b"L") else text))

    def op_none(self) -> None:
        self.push(None)

    def op_persid(self) -> None:
        self.persistent(self.line().decode("ascii"))

    def op_binpersid(self) -> None:
        self.persistent(self.pop())

    def persistent(self, pid: object) -> None:
        if self.persistent_load is None:
            raise _Bad("a persistent id (external data) where none is expected")
        self.push(self.persistent_load(pid))

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.pop()
        self.push(self.call(func, args))

    def op_string(self) -> None:
        text = self.line().rstrip(b"\r")
        if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b'"', b"'"):
            raise _Bad("STRING is not quoted")
        self.push(self.decode_str(codecs.escape_decode(text[1:-1])[0]))

    def decode_str(self, raw: bytes) -> str:
        # Python 2 str: torch.load decodes with utf-8 by default
        return raw.decode("utf-8")

    def op_unicode(self) -> None:
        self.push(self.line().decode("raw-unicode-escape"))

    def op_append(self) -> None:
        value = self.pop()
        self.extend(self.top(), [value])

    def op_appends(self) -> None:
        items = self.pop_mark()
        self.extend(self.top(), items)

    def extend(self, target: object, items: list[object]) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Placeholder):
            target.elements.extend(items)
        else:
            raise _Bad(f"APPEND to {describe(target)}")

    def op_build(self) -> None:
        state = self.pop()
        target = self.top()
        if isinstance(target, Placeholder):
            target.state.append(state)
        elif type(target) in (dict, list, set):
            # Instance attributes of a dict subclass mapped onto dict (OrderedDict._metadata that
            # torch's state_dict carries): not weights, and a plain dict has nowhere to keep them.
            pass
        else:
            raise _Bad(f"BUILD (setting state) on {describe(target)}")

    def op_global(self) -> None:
        module = self.line().decode("utf-8")
        name = self.line().decode("utf-8")
        self.push(self.resolve(module, name))

    def op_stack_global(self) -> None:
        name = self.pop()
        module = self.pop()
        self.push(self.resolve(module, name))

    def op_inst(self) -> None:
        module = self.line().decode("utf-8")
        name = self.line().decode("utf-8")
        func = self.resolve(module, name)
        args = tuple(self.pop_mark())
        self.push(self.call(func, args))

    def op_obj(self) -> None:
        items = self.pop_mark()
        if not items:
            raise _Bad("OBJ without a class")
        self.push(self.call(items[0], tuple(items[1:])))

    def op_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise _Bad("DICT with an odd number of items")
        out: dict[object, object] = {}
        for i in range(0, len(items), 2):
            out[self.key(items[i])] = items[i + 1]
        self.push(out)

    def op_empty_dict(self) -> None:
        self.push({})

    def op_get(self) -> None:
        self.get(int(self.line()))

    def op_binget(self) -> None:
        self.get(self.u8())

    def op_long_binget(self) -> None:
        self.get(self.u32())

    def get(self, index: int) -> None:
        if index not in self.memo:  # an int below 2**32 or refused by put: no hash flooding
            raise _Bad(f"memo entry {describe(index)} was never stored")
        self.push(self.memo[index])

    def op_put(self) -> None:
        self.put(int(self.line()))

    def op_binput(self) -> None:
        self.put(self.u8())

    def op_long_binput(self) -> None:
        self.put(self.u32())

    def op_memoize(self) -> None:
        self.put(len(self.memo))

    def put(self, index: int) -> None:
        if not 0 <= index < 1 << 32:
            raise _Bad(f"memo index {describe(index)} out of range")
        if len(self.memo) >= self.max_objects and index not in self.memo:
            raise WdiffError(self.path, f"pickle memoizes over {self.max_objects} objects")
        self.memo[index] = self.top()

    def op_list(self) -> None:
        self.push(self.pop_mark())

    def op_empty_list(self) -> None:
        self.push([])

    def op_setitem(self) -> None:
        value = self.pop()
        key = self.pop()
        self.set_items(self.top(), [key, value])

    def op_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise _Bad("SETITEMS with an odd number of items")
        self.set_items(self.top(), items)

    def set_items(self, target: object, items: list[object]) -> None:
        if type(target) is dict:
            for i in range(0, len(items), 2):
                target[self.key(items[i])] = items[i + 1]
        elif isinstance(target, Placeholder):
            target.items.extend((items[i], items[i + 1]) for i in range(0, len(items), 2))
        else:
            raise _Bad(f"SETITEM on {describe(target)}")

    def op_tuple(self) -> None:
        self.push(tuple(self.pop_mark()))

    def op_empty_tuple(self) -> None:
        self.push(())

    def op_binfloat(self) -> None:
        self.push(struct.unpack(">d", self.take(8))[0])

    def op_binint(self) -> None:
        self.push(int.from_bytes(self.take(4), "little", signed=True))

    def op_binint1(self) -> None:
        self.push(self.u8())

    def op_binint2(self) -> None:
        self.push(self.u16())

    def op_binstring(self) -> None:
        n = int.from_bytes(self.take(4), "little", signed=True)
        self.push(self.decode_str(self.take(n)))

    def op_short_binstring(self) -> None:
        self.push(self.decode_str(self.take(self.u8())))

    def op_binunicode(self) -> None:
        self.push(self.take(self.u32()).decode("utf-8", "surrogatepass"))

    # protocol 2

    def op_proto(self) -> None:
        proto = self.u8()
        if proto > HIGHEST_PROTOCOL:
            raise _Bad(f"unsupported pickle protocol {proto}")
        self.proto = proto

    def op_newobj(self) -> None:
        args = self.pop()
        cls = self.pop()
        self.push(self.call(cls, args))

    def op_newobj_ex(self) -> None:
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        self.push(self.call(cls, args, kwargs))

    def op_ext(self) -> None:
        # EXT1/2/4 name a global by a number from copyreg's process-wide extension registry; its
        # cache holds live objects, so it is never consulted.
        raise WdiffError(
            self.path,
            "refuses to unpickle a copyreg extension code (EXT opcode): not a tensor or plain container "
            "(wdiff never runs pickle code)",
        )

    def op_tuple1(self) -> None:
        self.push((self.pop(),))

    def op_tuple2(self) -> None:
        b = self.pop()
        a = self.pop()
        self.push((a, b))

    def op_tuple3(self) -> None:
        c = self.pop()
        b = self.pop()
        a = self.pop()
        self.push((a, b, c))

    def op_newtrue(self) -> None:
        self.push(True)

    def op_newfalse(self) -> None:
        self.push(False)

    def op_long1(self) -> None:
        self.push(int.from_bytes(self.take(self.u8()), "little", signed=True))

    def op_long4(self) -> None:
        n = int.from_bytes(self.take(4), "little", signed=True)
        self.push(int.from_bytes(self.take(n), "little", signed=True))

    # protocol 3

    def op_binbytes(self) -> None:
        self.push(self.take(self.u32()))

    def op_short_binbytes(self) -> None:
        self.push(self.take(self.u8()))

    # protocol 4

    def op_short_binunicode(self) -> None:
        self.push(self.take(self.u8()).decode("utf-8", "surrogatepass"))

    def op_binunicode8(self) -> None:
        self.push(self.take(self.u64()).decode("utf-8", "surrogatepass"))

    def op_binbytes8(self) -> None:
        self.push(self.take(self.u64()))

    def op_empty_set(self) -> None:
        self.push(set())

    def op_additems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if type(target) is set:
            for item in items:
                target.add(self.key(item))
        elif isinstance(target, Placeholder):
            target.elements.extend(items)
        else:
            raise _Bad(f"ADDITEMS on {describe(target)}")

    def op_frozenset(self) -> None:
        self.push(frozenset(self.key(item) for item in self.pop_mark()))

    def op_frame(self) -> None:
        size = self.u64()
        if size > len(self.data) - self.pos:
            raise _Truncated  # a frame is only a read-ahead hint; its bytes must be there

    # protocol 5

    def op_bytearray8(self) -> None:
        self.push(bytearray(self.take(self.u64())))

    def op_next_buffer(self) -> None:
        raise _Bad("out-of-band buffer (protocol 5 NEXT_BUFFER) where none is given")

    def op_readonly_buffer(self) -> None:
        self.top()


def _opcode_table() -> list[Callable[[_Machine], Any] | None]:
    m = _Machine
    named: dict[bytes, Callable[[_Machine], Any]] = {
        b"(": m.op_mark, b".": m.op_stop, b"0": m.op_pop, b"1": m.op_pop_mark, b"2": m.op_dup,
        b"F": m.op_float, b"I": m.op_int, b"L": m.op_long, b"N": m.op_none, b"P": m.op_persid,
        b"R": m.op_reduce, b"S": m.op_string, b"V": m.op_unicode, b"a": m.op_append, b"b": m.op_build,
        b"c": m.op_global, b"d": m.op_dict, b"}": m.op_empty_dict, b"e": m.op_appends, b"g": m.op_get,
        b"i": m.op_inst, b"l": m.op_list, b"]": m.op_empty_list, b"o": m.op_obj, b"p": m.op_put,
        b"s": m.op_setitem, b"t": m.op_tuple, b")": m.op_empty_tuple, b"u": m.op_setitems,
        b"G": m.op_binfloat, b"J": m.op_binint, b"K": m.op_binint1, b"M": m.op_binint2,
        b"Q": m.op_binpersid, b"T": m.op_binstring, b"U": m.op_short_binstring, b"X": m.op_binunicode,
        b"h": m.op_binget, b"j": m.op_long_binget, b"q": m.op_binput, b"r": m.op_long_binput,
        b"\x80": m.op_proto, b"\x81": m.op_newobj, b"\x82": m.op_ext, b"\x83": m.op_ext,
        b"\x84": m.op_ext, b"\x85": m.op_tuple1, b"\x86": m.op_tuple2, b"\x87": m.op_tuple3,
        b"\x88": m.op_newtrue, b"\x89": m.op_newfalse, b"\x8a": m.op_long1, b"\x8b": m.op_long4,
        b"B": m.op_binbytes, b"C": m.op_short_binbytes,
        b"\x8c": m.op_short_binunicode, b"\x8d": m.op_binunicode8, b"\x8e": m.op_binbytes8,
        b"\x8f": m.op_empty_set, b"\x90": m.op_additems, b"\x91": m.op_frozenset, b"\x92": m.op_newobj_ex,
        b"\x93": m.op_stack_global, b"\x94": m.op_memoize, b"\x95": m.op_frame,
        b"\x96": m.op_bytearray8, b"\x97": m.op_next_buffer, b"\x98": m.op_readonly_buffer,
    }  # fmt: skip
    table: list[Callable[[_Machine], Any] | None] = [None] * 256
    for code, handler in named.items():
        table[code[0]] = handler
    return table


_OPS = _opcode_table()
