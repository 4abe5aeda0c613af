"""A stand-in for a training run that saves checkpoints like the HF Trainer, for ``test_watch.py``.

    python tests/live_writer.py ROOT --steps 10 20 30 --limit 2 --pause 1.0 --seed 3

Each ``checkpoint-<step>/`` is written the visible, non-atomic way the Trainer writes it: the weights
in pieces (the file grows), then ``optimizer.pt``, then ``trainer_state.json`` last; then the oldest
folders beyond ``--limit`` are deleted (``save_total_limit``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from factories import random_sequence, save  # noqa: E402

SHAPES = {"layers.0.w": (64, 48), "layers.0.b": (48,), "layers.1.w": (48, 16)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    seq = random_sequence(SHAPES, len(args.steps), seed=args.seed)
    history = []
    for step, tensors in zip(args.steps, seq):
        folder = args.root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        scratch = save(args.root / f".scratch-{step}", tensors)  # the bytes, written below in pieces
        data = scratch.read_bytes()
        scratch.unlink()
        with open(folder / "model.safetensors", "wb") as f:
            for k in range(4):
                f.write(data[k * len(data) // 4 : (k + 1) * len(data) // 4])
                f.flush()
                time.sleep(args.pause / 8)
        (folder / "optimizer.pt").write_bytes(b"PK\x03\x04" + b"\0" * 1000)
        history.append({"loss": 1.0 / step, "grad_norm": float("nan"), "step": step})
        state = {"global_step": step, "log_history": history}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        kept = sorted((p for p in args.root.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in kept[: -args.limit]:
            shutil.rmtree(old)
        print(f"saved {step}", flush=True)
        time.sleep(args.pause / 2)


if __name__ == "__main__":
    main()
