"""Training as a film: one frame per interval showing that interval's change (not the sum), all
frames from the same camera on the same colour scale, so fading colour means learning slowed.

Input is ``frames.safetensors`` (compute writes it with ``frames=True``): per tensor a float32 array
(intervals, cell rows, cell cols) of |W(t+1) - W(t)| pooled with one global factor, like the scene.
Output is ``frames.gif`` and, when imageio finds an ffmpeg encoder (``pip install imageio-ffmpeg``),
``frames.mp4``.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from wdiff._files import atomic_write
from wdiff.detail import read_frames
from wdiff.scene import color
from wdiff.scene.accumulated import TensorInfo
from wdiff.scene.layout import Scene, place_cells
from wdiff.scene.options import SceneOptions

GIF = "frames.gif"
MP4 = "frames.mp4"
SECONDS_PER_FRAME = 0.8
#: Values sampled per frame to place the bottom of the log scale (the top is the exact maximum).
SAMPLE = 20_000


def interval_scenes(frames: dict[str, np.ndarray], scene: Scene, pool: str, factor: int) -> list[Scene]:
    """One scene per interval, laid out like ``scene`` (same tensors, shapes and order)."""
    infos = [TensorInfo(p.name, p.shape) for p in scene.placements]
    counts = {f.shape[0] for f in frames.values()}
    if len(counts) != 1:
        raise ValueError(f"frames disagree on the number of intervals: {sorted(counts)}")
    empty = np.zeros((0, 0), np.float32)
    out = []
    for t in range(counts.pop()):
        grids = [frames[i.name][t] if i.size and i.name in frames else empty for i in infos]
        nonfinite = [int(np.count_nonzero(~np.isfinite(g))) for g in grids]
        out.append(place_cells(infos, factor, pool, grids, nonfinite))  # type: ignore[arg-type]
    return out


def film_scale(
    scenes: Sequence[Scene], options: SceneOptions, sizes: Mapping[str, float] | None = None
) -> color.ColorScale:
    """One colour scale for every frame: the exact maximum over all of them; the bottom of a log
    scale from an even sample of every frame's values. Per tensor: each tensor's maximum over all
    intervals. Relative: each tensor's RMS of W(0) (``sizes``)."""
    count = len(scenes[0].names)
    peaks: tuple[float, ...] = ()
    if options.normalize == "tensor":
        every = np.array([color.tensor_peaks(s.value, s.tensor_index, count) for s in scenes])
        peaks = tuple(float(p) for p in every.max(axis=0))
    elif options.normalize == "relative":
        names = scenes[0].names
        peaks = color.size_peaks(None if sizes is None else [sizes.get(n, 0.0) for n in names], count)
    base = color.ColorScale(
        0.0,
        1.0,
        options.color_scale,
        normalize=options.normalize,
        peaks=peaks,
        quantity="|ΔW| of the interval",
    )
    sample, tops = [], []
    for s in scenes:
        shown = base.relative(s.value, s.tensor_index)
        sample.append(shown[:: max(1, len(s) // SAMPLE)])
        finite = shown[np.isfinite(shown)]
        tops.append(float(finite.max()) if finite.size else 0.0)
    bounds = color.color_scale(np.append(np.concatenate(sample), np.float32(max(tops))), options.color_scale)
    return replace(base, vmin=bounds.vmin, vmax=bounds.vmax)


def _steps_text(steps: Sequence[int | None], t: int) -> str:
    a, b = (steps[t], steps[t + 1]) if len(steps) > t + 1 else (None, None)
    if a is None or b is None:
        return f"interval {t + 1}"
    return f"step {a} → {b}"


def write_film(
    folder: str | os.PathLike[str],
    frames_path: str | os.PathLike[str],
    scene: Scene,
    run_name: str,
    steps: Sequence[int | None],
    options: SceneOptions,
    sizes: Mapping[str, float] | None = None,
) -> list[str]:
    """Write ``frames.gif`` (and ``frames.mp4``) into ``folder``; returns the file names written."""
    from wdiff import _heap, worker
    from wdiff.scene import render
    from wdiff.scene.picture import Picture, render_frames

    folder = Path(folder)
    arrays, pool, factor = read_frames(frames_path, scene.names)
    scenes = interval_scenes(arrays, scene, pool, factor)
    if not scenes:
        return []
    cs = film_scale(scenes, options, sizes)
    title = f"{run_name}: |W(t+1) - W(t)| of one interval"
    picture = Picture.plan(scenes[0], options.size, title, options.views[0])
    pictures: list[np.ndarray] = []
    rendering: collections.deque = collections.deque()  # (frame, its job): at most this one and the next

    def finish_oldest() -> None:
        frame, job = rendering.popleft()
        stamp = _steps_text(steps, len(pictures))
        pictures.append(picture.finish(job.result()[0], frame, cs, stamp=stamp))
        _heap.give_back_memory()  # finishing a frame frees about 50 MiB of matplotlib's arrays

    # The worker's renderer grows by about 300 MiB over the frames: meanwhile this process holds
    # only what it uses (``_warm.tune_process`` keeps freed memory), and the worker drops the renderer
    # after the last frame (``render.release_renderer``) instead of holding it through the encoding.
    _heap.give_back_memory()
    for s in scenes:  # the worker renders each frame while the one before is finished here
        frame = picture.frame(s, cs)
        rendering.append((frame, worker.shared().submit(render_frames, [picture], [frame])))
        if len(rendering) == 2:
            finish_oldest()
    released = worker.shared().submit(render.release_renderer)
    while rendering:
        finish_oldest()
    released.result()
    stack = np.stack(pictures)
    written = [GIF]
    write_gif(folder / GIF, stack)
    if write_mp4(folder / MP4, stack):
        written.append(MP4)
    return written


def write_gif(path: Path, pictures: np.ndarray) -> None:
    """An endlessly looping GIF, ``SECONDS_PER_FRAME`` per frame, written atomically."""
    import imageio.v3 as iio

    data = iio.imwrite("<bytes>", pictures, extension=".gif", duration=int(SECONDS_PER_FRAME * 1000), loop=0)
    with atomic_write(path) as f:
        f.write(data)


def ffmpeg_available() -> bool:
    """Whether imageio can encode video here (the ``imageio-ffmpeg`` package brings ffmpeg)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return True


def write_mp4(path: Path, pictures: np.ndarray) -> bool:
    """H.264 MP4 of the frames when an encoder is available (False when not)."""
    if not ffmpeg_available():
        return False
    import imageio.v3 as iio

    h, w = pictures.shape[1:3]
    even = np.pad(pictures, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p needs even
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    try:
        iio.imwrite(
            tmp,
            even,
            extension=".mp4",
            fps=1 / SECONDS_PER_FRAME,
            codec="libx264",
            macro_block_size=1,
            ffmpeg_log_level="error",
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True
