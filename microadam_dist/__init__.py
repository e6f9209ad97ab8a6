"""microadam_dist: MicroAdam, a compressed Adam optimizer, for DeepSpeed ZeRO and PyTorch FSDP."""

from .geometry import Geometry, geometry_for
from .optimizer import DEFAULT_BLOCK_SIZE, DEFAULT_QUANT_BUCKET_SIZE, MicroAdam
from .deepspeed_zero import DeepSpeedMicroAdam, register_with_torch_optim

# DeepSpeed resolves a JSON "optimizer": {"type": "MicroAdam"} through torch.optim (no deepspeed import)
register_with_torch_optim()

__version__ = "0.1.0"
__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_QUANT_BUCKET_SIZE", "DeepSpeedMicroAdam", "Geometry", "MicroAdam",
           "geometry_for"]
