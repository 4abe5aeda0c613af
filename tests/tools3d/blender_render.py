"""Render ``points.ply`` in Blender (bpy, headless, Cycles on the CPU) with its own colours, the way
docs/user-guide.md tells a Blender user to do it by hand (tests/test_ply_tools.py checks the picture
shows the file's colours; the guide's picture docs/images/blender-points.png is made with it):

    .venv-3d/bin/python tests/tools3d/blender_render.py OUT/points.ply docs/images/blender-points.png
    .venv/bin/python -c "from PIL import Image; p = 'docs/images/blender-points.png';
        Image.open(p).quantize(256, dither=Image.Dither.NONE).save(p, optimize=True)"   # 440 -> 216 KB

1. File > Import > Stanford PLY with Up Axis Y, Forward Axis -Z (wdiff's scene is y-up, Blender's z-up).
2. A Geometry Nodes modifier "Mesh to Points": the file's vertices have no faces, which Cycles and
   EEVEE do not draw; as points (spheres of half a cell) they render, and keep every attribute.
3. A material whose colour is an Attribute node reading ``Col`` (the file's colours; ``quality`` or
   ``scalar_accumulated`` instead give the value, through a Color Ramp), into an Emission shader so the
   colours come out as written (view transform Standard, not AgX).
The camera looks from the same side as wdiff's ``render.png`` (oblique view).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import bpy
import numpy as np
from mathutils import Vector

AZIMUTH_DEG, ELEVATION_DEG, FOV_DEG = 38.0, 24.0, 20.0  # wdiff.scene.render's oblique view
BACKGROUND_SRGB = (0.086, 0.090, 0.110)  # wdiff.scene.render.BACKGROUND


def srgb_to_linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def points_modifier(ob: bpy.types.Object, radius: float, material: bpy.types.Material) -> None:
    tree = bpy.data.node_groups.new("wdiff points", "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    nodes, links = tree.nodes, tree.links
    given, result = nodes.new("NodeGroupInput"), nodes.new("NodeGroupOutput")
    to_points = nodes.new("GeometryNodeMeshToPoints")
    to_points.inputs["Radius"].default_value = radius
    set_material = nodes.new("GeometryNodeSetMaterial")
    set_material.inputs["Material"].default_value = material
    links.new(given.outputs["Geometry"], to_points.inputs["Mesh"])
    links.new(to_points.outputs["Points"], set_material.inputs["Geometry"])
    links.new(set_material.outputs["Geometry"], result.inputs["Geometry"])
    modifier = ob.modifiers.new("wdiff points", "NODES")
    modifier.node_group = tree


def colour_material(attribute: str = "Col") -> bpy.types.Material:
    material = bpy.data.materials.new("wdiff colours")
    nodes, links = material.node_tree.nodes, material.node_tree.links
    nodes.clear()
    read = nodes.new("ShaderNodeAttribute")
    read.attribute_type = "GEOMETRY"
    read.attribute_name = attribute
    emit = nodes.new("ShaderNodeEmission")
    out = nodes.new("ShaderNodeOutputMaterial")
    links.new(read.outputs["Color"], emit.inputs["Color"])
    links.new(emit.outputs["Emission"], out.inputs["Surface"])
    return material


def camera(xyz: np.ndarray, aspect: float) -> bpy.types.Object:
    """A camera from wdiff's oblique direction (converted to Blender's axes) that frames every point."""
    az, el = math.radians(AZIMUTH_DEG), math.radians(ELEVATION_DEG)
    back_y_up = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    back = np.array([back_y_up[0], -back_y_up[2], back_y_up[1]])  # (x, y, z) y-up -> (x, -z, y)
    center = (xyz.min(0) + xyz.max(0)) / 2
    forward = -back
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    tan_v = math.tan(math.radians(FOV_DEG) / 2) * 0.94
    rel = xyz - center
    d = float(
        (rel @ back + np.maximum(np.abs(rel @ right) / (tan_v * aspect), np.abs(rel @ up) / tan_v)).max()
    )
    data = bpy.data.cameras.new("camera")
    data.sensor_fit = "VERTICAL"
    data.angle_y = math.radians(FOV_DEG)
    data.clip_start, data.clip_end = d * 1e-3, d * 10
    cam = bpy.data.objects.new("camera", data)
    cam.location = Vector(center + d * back)
    cam.rotation_euler = Vector(forward).to_track_quat("-Z", "Y").to_euler()
    bpy.context.scene.collection.objects.link(cam)
    return cam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="points.ply")
    parser.add_argument("target", help="the picture (PNG)")
    parser.add_argument("--size", default="900x560", help="WIDTHxHEIGHT in pixels")
    parser.add_argument("--samples", type=int, default=64, help="Cycles samples per pixel")
    args = parser.parse_args(sys.argv[1:])
    source, target, samples = args.source, args.target, args.samples
    size = tuple(int(v) for v in args.size.split("x"))
    start = time.perf_counter()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.wm.ply_import(filepath=source, forward_axis="NEGATIVE_Z", up_axis="Y")
    ob = bpy.context.scene.objects[0]
    n = len(ob.data.vertices)
    xyz = np.empty(n * 3, np.float32)
    ob.data.vertices.foreach_get("co", xyz)
    matrix = np.array(ob.matrix_world)  # the importer may turn the axes with the object, not the data
    xyz = xyz.reshape(-1, 3).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
    points_modifier(ob, radius=0.5, material=colour_material("Col"))

    scene = bpy.context.scene
    scene.camera = camera(xyz, size[0] / size[1])
    world = bpy.data.worlds.new("world")
    background = world.node_tree.nodes["Background"]
    background.inputs["Color"].default_value = (*(srgb_to_linear(c) for c in BACKGROUND_SRGB), 1.0)
    scene.world = world
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    scene.view_settings.view_transform = "Standard"
    scene.render.resolution_x, scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    scene.render.image_settings.compression = 100
    scene.render.filepath = target
    bpy.ops.render.render(write_still=True)
    print(f"{n} points rendered in {time.perf_counter() - start:.1f} s -> {target}")


if __name__ == "__main__":
    main()
