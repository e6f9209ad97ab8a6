"""The main job: a small GPT trained on CPython's bundled documentation, MicroAdam beside AdamW.

    python -m microadam_dist.train                     # one process, both optimizers
    torchrun --nproc-per-node 2 -m microadam_dist.train # FSDP2 (fully_shard) on 2 ranks
    torchrun --nproc-per-node 2 -m microadam_dist.train --engine deepspeed   # DeepSpeed ZeRO-2

Every run sees the same global batches whatever the world size (each rank takes its slice), so
runs at different world sizes are comparable step by step. The job prints the loss curves, the
final validation loss, tokens per second and the exact optimizer-state bytes (per rank).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from .checkpoint import TRAIN_META, last_complete, seal, swap_into_place
from .data import get_batch, split_corpus
from .distributed import collective_device, destroy_process_group, init_process_group
from .models import GPT, GPTConfig
from .optimizer import MicroAdam
from .state import state_nbytes


@dataclass
class RunResult:
    name: str
    losses: list[float]
    val_loss: float
    state_bytes: int  # on this rank
    state_bytes_total: int  # all ranks together
    num_params: int  # in the whole model
    seconds: float
    tokens_per_second: float
    engine: str  # how the model was trained, e.g. "FSDP2", "DeepSpeed ZeRO-2"


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state held by this rank (local shards of DTensors), any optimizer."""
    return sum(map(state_nbytes, opt.state.values()))


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def mean_across_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())  # CUDA under NCCL
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def local_slice(x: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    per_rank = x.shape[0] // size
    return x[rank * per_rank : (rank + 1) * per_rank]


def build_model(args, device) -> GPT:
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, block_size=args.context))
    model.to(device)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, args, device, batches: int = 8) -> float:
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = get_batch(data, args.batch_size, args.context, gen)
        losses.append(mean_across_ranks(model(local_slice(x).to(device), local_slice(y).to(device)).item()))
    model.train()
    return sum(losses) / len(losses)


def deepspeed_engine(name: str, model: GPT, args):
    """The model and optimizer under DeepSpeed, from --deepspeed-config with the job's settings:
    the global batch split over the ranks, no accumulation, no clipping or scheduler (the job sets
    the learning rate itself, as for FSDP2), fp32 unless on a GPU. AdamW runs with DeepSpeed's
    elastic checkpoints (so it too resumes at another world size); MicroAdam loads at any size
    through deepspeed_zero.load_checkpoint."""
    import deepspeed

    from . import deepspeed_zero

    cfg = json.loads(Path(args.deepspeed_config).read_text())
    for key in ("scheduler", "train_batch_size"):
        cfg.pop(key, None)
    cfg.update(
        train_micro_batch_size_per_gpu=args.batch_size // world()[1],
        gradient_accumulation_steps=1,
        gradient_clipping=0.0,
        steps_per_print=10**9,
    )
    if not torch.cuda.is_available():
        cfg["bf16"] = {"enabled": False}
    zero = cfg.setdefault("zero_optimization", {"stage": 2})
    if name == "microadam":
        params = {
            **cfg.get("optimizer", {}).get("params", {}),
            "lr": args.lr_microadam,
            "weight_decay": args.weight_decay,
        }
        cfg["optimizer"] = {"type": "MicroAdam", "params": params}
        zero.pop("elastic_checkpoint", None)
    else:
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": args.lr_adamw, "weight_decay": args.weight_decay, "torch_adam": True},
        }
        if zero.get("stage", 0) in (1, 2):
            zero["elastic_checkpoint"] = True
    deepspeed_zero.register_with_torch_optim()
    deepspeed_zero.skip_cpu_shm_build()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def make_optimizer(name: str, model, args):
    if name == "microadam":
        return MicroAdam(model.parameters(), lr=args.lr_microadam, weight_decay=args.weight_decay)
    fused = {"fused": True} if args.fused_adamw else {}  # torch's fused CUDA kernel: the GPU baseline
    return torch.optim.AdamW(model.parameters(), lr=args.lr_adamw, weight_decay=args.weight_decay, **fused)


def save_checkpoint(path: Path, model, opt, meta: dict) -> None:
    """DCP checkpoint (a DeepSpeed one when ``model`` is an engine), written beside ``path`` and
    renamed into place once complete."""
    rank = world()[0]
    partial = path.with_name(path.name + ".partial")
    if rank == 0 and partial.exists():
        shutil.rmtree(partial)
    if dist.is_initialized():
        dist.barrier()
    if opt is None:  # a DeepSpeed engine saves itself
        model.save_checkpoint(str(partial), tag="ckpt")
        if not isinstance(model.basic_optimizer, MicroAdam):
            _save_adamw_full_state(model, partial)
    else:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        seal(partial, meta)  # train_meta.json, then the digests of every file (microadam-ckpt inspect --verify)
        swap_into_place(partial, path)  # a complete checkpoint at path, or for an instant at path.old
    if dist.is_initialized():
        dist.barrier()


