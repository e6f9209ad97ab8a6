#!/usr/bin/env python3
"""Static cost of each Triton kernel of a MicroAdam step on sm_90 (H100/H200), with no GPU.

The launches are not described by hand: one real call of ``microadam_blocks_triton_`` at the
default geometry (block 4096, density 1 % so k = 41, window 10 full so 410 window entries, quant
bucket 2048, weight decay 0, as the optimizer's defaults) runs with every kernel of the
``triton_path`` module replaced by a recorder, so each launch's arguments, constexprs and options
(num_warps...) are exactly the entry function's. Each recorded launch is then specialized the way
Triton's JIT specializes it (integer 1 -> constexpr, 16-divisible integers and pointers marked
divisible) and compiled for sm_90 with the ptxas of the triton wheel; cuobjdump (also in the wheel)
gives registers, spills and the SASS, counted like ``../shared/tools/kernel_stats.py`` does.

Thread-instructions per element = static SASS instructions x threads per program / elements per
program (block 4096). It is a proxy for the dynamic count: a runtime loop's body counts once, and
a branch rarely taken counts in full; so ``_compress`` is also compiled without its radix-search
fallback and ``_update`` without its restore branch (their fast paths alone, what nearly every
block runs: ``RARE_BRANCHES``). The last line is the sum over the
kernels of one step, fast paths: ``step instructions per element: bf16 B fp32 F``.

  python benchmarks/kernel_cost.py [--json benchmarks/results/kernel_cost.json] [--arch 90]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("kernel_cost.py compiles the kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microadam_dist.functional import StepConfig  # noqa: E402
from microadam_dist.geometry import geometry_for  # noqa: E402
from microadam_dist.kernels import triton_path  # noqa: E402
from microadam_dist.state import StateLayout  # noqa: E402

BLOCK, DENSITY, WINDOW, BUCKET = 4096, 0.01, 10, 2048
# constexprs that switch off a kernel's rarely taken branch: the radix-search top-k of a block with
# more than 64 candidates, the restore of a step skipped for a non-finite gradient
RARE_BRANCHES = ("RADIX_FALLBACK", "RESTORE")
BLOCKS = 8  # blocks of the recorded parameter (one row): the kernels do not depend on the count
SASS_LINE = re.compile(r"\s+/\*[0-9a-f]{4,}\*/")
OPCODE = re.compile(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)")


class _Recorder:
    """Stands in for one @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def record_step(dtype: torch.dtype, weight_decay: float = 0.0) -> list:
    """The kernel launches of one step at the default geometry, in order: (fn, args, kwargs)."""
    geom = geometry_for((BLOCK * BLOCKS,), BLOCK, BUCKET, DENSITY)
    param = torch.zeros(geom.numel, dtype=dtype)
    grad = torch.zeros(geom.numel, dtype=dtype)
    state = StateLayout(geom, WINDOW).zeros("cpu")
    cfg = StepConfig(
        lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, window_size=WINDOW, step=WINDOW
    )  # step 10: the window is full
    launches: list = []
    # every kernel of every loaded module of the package's kernels (a helper module may launch its own)
    kernels = [
        (mod, name, obj)
        for mod in list(sys.modules.values())
        if getattr(mod, "__name__", "").startswith("microadam_dist.kernels")
        for name, obj in list(vars(mod).items())
        if isinstance(obj, triton.JITFunction)
    ]
    try:
        for mod, name, fn in kernels:
            setattr(mod, name, _Recorder(fn, launches))
        triton_path.microadam_blocks_triton_(geom, 0, geom.num_blocks, param, grad, state, cfg)
    finally:
        for mod, name, fn in kernels:
            setattr(mod, name, fn)
    if not launches:
        raise RuntimeError(
            "microadam_blocks_triton_ launched no kernel of triton_path: kernel_cost.py "
            "records the kernels defined in or imported into that module"
        )
    return launches


def compile_launch(fn, args, kwargs, arch: int):
    """Compile one recorded launch as Triton's JIT would for a GPU of that arch (no GPU needed)."""
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if name not in bound:  # a default argument
            bound[name] = param.default
        value = bound[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, spec = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize, True)
        if ty == "constexpr":  # the integer 1
            signature[name] = "constexpr"
            constexprs[(i,)] = spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    return compiled, options.get("num_warps", 4)


