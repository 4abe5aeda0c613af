"""The PyTorch script a user would write for the accumulated change of an HF checkpoint folder.

Per tensor, lazily (``safe_open(framework="pt")``), ``(w - prev).abs_()`` accumulated in float32 with
torch's own threaded kernels; the maps saved with ``safetensors.torch.save_file``:

    python benchmarks/torch_script.py RUN_DIR -o acc.safetensors

Reads ``checkpoint-N/`` folders (single file or sharded with ``model.safetensors.index.json``) in step
order. A peer of ``benchmarks/naive.py`` (numpy, whole checkpoints) for ``benchmarks/llm_bf16.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def files_of(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sum_t |W(t+1) - W(t)| with torch, per tensor")
    ap.add_argument("run", type=Path, help="an HF Trainer output dir (checkpoint-N/ folders)")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    folders = sorted(args.run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    where = [files_of(f) for f in folders]
    acc: dict[str, torch.Tensor] = {}
    for name in where[0]:
        prev = None
        for files in where:
            with safe_open(str(files[name]), framework="pt") as f:
                w = f.get_tensor(name).float()
            if prev is not None:
                d = (w - prev).abs_()
                if name in acc:
                    acc[name] += d
                else:
                    acc[name] = d
            prev = w
    save_file(acc, args.out)


if __name__ == "__main__":
    main()
