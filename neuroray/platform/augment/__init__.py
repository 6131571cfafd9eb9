"""EM and LM augmentations for 3D crops, paired image / labels / mask, deterministic under a seed.

Contract (one for every transform):

- A :class:`Sample` holds ``image`` [z, y, x] or [C, z, y, x], optional integer ``labels``
  [z, y, x], optional ``mask`` [z, y, x] (bool or integer, e.g. "labels are valid here") and the
  voxel size in nm (z, y, x) when known.
- Images come in as **uint8** (scaled by 1/255) or **float normalised to [0, 1] by the caller**;
  every transform returns a **float32** image. Intensity transforms clip to [0, 1].
- Geometric transforms move image, labels and mask with the same map (image: linear
  interpolation, labels and mask: nearest, so label ids are never mixed). Intensity and artefact
  transforms change the image only; labels and mask stay the same objects.
- Where a geometric transform exposes voxels from outside the crop (misalignment, elastic,
  rescale), image, labels and mask are all **mirrored** at the crop border (half-sample symmetric,
  numpy ``"symmetric"`` / scipy ``"reflect"``). Image and labels therefore stay consistent
  everywhere and no voxel becomes "unknown".
- Inputs are never written to (crops may be read-only views of Ray's shared memory). A
  :class:`Compose` returns arrays that are C-contiguous, writable and share no memory with its
  input; a single transform that decides not to fire returns its input sample unchanged.
- Every random choice comes from the ``np.random.Generator`` passed in, so a seed fixes the output.

Pipelines are built from YAML-style specs (``[{name: flip, p: 0.5}, {name: gaussian_noise,
sigma: 0.05}]``) with :func:`build_pipeline`; :data:`DEFAULT_PIPELINES` names lists for EM, LM and
the MS-Con shared / weak / strong views (:class:`MSConAugmentConfig`).
"""

from neuroray.platform.augment import artefacts, geometric, intensity  # noqa: F401 - registers
from neuroray.platform.augment.base import (
    AUGMENTATIONS,
    AugmentError,
    Sample,
    Transform,
    TransformParams,
    as_float_image,
)
from neuroray.platform.augment.geometric import warp
from neuroray.platform.augment.pipeline import (
    DEFAULT_PIPELINES,
    Compose,
    MSConAugmentConfig,
    PipelineSpec,
    build_pipeline,
    build_transform,
    default_pipeline,
)

__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_PIPELINES",
    "AugmentError",
    "Compose",
    "MSConAugmentConfig",
    "PipelineSpec",
    "Sample",
    "Transform",
    "TransformParams",
    "as_float_image",
    "build_pipeline",
    "build_transform",
    "default_pipeline",
    "warp",
]