def _save_adamw_full_state(engine, directory: Path) -> None:
    """The AdamW baseline under DeepSpeed: full fp32 weights and moments gathered through DeepSpeed's
    own API, so the baseline too can resume at another world size (DeepSpeed refuses, and its
    universal-checkpoint converter needs Megatron's client state)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    full = {}
    for name, p in engine.module.named_parameters():
        full[name] = {
            "fp32": safe_get_full_fp32_param(p).cpu(),
            **{k: safe_get_full_optimizer_state(p, k).cpu() for k in ("exp_avg", "exp_avg_sq")},
        }
    if world()[0] == 0:
        torch.save(full, directory / "adamw_full_state.pt")


def _load_adamw_full_state(engine, directory: Path, step: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    full = torch.load(directory / "adamw_full_state.pt", weights_only=True)
    zero = engine.optimizer
    if not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        raise SystemExit("resuming the AdamW baseline at another world size needs ZeRO-1 or 2")
    base = engine.basic_optimizer
    for flat in zero.single_partition_of_fp32_groups:  # torch's AdamW creates its state lazily
        base.state[flat] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()  # DeepSpeed's fragment views onto the new state
    for name, p in engine.module.named_parameters():
        safe_set_full_fp32_param(p, full[name]["fp32"])
        with torch.no_grad():  # ZeRO-1/2: the module holds every weight (what the next forward uses)
            p.copy_(full[name]["fp32"].to(p.dtype))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, full[name][key], key)
    engine.global_steps = step


def complete_checkpoint(path: Path) -> Path | None:
    """The last complete checkpoint at ``path``: ``path`` itself, or the previous one kept as
    ``path.old`` when a save was interrupted while swapping it in; None if there is none."""
    return last_complete(path, TRAIN_META)


def load_checkpoint(path: Path, model, opt) -> dict:
    path = complete_checkpoint(path) or path
    if not (path / TRAIN_META).exists():
        raise SystemExit(f"{path} is not a complete checkpoint of this job (no train_meta.json)")
    if opt is None:  # a DeepSpeed engine, at any world size
        from .deepspeed_zero import load_checkpoint as load_deepspeed

        meta = json.loads((path / "train_meta.json").read_text())
        if isinstance(model.basic_optimizer, MicroAdam):
            load_deepspeed(model, path)  # any world size
        elif meta["history"][-1]["world_size"] == world()[1]:
            model.load_checkpoint(str(path))
        else:  # DeepSpeed cannot move AdamW's ZeRO state to another world size by itself
            _load_adamw_full_state(model, path, meta["step"])
        return meta
    model_sd, optim_sd = get_state_dict(model, opt)  # templates at this world size
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return json.loads((path / "train_meta.json").read_text())


def train_one(name: str, args, device) -> RunResult:
    if args.engine == "deepspeed":
        torch.manual_seed(args.seed)
        model = deepspeed_engine(
            name,
            GPT(GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, block_size=args.context)),
            args,
        )
        opt, step_opt = None, model.optimizer  # the engine steps; the lr is set on its param groups
    else:
        model = build_model(args, device)
        opt = step_opt = make_optimizer(name, model, args)
    base_lr = args.lr_microadam if name == "microadam" else args.lr_adamw
    start_step, losses, history = 0, [], []
    resume = Path(args.resume) / name if args.resume else None
    if resume is None and args.auto_resume and args.save:
        resume = complete_checkpoint(Path(args.save) / name)  # None on a first start
    if resume is not None:
        meta = load_checkpoint(resume, model, opt)
        start_step, losses, history = meta["step"], meta["losses"], meta["history"]
    history = history + [{"start": start_step, "world_size": world()[1]}]
    train, val = split_corpus()
    stop = min(args.stop_at or args.steps, args.steps)
    start = time.perf_counter()
    bar = tqdm(range(start_step, stop), desc=f"{name:>9}", disable=args.quiet or world()[0] != 0, ncols=100)
    for step in bar:
        # the same schedule for both: linear warm-up, then cosine decay to 0 at --steps
        frac = min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in step_opt.param_groups:
            g["lr"] = base_lr * frac
        # the batch depends only on the step: resumable, and the same at any world size
        x, y = get_batch(train, args.batch_size, args.context, torch.Generator().manual_seed(args.seed * 100003 + step))
        loss = model(local_slice(x).to(device), local_slice(y).to(device))
        if opt is None:
            model.backward(loss)
            model.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(mean_across_ranks(loss.item()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if args.save and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < stop:
            save_checkpoint(
                Path(args.save) / name,
                model,
                opt,
                {"step": step + 1, "losses": losses, "history": history, "args": vars(args)},
            )
    seconds = time.perf_counter() - start
    if args.save:
        save_checkpoint(
            Path(args.save) / name, model, opt, {"step": stop, "losses": losses, "history": history, "args": vars(args)}
        )
    n = sum(p.numel() for p in model.parameters())
    tokens = max(1, stop - start_step) * args.batch_size * args.context
    local_bytes = optimizer_state_bytes(opt if opt is not None else model.basic_optimizer)
    total_bytes = round(mean_across_ranks(local_bytes) * world()[1])
    if opt is None:
        how = f"DeepSpeed ZeRO-{model.zero_optimization_stage()}"
    else:
        how = "FSDP2" if dist.is_initialized() else "one process"
    result = RunResult(
        name,
        losses,
        evaluate(model, val, args, device),
        local_bytes,
        total_bytes,
        n,
        seconds,
        tokens / max(seconds, 1e-9),
        how,
    )
    if opt is None:
        model.destroy()  # DeepSpeed's autograd hooks would keep the engine, and its groups, alive
    if args.out and world()[0] == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"losses_{name}.json").write_text(
            json.dumps({**asdict(result), "history": history, "steps": args.steps, "engine": args.engine})
        )
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config",
        default=None,
        help="JSON file of defaults (keys are these options, with _ for -), e.g. configs/main_job.json",
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--batch-size", type=int, default=12, help="global batch, split across ranks (12: 1, 2, 3, 4 or 6 ranks)"
    )
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument(
        "--engine",
        choices=["fsdp", "deepspeed"],
        default="fsdp",
        help="FSDP2 fully_shard (default) or DeepSpeed ZeRO (--deepspeed-config)",
    )
    ap.add_argument(
        "--deepspeed-config",
        "--deepspeed_config",
        default="configs/ds_zero2.json",
        help="DeepSpeed JSON for --engine deepspeed; batch, lr, clipping and scheduler come from this job",
    )
    ap.add_argument("--optimizers", nargs="+", default=["microadam", "adamw"], choices=["microadam", "adamw"])
    ap.add_argument(
        "--lr-microadam",
        type=float,
        default=2e-3,
        help="tuned for this model on a grid extended until it brackets the best: benchmarks/results/convergence.md",
    )
    ap.add_argument("--lr-adamw", type=float, default=1e-3, help="tuned likewise")
    ap.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True), the baseline on a GPU")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-at", type=int, default=None, help="stop (and --save) before this step")
    ap.add_argument("--save", default=None, help="directory for DCP checkpoints (one per optimizer)")
    ap.add_argument("--resume", default=None, help="checkpoint directory written by --save")
    ap.add_argument("--save-every", type=int, default=0, help="also save every N steps (to --save)")
    ap.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume from --save when it holds a complete checkpoint (for restarted jobs)",
    )
    ap.add_argument("--out", default=None, help="directory for the loss histories (JSON)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed's launcher
    args = ap.parse_args(argv)
    if args.config:
        defaults = json.loads(Path(args.config).read_text())
        unknown = set(defaults) - set(vars(args))
        if unknown:
            raise SystemExit(f"{args.config}: unknown keys {sorted(unknown)}")
        ap.set_defaults(**defaults)
        args = ap.parse_args(argv)  # command-line options still win over the file
    return args


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.engine == "deepspeed"
    if args.engine == "deepspeed" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if distributed and not dist.is_initialized():
        if args.engine == "deepspeed" and "RANK" not in os.environ:  # one process without a launcher
            os.environ.update(
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
            )
        init_process_group()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank, size = world()
    if args.batch_size % size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {size}")
    finished = False
    try:
        results = [train_one(name, args, device) for name in args.optimizers]
        finished = True
    finally:
        if distributed:  # joins the groups' threads: none may outlive the interpreter
            destroy_process_group(barrier=finished)
    if rank == 0:
        report(results, args, size)
    return results


def report(results: list[RunResult], args, size: int) -> None:
    done = len(results[0].losses)
    every = max(1, done // 10)
    print(f"\n{'step':>6} " + " ".join(f"{r.name:>10}" for r in results))
    for s in range(every - 1, done, every):
        window = slice(max(0, s - every + 1), s + 1)
        print(f"{s + 1:>6} " + " ".join(f"{sum(r.losses[window]) / len(r.losses[window]):>10.4f}" for r in results))
    print(
        f"\n{'optimizer':<10} {'val loss':>9} {'state bytes':>12} {'rank 0':>12} {'bytes/param':>12} "
        f"{'tokens/s':>9} {'seconds':>8}   (world size {size}, {results[0].engine})"
    )
    for r in results:
        print(
            f"{r.name:<10} {r.val_loss:>9.4f} {r.state_bytes_total:>12,} {r.state_bytes:>12,} "
            f"{r.state_bytes_total / r.num_params:>12.3f} {r.tokens_per_second:>9.0f} {r.seconds:>8.1f}"
        )


if __name__ == "__main__":
    main()
