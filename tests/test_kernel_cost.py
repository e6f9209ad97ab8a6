"""The static instruction count of each Triton kernel of a step does not creep up unnoticed.

``benchmarks/kernel_cost.py`` compiles each kernel with its real launch configuration for sm_90
on the CPU (bundled ptxas, no GPU) and counts thread-instructions per element; the figures
committed in ``benchmarks/results/kernel_cost.json`` are the baseline. More than 20 % above it
fails: a change that costs that much should recommit the figures on purpose (run the script with
``--json benchmarks/results/kernel_cost.json``) and say why. A static count is a proxy for the
GPU's time, not a timing; it is deterministic for a given triton, so the margin is for version drift.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 1.2


@pytest.mark.timeout(240)
def test_kernel_instructions_per_element_within_20_percent_of_committed(tmp_path):
    committed = json.loads((ROOT / "benchmarks/results/kernel_cost.json").read_text())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    out = tmp_path / "kernel_cost.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/kernel_cost.py"), "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("step instructions per element: bf16 ")
    now = json.loads(out.read_text())
    assert set(now["kernels"]) == set(committed["kernels"]), (
        "the step launches other kernel variants than benchmarks/results/kernel_cost.json holds: "
        "recommit it with benchmarks/kernel_cost.py --json",
        sorted(now["kernels"]),
        sorted(committed["kernels"]),
    )
    grown = {
        (name, key): (s[key], committed["kernels"][name][key])
        for name, s in now["kernels"].items()
        for key in ("instr_per_element", "fast_path_per_element")
        if s[key] > MARGIN * committed["kernels"][name][key]
    }
    assert not grown, f"thread-instructions per element (now, committed) grew more than 20 %: {grown}"
    for dtype in ("bf16", "fp32", "bf16_whole_kernels", "fp32_whole_kernels"):
        assert now["step"][dtype] <= MARGIN * committed["step"][dtype], (dtype, now["step"], committed["step"])
