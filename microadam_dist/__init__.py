"""microadam_dist: MicroAdam, a compressed Adam optimizer, for DeepSpeed ZeRO and PyTorch FSDP.

Importing it is cheap: DeepSpeed, DTensor and Triton are imported only when used.
"""

from .deepspeed_zero import DeepSpeedMicroAdam, register_with_torch_optim
from .geometry import Geometry, geometry_for
from .hyperparams import DEFAULT_BLOCK_SIZE, DEFAULT_QUANT_BUCKET_SIZE
from .optimizer import MicroAdam

# DeepSpeed resolves a JSON "optimizer": {"type": "MicroAdam"} through torch.optim; never raises here
register_with_torch_optim(strict=False)

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_QUANT_BUCKET_SIZE",
    "DeepSpeedMicroAdam",
    "Geometry",
    "MicroAdam",
    "geometry_for",
]
