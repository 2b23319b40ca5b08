"""ds-seg3d: pipelined 3D CNN segmentation of whole CT/MRI volumes with DeepSpeed."""

__version__ = "0.1.0"
