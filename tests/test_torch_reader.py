"""PyTorch files read without running pickle code: the restricted unpickler and the torch.save reader.

torch (a test-only dependency) makes real files in tmp_path; every tensor wdiff locates is decoded
from its byte range and compared bit for bit with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import pickle

import pytest

from wdiff.errors import WdiffError
from wdiff.readers.pickle import Placeholder, plain_containers, restricted_load, with_placeholders


class _Evil:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


@pytest.mark.parametrize("protocol", range(6))
def test_plain_values_round_trip(protocol: int) -> None:
    obj = {
        "a": [1, 2.5, "x", b"by", None, True, (1, 2), -(2**40)],
        "s": {1, 2},
        "f": frozenset({"q"}),
        "od": collections.OrderedDict(x=1),
        "big": 2**100,
        "ba": bytearray(b"zz"),
        "c": 1 + 2j,
        "dd": collections.defaultdict(list, {"k": [1]}),
    }
    got = restricted_load(pickle.dumps(obj, protocol=protocol), "f.pkl", plain_containers("f.pkl"))
    assert got == {**obj, "od": {"x": 1}, "dd": {"k": [1]}}


@pytest.mark.parametrize("protocol", range(6))
def test_placeholders_record_without_calling(protocol: int) -> None:
    hparams = argparse.Namespace(lr=0.1, out=pathlib.PurePosixPath("/x"))
    allowed = with_placeholders(plain_containers("f.pkl"), ["argparse.Namespace", "pathlib"])
    got = restricted_load(pickle.dumps({"h": hparams}, protocol=protocol), "f.pkl", allowed)
    assert isinstance(got, dict) and isinstance(got["h"], Placeholder)
    assert (got["h"].module, got["h"].name) == ("argparse", "Namespace")
    attrs = got["h"].attributes()
    assert attrs["lr"] == 0.1 and isinstance(attrs["out"], Placeholder)
    assert attrs["out"].args == ("/", "x")


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize(
    "func, args, shown",
    [
        (os.system, ("touch CANARY",), "posix.system"),
        (exec, ("open('CANARY', 'w')",), "builtins.exec"),
        (eval, ("open('CANARY', 'w')",), "builtins.eval"),
        (getattr, ("abc", "upper"), "builtins.getattr"),
        (__import__, ("os",), "builtins.__import__"),
    ],
)
def test_code_is_refused(tmp_path, monkeypatch, protocol, func, args, shown) -> None:
    monkeypatch.chdir(tmp_path)
    data = pickle.dumps(_Evil(func, *args), protocol=protocol)
    with pytest.raises(WdiffError, match=rf"^f\.pkl: refuses to unpickle {shown}: ") as e:
        restricted_load(data, "f.pkl", with_placeholders(plain_containers("f.pkl"), ["argparse"]))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "CANARY").exists()
