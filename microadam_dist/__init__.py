"""microadam_dist: MicroAdam, a compressed Adam optimizer, for DeepSpeed ZeRO and PyTorch FSDP."""

from .geometry import Geometry, geometry_for
from .optimizer import DEFAULT_BLOCK_SIZE, DEFAULT_QUANT_BUCKET_SIZE, MicroAdam

__version__ = "0.1.0"
__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_QUANT_BUCKET_SIZE", "Geometry", "MicroAdam", "geometry_for"]
