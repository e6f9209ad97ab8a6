#!/usr/bin/env bash
# On a CUDA machine, one planned run of about 10 minutes (issue 17):
#   1. the Triton kernels' tests for real (no interpreter), the compile and static-cost tests;
#   2. a per-kernel profile of one step at 1e8 elements, bf16 and fp32 (torch.profiler);
#   3. the targets' timings: 1e9 bf16 and fp32 against fused AdamW, the memory floor (copy_, sum),
#      a Llama-7B-shaped list of 291 tensors each cut to 1/8 against one tensor of the same size.
#   1b. every engine path at world size 1 under NCCL (benchmarks/engine_check.py, issue 15);
#   4. end-to-end tokens/s of the main job's GPT on one GPU, MicroAdam against fused AdamW;
# Writes logs and tables to $OUT (default benchmarks/results). Uses the python3 that holds torch
# and triton; the package is taken from this checkout (PYTHONPATH), nothing is installed.
# SKIP_TESTS=1 / SKIP_BENCH=1 leave a part out; extra arguments go to bench_triton_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# the package as installed maps kernels/ in as microadam_dist.kernels; in a bare checkout, a link does
[ -e microadam_dist/kernels ] || ln -s ../kernels microadam_dist/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
SECONDS=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu_info.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_info.txt"

# 1. tests (~2-3 min)
[ -n "${SKIP_TESTS:-}" ] || timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider --timeout 240 \
  tests/test_triton_kernels.py tests/test_nonfinite.py tests/test_reference.py tests/test_triton_compile.py \
  tests/test_kernel_cost.py -k "not rank" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "[gpu_check] tests done at ${SECONDS}s"

# 1b. every engine path at world size 1 under NCCL (cpu:gloo,cuda:nccl), CPU offload included (~2-3 min)
timeout "${ENGINE_TIMEOUT:-300}" "$PY" benchmarks/engine_check.py 2>&1 | tee "$OUT/engine_check.log" | grep -v "^    "
echo "[gpu_check] engine paths done at ${SECONDS}s"

# 2. per-kernel split of one Triton step at 1e8 elements (~1 min)
timeout 180 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/gpu_kernel_profile.txt" | tail -30
import torch
from torch.profiler import ProfilerActivity, profile
from microadam_dist import MicroAdam
for dtype in (torch.bfloat16, torch.float32):
    p = torch.nn.Parameter(torch.randn(100_000_000, device="cuda", dtype=dtype))
    p.grad = torch.randn_like(p)
    opt = MicroAdam([p], lr=1e-5, backend="triton")
    for _ in range(12):  # the window full
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize()
    print(f"== {dtype}, 1e8 elements, 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    del opt, p
    torch.cuda.empty_cache()
PYEOF
echo "[gpu_check] profile done at ${SECONDS}s"

# 3. timings (~4-5 min): sizes 1e6-1e9 both dtypes, the memory floor, the model-shaped list
[ -n "${SKIP_BENCH:-}" ] || timeout "${BENCH_TIMEOUT:-420}" "$PY" benchmarks/bench_triton_gpu.py \
  --sizes 1e6 1e8 1e9 --repeats 5 --roofline --model llama7b-fsdp8 --out "$OUT/triton_gpu.md" "$@" 2>&1 | tail -25
echo "[gpu_check] timings done at ${SECONDS}s"

# 4. end to end (~1 min): the main job's GPT on one GPU, tokens/s of MicroAdam against fused AdamW
timeout "${TRAIN_TIMEOUT:-240}" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m microadam_dist.train \
  --config configs/main_job.json --fused-adamw --quiet --out "$OUT/gpu_train" 2>&1 | tee "$OUT/gpu_train.log" | tail -6
echo "[gpu_check] all done at ${SECONDS}s"
