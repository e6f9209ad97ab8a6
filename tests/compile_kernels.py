"""Compile the Triton kernels ahead of time for NVIDIA GPUs (no GPU needed), as the tests' worker.

Triton's interpreter runs the kernels on CPU but checks neither types nor layouts the way the
GPU compiler does; this lowers every kernel variant the path launches to PTX and a cubin for
sm_80 (A100) and sm_90 (H100/H200) with the bundled ptxas, and prints one JSON line per variant.
Must run without TRITON_INTERPRET (the kernels are then real JITFunctions).
"""

import json
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"
from microadam_dist.kernels import densify  # noqa: E402
from microadam_dist.kernels import triton_path as tp  # noqa: E402
from microadam_dist.kernels.launch_table import LAUNCH_OPTIONS  # noqa: E402

# every kernel of the step takes a launch table (int64 rows) and the rectangle of each program
TABLE = {"table_ptr": "*i64", "rect_of_ptr": "*i32"}


def compile_variant(fn, arch, pointer_types, constexprs, scalar_types=None):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = {**pointer_types, **(scalar_types or {})}.get(name, "i32")
    consts = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32), options=dict(LAUNCH_OPTIONS)
    )
    ptx = kernel.asm["ptx"]
    return {
        "kernel": fn.__name__,
        "arch": arch,
        **{k: v for k, v in constexprs.items() if k != "HALF"},
        "cubin_bytes": len(kernel.asm["cubin"]),
        "fma": ptx.count("fma."),
        "div_rn": ptx.count("div.rn.f32"),
    }


def main():
    for arch, blocks in ((90, (64, 4096)), (80, (4096,))):
        for bf16 in (False, True):
            for block in blocks:
                bucket = 16 if block == 64 else 2048  # the tests' and the default geometry
                compress = {
                    "NB": block // bucket,
                    "BS": bucket,
                    "QB": bucket,
                    "GRAD_BF16": bf16,
                    "TOPK_FAST": True,
                    "G": min(128, block),
                    "CAND": 64 if block > 64 else 8,
                    "KP": 64 if block > 64 else 4,
                    "ALIGNED": block > 64,
                    "RADIX_FALLBACK": True,
                }
                print(json.dumps(compile_variant(tp._compress, arch, TABLE, compress)), flush=True)
                for decay in (False, True):
                    update = {"ENTRIES": 512, "PARAM_BF16": bf16, "DECAY": decay, "BLOCK": block, "ALIGNED": True}
                    print(json.dumps(compile_variant(tp._update, arch, TABLE, update)), flush=True)
            # an odd bucket size takes the one-row kernel
            odd = {"BLOCK": 128, "HALF": 64, "QB": 15, "GRAD_BF16": bf16, "KP": 8, "ALIGNED": False}
            print(json.dumps(compile_variant(tp._compress_odd_buckets, arch, TABLE, odd)), flush=True)
            # the densification pass (alpha > 0)
            dens = {"BLOCK": 4096, "HALF": 2048, "QB": 2048, "PARAM_BF16": bf16, "ALIGNED": True}
            print(json.dumps(compile_variant(densify._densify, arch, TABLE, dens)), flush=True)


if __name__ == "__main__":
    main()
