#!/usr/bin/env python3
"""Regenerate the pictures of docs/gallery.md from the shipped sample runs (dev-only).

    .venv/bin/python scripts/make_gallery.py          # about a minute; needs chromium + chromedriver

Every picture is real wdiff output: ``wdiff.run`` on ``sample_checkpoints/``, the mesh as any PLY
reader sees it (Open3D reads ``mesh.ply`` back), and ``scene.html`` as headless Chromium draws it.
Sizes are kept small so each committed file stays under 300 KB.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import wdiff
from wdiff.scene import SceneOptions, render

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
SAMPLES = ROOT / "sample_checkpoints"


def run(sample: str, out: Path, **options: object) -> Path:
    wdiff.run(SAMPLES / sample, out, scene=SceneOptions(**options))  # type: ignore[arg-type]
    return out


def mesh_picture(ply: Path, target: Path, size: tuple[int, int] = (900, 560)) -> None:
    """``mesh.ply`` read back by Open3D and rendered with its vertex colours (what MeshLab shows)."""
    import open3d as o3d
    from open3d.visualization import rendering

    mesh = o3d.io.read_triangle_mesh(str(ply))
    assert mesh.has_vertex_colors() and len(mesh.triangles) > 0
    points = np.asarray(mesh.vertices)
    camera = render.fit_camera(points, size[0] / size[1], azimuth_deg=40.0, elevation_deg=30.0)
    with render._quiet_native_stdout():
        renderer = rendering.OffscreenRenderer(*size)
    material = rendering.MaterialRecord()
    material.shader = "defaultUnlit"
    renderer.scene.set_background([*render._linear_to_srgb(render.BACKGROUND), 1.0])
    renderer.scene.view.set_post_processing(False)
    renderer.scene.add_geometry("mesh", mesh, material)
    view = renderer.scene.camera
    view.set_projection(
        camera.fov_deg, size[0] / size[1], camera.near, camera.far, rendering.Camera.FovType.Vertical
    )
    view.look_at(camera.center, camera.eye, camera.up)
    image = np.asarray(renderer.render_to_image())[:, :, :3]
    render.save_png(target, np.ascontiguousarray(image))


def browser_picture(html: Path, target: Path) -> None:
    """``scene.html`` in headless Chromium (software WebGL), after one drag to rotate it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--window-size=1000,640",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    service = Service(shutil.which("chromedriver") or "chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(html.as_uri())
        time.sleep(1.0)
        driver.execute_script("window.wdiffViewer.rotate(-12)")
        hit = driver.execute_script(
            "const v = window.wdiffViewer;"
            "for (let y = 250; y < 600; y += 5) for (let x = 300; x < 800; x += 5)"
            "{ const h = v.pick(x, y); if (h) return [x, y]; } return null;"
        )
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = driver.find_element("id", "view")
        ActionChains(driver).move_to_element_with_offset(
            canvas, hit[0] - canvas.size["width"] // 2, hit[1] - canvas.size["height"] // 2
        ).perform()
        time.sleep(0.3)
        target.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        g = run(
            "digits-gpt2", t / "g", size=(960, 600), views=("oblique", "back"), mesh=True, html_points=200_000
        )
        shutil.copy(g / "render.png", IMAGES / "digits-gpt2.png")
        shutil.copy(g / "render-back.png", IMAGES / "digits-gpt2-back.png")
        mesh_picture(g / "mesh.ply", IMAGES / "digits-gpt2-mesh.png")
        browser_picture(g / "scene.html", IMAGES / "digits-gpt2-html.png")
        f = run("digits-gpt2", t / "f", size=(512, 320), frames=True, render=False, html=False)
        shutil.copy(f / "frames.gif", IMAGES / "digits-gpt2-frames.gif")
        b = run("digits-bert-bf16-sharded", t / "b", size=(960, 600))
        shutil.copy(b / "render.png", IMAGES / "digits-bert-bf16.png")
        n = run("digits-bert-bf16-sharded", t / "n", size=(960, 600), normalize="tensor", html=False)
        shutil.copy(n / "render.png", IMAGES / "digits-bert-bf16-per-tensor.png")
    for p in sorted(IMAGES.glob("digits-*")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1000:.0f} KB", file=sys.stderr)


if __name__ == "__main__":
    main()
