"""Every engine path at world size 1 with the package's own process group: NCCL for CUDA tensors
on a GPU machine (``cpu:gloo,cuda:nccl``, so CPU-offloaded state too has a backend), gloo on CPU.

    python benchmarks/engine_check.py              # every path, each in its own torchrun job
    python benchmarks/engine_check.py --path zero2_offload

Each path trains a small GPT for a few MicroAdam steps, saves and reloads a checkpoint, and must
exit 0 (with no gloo/NCCL thread left at teardown). Paths that need CUDA say so on a CPU machine.
``benchmarks/gpu_check.sh`` runs it on the GPU; its log is ``benchmarks/results/engine_check.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

PATHS = [
    "fsdp2",
    "fsdp2_offload",
    "fsdp1",
    "zero1",
    "zero2",
    "zero3",
    "zero1_offload",
    "zero2_offload",
    "zero3_offload",
    "main_job",
]


def _model(device):
    import torch

    from microadam_dist.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32)).to(device)


def _batches(device, n=4):
    import torch

    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randint(0, 256, (2, 32), generator=gen)
        yield x.to(device), torch.roll(x, -1, 1).to(device)


def run_path(path: str, tmp: str) -> str:
    import torch
    import torch.distributed as dist

    from microadam_dist.distributed import destroy_process_group, gloo_worker_threads, init_process_group

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    init_process_group()
    print(f"process group: {dist.get_backend_config()}, parameters on {device}", flush=True)
    result = _train(path, device, cuda, tmp)  # its models, optimizers and engines are gone after it
    destroy_process_group()
    left = gloo_worker_threads()  # the exit code tells whether the teardown was clean
    return result if not left else f"{result} ({left} gloo threads outlive the teardown: DeepSpeed keeps them)"


def _train(path: str, device, cuda: bool, tmp: str) -> str:
    from microadam_dist import MicroAdam

    if path == "main_job":  # FSDP2 over the group started above, then a resume from its DCP checkpoint
        from microadam_dist import train

        train.main(["--steps", "6", "--stop-at", "3", "--save", f"{tmp}/job", "--quiet", "--optimizers", "microadam"])
        train.main(["--steps", "6", "--resume", f"{tmp}/job", "--quiet", "--optimizers", "microadam"])
    elif path.startswith("fsdp2"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        if path == "fsdp2_offload" and not cuda:
            return "skipped: CPUOffloadPolicy needs a CUDA device"
        model = _model(device)
        mesh = init_device_mesh(device.type, (1,))
        kwargs = {"offload_policy": CPUOffloadPolicy()} if path == "fsdp2_offload" else {}
        for block in model.blocks:
            fully_shard(block, mesh=mesh, **kwargs)
        fully_shard(model, mesh=mesh, **kwargs)
        opt = MicroAdam(model.parameters(), lr=1e-3)
        for x, y in _batches(device):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{tmp}/dcp")
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{tmp}/dcp")
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    elif path == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from microadam_dist import fsdp1

        model = FSDP(_model(device), device_id=device, use_orig_params=False)
        opt = MicroAdam(model.parameters(), lr=1e-3)
        fsdp1.attach(opt, model)
        for x, y in _batches(device):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
        opt.load_state_dict(opt.state_dict())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
        from microadam_dist import deepspeed_zero

        stage = int(path[4])
        zero = {"stage": stage}
        if path.endswith("offload"):
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": zero,
            "bf16": {"enabled": cuda},
            "optimizer": {"type": "MicroAdam", "params": {"lr": 1e-3}},
        }
        engine, *_ = deepspeed_zero.initialize(_model(device), config)
        for x, y in _batches(engine.device):
            engine.backward(engine(x, y))
            engine.step()
        engine.save_checkpoint(f"{tmp}/ds")
        engine.load_checkpoint(f"{tmp}/ds")
        engine.destroy()  # DeepSpeed's autograd hooks hold the engine until then
    return "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", choices=PATHS, default=None, help="run one path in this process (under torchrun)")
    args = ap.parse_args()
    if args.path:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_path(args.path, tmp)
        print(f"RESULT {args.path}: {result}", flush=True)
        sys.exit(0 if not result.startswith("FAILED") else 1)
    from microadam_dist.distributed import torchrun_command

    failures = 0
    for path in PATHS:
        start = time.perf_counter()
        cmd = torchrun_command(1, ["--path", path])
        cmd[cmd.index("-m", 3) : cmd.index("-m", 3) + 2] = [os.path.abspath(__file__)]  # a script, not a module
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        result = next(
            (line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("RESULT")),
            f"FAILED (exit {proc.returncode})",
        )
        if proc.returncode != 0 and not result.startswith("FAILED"):
            result = f"FAILED (exit {proc.returncode} after: {result})"
        failures += result.startswith("FAILED")
        print(f"{path:<15} {result}  ({time.perf_counter() - start:.0f} s)", flush=True)
        if result.startswith("FAILED"):
            print("\n".join("    " + line for line in (proc.stdout + proc.stderr).splitlines()[-25:]), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
