#!/usr/bin/env bash
# On a CUDA machine: the Triton kernels' tests run for real (no interpreter), then their timings.
# Writes logs and tables to $OUT (default benchmarks/results). Uses the python3 that holds torch
# and triton; the package is taken from this checkout (PYTHONPATH), nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
# the package as installed maps kernels/ in as microadam_dist.kernels; in a bare checkout, a link does
[ -e microadam_dist/kernels ] || ln -s ../kernels microadam_dist/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu_info.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_info.txt"
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider --timeout 200 \
  tests/test_triton_kernels.py tests/test_nonfinite.py tests/test_reference.py tests/test_triton_compile.py -k "not rank" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
# per-kernel split of one Triton step at 1e8 bf16 elements
timeout 120 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/gpu_kernel_profile.txt" | tail -15
import torch
from torch.profiler import ProfilerActivity, profile
from microadam_dist import MicroAdam
p = torch.nn.Parameter(torch.randn(100_000_000, device="cuda", dtype=torch.bfloat16))
p.grad = torch.randn_like(p)
opt = MicroAdam([p], lr=1e-5, backend="triton")
for _ in range(12):
    opt.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
PYEOF
[ -n "${SKIP_BENCH:-}" ] || timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/bench_triton_gpu.py --out "$OUT/triton_gpu.md" "$@" 2>&1 | tail -15
