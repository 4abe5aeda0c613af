"""Helpers for the checkpoint kinds beyond plain safetensors: ONNX models built with onnx.helper, PEFT
adapter folders, and one check of a wdiff result against the float64 numpy reference."""

from __future__ import annotations

import filecmp
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from factories import reference, save
from safetensors.numpy import load_file

ONNX_TYPES = {"F32": 1, "F16": 10, "F64": 11, "BF16": 16, "F8_E4M3": 17, "F8_E4M3FNUZ": 18, "F8_E5M2": 19}
ONNX_TYPES |= {"F8_E5M2FNUZ": 20, "F8_E8M0": 24, "I64": 7}


def onnx_tensor(name: str, array: np.ndarray, code: str, typed: bool = False):
    """A TensorProto in raw_data (default) or in the typed fields (float_data / int32_data / double_data)."""
    from onnx import helper

    data_type = ONNX_TYPES[code]
    if not typed:
        return helper.make_tensor(name, data_type, array.shape, array.tobytes(), raw=True)
    if code == "F32":
        vals = array.astype(np.float32).ravel().tolist()
    elif code == "F64":
        vals = array.astype(np.float64).ravel().tolist()
    elif code == "I64":
        vals = array.astype(np.int64).ravel().tolist()
    else:  # FLOAT16 / BFLOAT16 / FLOAT8: bit patterns in int32_data
        bits = np.uint16 if array.dtype.itemsize == 2 else np.uint8
        from onnx import TensorProto

        tensor = TensorProto(name=name, data_type=data_type, dims=array.shape)
        tensor.int32_data.extend(array.view(bits).astype(np.int32).ravel().tolist())
        return tensor
    return helper.make_tensor(name, data_type, array.shape, vals)


def onnx_model(
    path: str | Path,
    weights: Mapping[str, tuple[np.ndarray, str]],
    consumers: Mapping[str, tuple[str, int]] | None = None,
    order: Sequence[str] | None = None,
    typed: bool = False,
    external: str | None = None,
) -> Path:
    """Save a model whose initializers are ``weights`` (name -> (array, dtype code)).

    ``consumers``: name -> (op_type, input index) of the one node reading it (default: an Abs).
    Nodes follow ``order`` (default: the weights' order), which is the graph's topological order.
    ``external``: store every initializer in that external data file beside the model.
    """
    import onnx
    from onnx import helper

    consumers = consumers or {}
    names = list(order or weights)
    nodes, inits, outputs = [], [], []
    for k, name in enumerate(names):
        op, index = consumers.get(name, ("Abs", 0))
        inputs = [f"x{k}"] * (index + 1)
        inputs[index] = name
        nodes.append(helper.make_node(op, inputs, [f"y{k}"], name=f"n{k}"))
        outputs.append(helper.make_tensor_value_info(f"y{k}", onnx.TensorProto.FLOAT, None))
    for name, (array, code) in weights.items():
        inits.append(onnx_tensor(name, array, code, typed))
    inputs = [helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, None) for k in range(len(names))]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="wdiff-tests")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=external, size_threshold=0,
        )  # fmt: skip
    else:
        onnx.save_model(model, str(path))
    return path


def adapter_checkpoint(
    folder: str | Path, tensors: Mapping[str, np.ndarray], config: Mapping, step: int | None = None
) -> Path:
    """A PEFT checkpoint folder: adapter_model.safetensors + adapter_config.json (+ trainer_state)."""
    folder = Path(folder)
    save(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    if step is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def check_against_reference(
    entry: dict, acc: np.ndarray, weights: Sequence[np.ndarray], stored: str = "F32"
) -> None:
    """One tensor's summary entry and accumulated map against the float64 numpy reference. ``stored``:
    how the map was stored (``Results.map_dtype``); a BF16 map holds BF16 values (checked) within
    half a BF16 step (2^-8 of the value) of the reference."""
    ref = reference([{"w": w} for w in weights], "w")
    scale = max(float(np.max(ref["accumulated"], initial=0.0)), 1e-30)
    assert acc.shape == ref["accumulated"].shape and acc.dtype == np.float32
    if stored == "BF16":
        np.testing.assert_array_equal(acc.astype(ml_dtypes.bfloat16).astype(np.float32), acc)
        np.testing.assert_allclose(acc, ref["accumulated"], rtol=2**-8, atol=1e-5 * scale)
    else:
        assert stored == "F32", stored
        np.testing.assert_allclose(acc, ref["accumulated"], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(entry["accumulated_l1"], ref["accumulated"].sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entry["net_l2"], ref["net_l2"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(entry["interval_l2"], ref["interval_l2"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(entry["l2"], ref["l2"], rtol=1e-5, atol=1e-7)


#: what a run writes the same whatever its map's storage (``--map-dtype``): all of it comes from the
#: float32 sums of the one pass
SAME_WHATEVER_THE_MAP = (
    "rows.safetensors", "findings.json", "metrics.csv", "tensors.csv", "points.ply", "scene.html",
)  # fmt: skip


def assert_same_but_the_map(a, b) -> None:
    """Two runs of the same checkpoints that store their maps differently (two ``Results``): every
    other output the same bytes, the same pooled cells, the same summary entries."""
    for name in SAME_WHATEVER_THE_MAP:
        assert filecmp.cmp(a.path / name, b.path / name, shallow=False), name
    cells_a, cells_b = (
        load_file(str(a.path / "pooled.safetensors")),
        load_file(str(b.path / "pooled.safetensors")),
    )
    assert cells_a.keys() == cells_b.keys() and cells_a
    for name, cells in cells_a.items():
        np.testing.assert_array_equal(cells, cells_b[name], err_msg=name)
    assert a.summary["tensors"] == b.summary["tensors"]
