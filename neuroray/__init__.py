"""neuroray: self-supervised pretraining and segmentation of neurons in 3D microscopy, on Ray.

Naming rule for the pydantic models that configure things (one rule, everywhere):

- ``*Job``: everything one command runs, loaded from one YAML file (``FinetuneJob``, ``MAEJob``,
  ``DbMiMJob``, ``MSConJob``, ``SegmentJob``, ``SweepJob``, ``Pretrain2DJob``).
- ``*Settings``: a section of a job that configures how it runs rather than one object it builds
  (``RunSettings``, ``DataSettings``, ``OptimSettings``, ``RaySettings``, ``RLSettings``,
  ``TargetSettings``, ``ValidationSettings``...).
- ``*Config``: the constructor arguments of one component built from it: a network
  (``ViTConfig``, ``MAEConfig``, ``SegmenterConfig``...), a sampler, an augmentation pipeline,
  a synthetic volume.

The layers, what may import what, and where each kind of change goes: docs/ARCHITECTURE.md.
"""

from neuroray.errors import NeurorayError

__all__ = ["NeurorayError", "__version__"]
__version__ = "0.1.0"
