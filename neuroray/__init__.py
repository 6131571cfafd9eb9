"""neuroray: self-supervised pretraining and segmentation of neurons in 3D microscopy, on Ray."""

from neuroray.errors import NeurorayError

__all__ = ["NeurorayError", "__version__"]
__version__ = "0.1.0"