def sass_stats(cubin: bytes) -> dict:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run(
            [os.path.join(bin_dir, "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
        res = subprocess.run(
            [os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    lines = [line for line in sass.splitlines() if SASS_LINE.match(line)]
    ops: dict[str, int] = {}
    for line in lines:
        m = OPCODE.match(line)
        if m:
            ops[m.group(2)] = ops.get(m.group(2), 0) + 1
    reg = re.search(r"REG:(\d+)", res)
    return {
        "regs": int(reg.group(1)) if reg else None,
        "spill_loads": ops.get("LDL", 0),
        "spill_stores": ops.get("STL", 0),
        "sass_instr": len(lines),
        "ops": ops,
    }


def _variant(fn, kwargs) -> str:
    flags = [
        f"{k}={int(v) if isinstance(v, bool) else v}"
        for k, v in kwargs.items()
        if k in fn.arg_names and k not in ("HALF",)
    ]
    return f"{fn.__name__}({', '.join(flags)})"


def measure(arch: int = 90) -> dict:
    """{"kernels": {variant: stats}, "step": {"bf16": x, "fp32": y}} at the default geometry."""
    kernels, step = {}, {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        total = whole = 0.0
        for fn, args, kwargs in record_step(dtype):
            name = _variant(fn, kwargs)
            if name not in kernels:
                compiled, warps = compile_launch(fn, args, kwargs, arch)
                stats = sass_stats(compiled.asm["cubin"])
                stats["num_warps"] = warps
                stats["instr_per_element"] = round(stats["sass_instr"] * warps * 32 / BLOCK, 1)
                # a kernel with a rarely taken fallback branch: its fast path alone as well
                stats["fast_path_per_element"] = stats["instr_per_element"]
                rare = {branch: False for branch in RARE_BRANCHES if branch in fn.arg_names}
                if rare:
                    fast, _ = compile_launch(fn, args, {**kwargs, **rare}, arch)
                    stats["fast_path_per_element"] = round(
                        sass_stats(fast.asm["cubin"])["sass_instr"] * warps * 32 / BLOCK, 1
                    )
                kernels[name] = stats
            total += kernels[name]["fast_path_per_element"]
            whole += kernels[name]["instr_per_element"]
        step[label] = round(total, 1)
        step[label + "_whole_kernels"] = round(whole, 1)
    return {
        "arch": f"sm_{arch}",
        "triton": triton.__version__,
        "block": BLOCK,
        "k": 41,
        "window_entries": WINDOW * 41,
        "quant_bucket": BUCKET,
        "kernels": kernels,
        "step": step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    a = ap.parse_args()
    r = measure(a.arch)
    print(f"# Static cost of the Triton step's kernels on {r['arch']} (triton {r['triton']}, no GPU)\n")
    print(
        f"Default geometry: block {BLOCK}, k = 41, {WINDOW * 41} window entries (full window of {WINDOW}), "
        f"quant bucket {BUCKET}; launch configuration recorded from microadam_blocks_triton_.\n"
    )
    print(
        "| kernel | warps | registers | spill loads / stores | SASS instructions | thread-instr / element "
        "| fast path only | top opcodes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in r["kernels"].items():
        top = ", ".join(f"{op} {n}" for op, n in sorted(s["ops"].items(), key=lambda kv: -kv[1])[:6])
        print(
            f"| `{name}` | {s['num_warps']} | {s['regs']} | {s['spill_loads']} / {s['spill_stores']} | "
            f"{s['sass_instr']} | {s['instr_per_element']} | {s['fast_path_per_element']} | {top} |"
        )
    print()
    print(
        "Static counts: the body of a loop left at run time counts once. Integer arguments are "
        "specialized as the JIT does (4096 and zero offsets are 16-divisible). Fast path only: "
        "`_compress` compiled without its radix-search branch (RADIX_FALLBACK=False), the branch taken "
        "by a block whose top-k has more than 64 candidates, and `_update` without the restore of a "
        "step skipped for a non-finite gradient (RESTORE=False); the step line sums the fast paths, the "
        f"whole kernels sum to bf16 {r['step']['bf16_whole_kernels']} fp32 {r['step']['fp32_whole_kernels']}.\n"
    )
    print(f"step instructions per element: bf16 {r['step']['bf16']} fp32 {r['step']['fp32']}")
    if a.json:
        for s in r["kernels"].values():
            del s["ops"]
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
