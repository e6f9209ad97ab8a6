"""MicroAdam against AdamW (fused, foreach), bitsandbytes' AdamW8bit and torchao's AdamW8bit /
AdamW4bit on CPU: optimizer-state bytes, step time, peak memory of a training step, and per-rank
state and step time under FSDP2 and DeepSpeed ZeRO-2 at 1, 2 and 4 ranks.

Every number is measured in this run, on this machine (no figure is copied from elsewhere):

* state bytes per parameter: exact, the sum of every state tensor's bytes (torchao's quantized
  states through their inner tensors) after one step on a 4096 x 4096 fp32 weight;
* step time: one fp32 parameter of 1e6, 1e7, 1e8 elements (1e9 with --huge), median of --repeats
  steps after warm-up (MicroAdam's window full), each optimizer in its own process;
* peak memory of a training step: the main job's GPT scaled up (4 layers, width 512), 3 steps, the
  peak resident memory during the steps (VmHWM, reset after setup through /proc/self/clear_refs)
  of a fresh process per optimizer, and the same process with no optimizer;
* per rank: the main job's GPT under FSDP2 (fully_shard) and ZeRO-2 (the JSON config path) on 1, 2,
  4 gloo ranks: MicroAdam's state bytes on each rank (must be the total divided by the world size:
  nothing replicated) and the median optimizer step time per rank.

Writes results/baselines.md and results/baselines.png.

    python benchmarks/bench_baselines.py            # ~10 minutes on 2 cores
    python benchmarks/bench_baselines.py --quick    # sizes 1e6-1e7 only, to a temporary folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizers import BASELINES, make, state_bytes  # noqa: E402

from microadam_dist.distributed import destroy_process_group, free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OPTIMIZERS = ["microadam", *BASELINES]
MICROADAM_VARIANTS = {
    "microadam": {},
    "microadam m20": {"window_size": 20},
    "microadam d0.5%": {"density": 0.005},
    "microadam m20 d0.5%": {"window_size": 20, "density": 0.005},
}


# ---- workers run in fresh processes (python bench_baselines.py --worker KIND JSON) ----------------
def worker_step_time(name: str, n: int, repeats: int) -> dict:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = make(name, [p])
    warm = 11 if name.startswith("microadam") and n <= 10**7 else 2
    for _ in range(warm):
        opt.step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _gpt(width=512, layers=4):
    from microadam_dist.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=layers, n_embd=width, n_head=8, block_size=64))


def worker_peak_memory(name: str) -> dict:
    from microadam_dist.data import get_batch, split_corpus

    model = _gpt()
    train, _ = split_corpus()
    opt = make(name, model.parameters(), lr=1e-3) if name != "none" else None
    # the peak from here on: imports and the corpus set the process's earlier peak, the same for all
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    for step in range(3):
        x, y = get_batch(train, 8, 64, torch.Generator().manual_seed(step))
        t = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return {
        "peak_rss": peak_kb * 1024,
        "params": sum(p.numel() for p in model.parameters()),
        "state_bytes": state_bytes(opt) if opt is not None else 0,
        "step_seconds": statistics.median(times[1:]),
    }


def _rank_entry(rank, world, port, engine, out):
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from microadam_dist.data import get_batch, split_corpus

    model = _gpt(width=128, layers=2)
    train, _ = split_corpus()
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from microadam_dist import MicroAdam

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = MicroAdam(model.parameters(), lr=1e-3)
        forward, backward, step, micro = model, (lambda loss: loss.backward()), opt.step, opt
    else:
        import deepspeed

        from microadam_dist import deepspeed_zero

        deepspeed_zero.skip_cpu_shm_build()
        cfg = {
            "train_micro_batch_size_per_gpu": 12 // world,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "optimizer": {"type": "MicroAdam", "params": {"lr": 1e-3}},
        }
        engine_, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        forward, backward, step, micro = engine_, engine_.backward, engine_.step, engine_.basic_optimizer
    times = []
    for s in range(6):
        x, y = get_batch(train, 12, 64, torch.Generator().manual_seed(s))
        share = 12 // world
        loss = forward(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
        backward(loss)
        dist.barrier()
        t = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t)
        if engine == "fsdp2":
            micro.zero_grad(set_to_none=True)
    result = {
        "rank": rank,
        "state_bytes": micro.state_bytes(),
        "step_seconds": statistics.median(times[2:]),
        "params": sum(p.numel() for p in _gpt(width=128, layers=2).parameters()),
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    destroy_process_group()


def worker_per_rank(engine: str, world: int) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        mp.start_processes(
            _rank_entry, args=(world, free_port(), engine, str(out)), nprocs=world, join=True, start_method="spawn"
        )
        return json.loads(out.read_text())


def in_subprocess(kind: str, *args, timeout: float = 1800) -> dict:
    """Run a worker in a fresh interpreter (its own peak memory, no warm caches from others)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(args)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--huge", action="store_true", help="also 1e9 elements (fused AdamW and MicroAdam; ~20 GB)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("worker_args", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = {"step": worker_step_time, "memory": worker_peak_memory, "ranks": worker_per_rank}[args.worker]
        print(json.dumps(fn(*json.loads(args.worker_args))))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [
        "# MicroAdam vs AdamW, 8-bit and 4-bit AdamW on CPU",
        "",
        f"One run on {machine}; each measurement in a fresh process. Not run: see the notes at the end.",
        "",
    ]
    not_run = {}

    # 1. state bytes per parameter, exact, on a 4096 x 4096 weight after one step
    lines += [
        "## Optimizer state, bytes per parameter (4096 x 4096 fp32 weight, after one step)",
        "",
        "| optimizer | bytes / param | vs AdamW |",
        "|---|---|---|",
    ]
    w = torch.nn.Parameter(torch.randn(4096, 4096))
    w.grad = torch.randn_like(w)
    sizes = {}
    for name, extra in [*MICROADAM_VARIANTS.items(), *((o, {}) for o in OPTIMIZERS[1:])]:
        try:
            opt = make(name.split(" ")[0], [w], **extra)
            opt.step()
            sizes[name] = state_bytes(opt) / w.numel()
            del opt
        except Exception as e:  # noqa: BLE001  (a baseline that does not install or run here)
            not_run[name] = f"{type(e).__name__}: {str(e)[:150]}"
    for name, b in sizes.items():
        lines.append(f"| {name} | {b:.4f} | {b / sizes['adamw_fused']:.3f} |")
    print("\n".join(lines[-len(sizes) - 2 :]), flush=True)

    # 2. step time against size
    ns = [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8]
    times: dict[str, dict[int, dict]] = {}
    for n in ns + ([10**9] if args.huge else []):
        for name in OPTIMIZERS:
            if name in not_run or (n == 10**9 and name not in ("microadam", "adamw_fused")):
                continue
            r = in_subprocess("step", name, n, args.repeats)
            if "error" in r:
                not_run.setdefault(name, r["error"])
                continue
            times.setdefault(name, {})[n] = r
            print(f"step time {name} n={n:.0e}: {r['median'] * 1e3:.1f} ms", flush=True)
    lines += [
        "",
        f"## Optimizer step time, one fp32 parameter (median of {args.repeats} steps, ms; ratio to fused AdamW)",
        "",
        "| optimizer | " + " | ".join(f"{n:.0e}" for n in sorted({n for t in times.values() for n in t})) + " |",
        "|---|" + "---|" * len({n for t in times.values() for n in t}),
    ]
    all_ns = sorted({n for t in times.values() for n in t})
    for name, by_n in times.items():
        cells = []
        for n in all_ns:
            if n in by_n:
                base = times["adamw_fused"].get(n)
                ratio = f" ({by_n[n]['median'] / base['median']:.1f}x)" if base else ""
                cells.append(f"{by_n[n]['median'] * 1e3:.1f}{ratio}")
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    # 3. peak memory of a training step
    lines += [
        "",
        "## A training step of a GPT (4 layers, width 512; batch 8 x 64), peak process memory",
        "",
        "| optimizer | peak RSS (MiB) | above no optimizer (MiB) | state bytes / param | step (fwd+bwd+opt) ms |",
        "|---|---|---|---|---|",
    ]
    base = in_subprocess("memory", "none")
    lines.append(
        f"| none (forward + backward only) | {base['peak_rss'] / 2**20:.0f} | 0 | 0 | "
        f"{base['step_seconds'] * 1e3:.0f} |"
    )
    mem = {}
    for name in OPTIMIZERS:
        if name in not_run:
            continue
        r = in_subprocess("memory", name)
        if "error" in r:
            not_run.setdefault(name, r["error"])
            continue
        mem[name] = r
        lines.append(
            f"| {name} | {r['peak_rss'] / 2**20:.0f} | {(r['peak_rss'] - base['peak_rss']) / 2**20:.0f} | "
            f"{r['state_bytes'] / r['params']:.3f} | {r['step_seconds'] * 1e3:.0f} |"
        )
        print(lines[-1], flush=True)

    # 4. per rank, FSDP2 and ZeRO-2
    lines += [
        "",
        "## Per rank: the main job's GPT (2 layers, width 128), MicroAdam",
        "",
        "| engine | world size | state bytes per rank | total | total / one process | step seconds per rank (median) |",
        "|---|---|---|---|---|---|",
    ]
    scaling = {}
    for engine in ("fsdp2", "zero2"):
        for world in (1, 2, 4):
            r = in_subprocess("ranks", engine, world)
            if isinstance(r, dict) and "error" in r:
                not_run[f"{engine} x{world}"] = r["error"]
                continue
            total = sum(x["state_bytes"] for x in r)
            scaling[(engine, world)] = (total, [x["state_bytes"] for x in r], max(x["step_seconds"] for x in r))
            one = scaling.get((engine, 1), (total,))[0]
            lines.append(
                f"| {engine} | {world} | {', '.join(f'{x:,}' for x in scaling[(engine, world)][1])} | "
                f"{total:,} | {total / one:.4f} | {scaling[(engine, world)][2]:.4f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "Per-rank state is the total divided by the world size up to the block and segment bookkeeping "
        "(8 bytes of step counter per parameter piece, and blocks owned by the rank holding their first "
        "element); nothing is replicated. With 2 cores, 4 ranks oversubscribe the CPU: per-rank step times at "
        "4 ranks measure contention, not scaling.",
    ]
    if not_run:
        lines += ["", "## Not run", ""] + [f"- {k}: {v}" for k, v in not_run.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baselines.md").write_text("\n".join(lines) + "\n")
    plot(args.out / "baselines.png", sizes, times, machine)
    print("\n".join(lines))


def plot(path: Path, sizes: dict, times: dict, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(sizes)
    a.barh(
        names, [sizes[n] for n in names], color=["tab:red" if n.startswith("microadam") else "tab:gray" for n in names]
    )
    a.set(xlabel="optimizer state, bytes per parameter", title="State memory (exact)")
    for i, n in enumerate(names):
        a.text(sizes[n], i, f" {sizes[n]:.2f}", va="center")
    for name, by_n in times.items():
        ns = sorted(by_n)
        b.plot(
            ns,
            [by_n[n]["median"] for n in ns],
            marker="o",
            label=name,
            color="tab:red" if name == "microadam" else None,
        )
    b.set(
        xscale="log",
        yscale="log",
        xlabel="parameters",
        ylabel="seconds per step",
        title=f"Step time on CPU ({machine.split(',')[1].strip()})",
    )
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
