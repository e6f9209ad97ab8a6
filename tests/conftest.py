import os
import sys

import torch

# tests import helpers (naive_microadam, dist_utils, ...) that live beside them
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable must
# be set before any kernel is defined (it is read when @triton.jit runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
