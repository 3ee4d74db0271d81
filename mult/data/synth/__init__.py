"""Generated datasets in the real on-disk formats, all rendered from one procedural 3D scene model.

* :mod:`~mult.data.synth.styles`: what a dataset's look changes (each dataset's style is its
  entry in :data:`mult.data.datasets.DATASETS`);
* :mod:`~mult.data.synth.scene`, :mod:`~mult.data.synth.camera`: rooms, objects, cameras;
* :mod:`~mult.data.synth.render`: the analytic ray caster (every domain from the same hits);
* :mod:`~mult.data.synth.taskonomy`: Taskonomy and Replica trees (plain and omnidata layouts);
* :mod:`~mult.data.synth.nyu`, :mod:`~mult.data.synth.cocodoom`: the transfer formats.

``python -m pipelines.synth`` is the command-line entry point; each dataset's generator is named
in its table entry.
"""
