"""Generated datasets in the real on-disk formats, all rendered from one procedural 3D scene model.

* :mod:`mult.data.synth.scene`: rooms, cameras and the analytic ray caster (every domain).
* :mod:`mult.data.synth.taskonomy`: Taskonomy and Replica trees (plain and omnidata layouts).
* :mod:`mult.data.synth.nyu`, :mod:`mult.data.synth.cocodoom`: the transfer formats.

``python -m pipelines.synth`` is the command-line entry point.
"""

from mult.data.synth.scene import STYLES, Camera, Rendered, Scene, make_scene, render, sample_camera

__all__ = ["STYLES", "Camera", "Rendered", "Scene", "make_scene", "render", "sample_camera"]
