"""Worker bodies for tests/test_deepspeed.py: DeepSpeed engines on CPU with gloo (imported in spawned
processes only, so pytest collection never imports deepspeed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# ---- P1: injected gradients ------------------------------------------------------------------------
# Shapes chosen so that flat ZeRO partitions at 2 and 3 ranks cut blocks (straddles), ZeRO-3 pads
# the last rank's slice, and some partitions hold the tail of one parameter and the head of another.
P1_SHAPES = [(9, 150), (700,), (4, 3, 30), (5,), (2, 64), (39,)]
P1_HYPER = dict(
    lr=1e-2,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.1,
    window_size=3,
    density=0.05,
    block_size=64,
    quant_bucket_size=16,
)
P1_STEPS = 5


class Injected(nn.Module):
    """Parameters of P1_SHAPES; forward(grads) = sum(p * g), so d loss / d p = g exactly."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.ps = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen)) for s in P1_SHAPES)

    def forward(self, grads):
        return sum((p * g.to(p.dtype)).sum() for p, g in zip(self.ps, grads))


def p1_grads(step: int) -> list[torch.Tensor]:
    """Gradients with at most 6 significant bits (k / 64, |k| <= 40): their sum over 2 or 3 ranks and
    its division by the world size are exact in fp32 and bf16, so every rank's optimizer sees exactly
    these values whatever DeepSpeed's reduction order, pre-division or communication dtype."""
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randint(-40, 41, s, generator=gen).float() / 64 for s in P1_SHAPES]


def p1_reference(dtype) -> tuple[list[torch.Tensor], dict]:
    """One process, plain MicroAdam on fp32 copies of the (dtype-rounded) initial parameters."""
    from microadam_dist import MicroAdam

    model = Injected()
    params = [p.detach().to(dtype).float().clone().requires_grad_() for p in model.ps]
    opt = MicroAdam(params, **P1_HYPER)
    for t in range(P1_STEPS):
        for p, g in zip(params, p1_grads(t)):
            p.grad = g.clone()
        opt.step()
    sd = opt.state_dict()
    return [p.detach() for p in params], {i: sd["state"][i] for i in range(len(params))}


def ds_config(stage: int, dtype=torch.float32, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    cfg.update(extra)
    return cfg


def _engine(model, cfg, path: str):
    """``path``: "json" (the config's optimizer entry), "helper" (deepspeed_zero.initialize) or
    "client" (a DeepSpeedMicroAdam built by hand, given to deepspeed.initialize, never attached)."""
    import deepspeed

    import microadam_dist.deepspeed_zero as dz

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about 75 s, a C++ compiler)
    # that only its inference path uses; the tests do without it (training goes through gloo).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dz.register_with_torch_optim()
    if path == "json":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine
    cfg = dict(cfg)
    params = cfg.pop("optimizer")["params"]
    if path == "helper":
        engine, *_ = dz.initialize(model, cfg, **params)
    else:
        opt = dz.DeepSpeedMicroAdam(model.parameters(), **params)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def full_fp32_params(engine) -> list[torch.Tensor]:
    """The fp32 master weights, read through DeepSpeed itself: the module's parameters when they are
    fp32 copies of the masters (stage 0-2 in fp32), else ``safe_get_full_fp32_param`` (which
    mis-maps parameters under ``round_robin_gradients`` in DeepSpeed 0.19.8, hence not used there)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        full = None
        if hasattr(p, "ds_id") or p.dtype != torch.float32:
            full = safe_get_full_fp32_param(p)
        out.append((p.detach() if full is None else full).float().cpu().clone())
    return out


def p1_worker(rank, world, cases, out_dir):
    """cases: [(label, stage, dtype, path, extra config)]; saves each run's fp32 master parameters,
    canonical state, wrapper type and how many of this rank's pieces start mid-block."""
    torch.set_num_threads(1)  # 2-3 processes share 2 cores
    from microadam_dist.deepspeed_zero import ZeroEngine, gather_canonical_state

    results = {}
    for label, stage, dtype, path, extra in cases:
        cfg = ds_config(stage, dtype, optimizer={"type": "MicroAdam", "params": dict(P1_HYPER)})
        for key, value in extra.items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        engine = _engine(Injected(), cfg, path)
        opt = engine.basic_optimizer
        for t in range(P1_STEPS):
            loss = engine([g.clone() for g in p1_grads(t)])
            engine.backward(loss)
            engine.step()
        zero_engine = opt.engine
        assert isinstance(zero_engine, ZeroEngine) and zero_engine.zero is not None, label
        straddles = 0
        for part in zero_engine.partitions.values():
            straddles += sum(seg.head()[1] > seg.start for seg in part.segments(opt.param_groups[0]))
        names = [n for n, _ in engine.module.named_parameters()]
        state = gather_canonical_state(opt, by_name=True)
        results[label] = {
            "params": full_fp32_params(engine),
            "state": {names.index(name): st for name, st in state.items()},
            "straddles": straddles,
            "padding": _padding(zero_engine),
            "wrapper": type(engine.optimizer).__name__,
        }
    torch.save(results, f"{out_dir}/p1_rank{rank}.pt")


def _padding(adapter) -> int:
    """Elements of this rank's fp32 partitions that belong to no parameter (alignment padding)."""
    return sum(part.flat.numel() - sum(s.numel for s in part.slices) for part in adapter.partitions.values())


# ---- training a small GPT from configs/ ---------------------------------------------------------
TRAIN_STEPS = 8
MICRO_BATCH = 2
GPT = dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)
TRAIN_HYPER = dict(lr=1e-2, weight_decay=0.01, window_size=4, density=0.05, block_size=256, quant_bucket_size=64)
WARMUP = dict(warmup_min_lr=0.0, warmup_max_lr=TRAIN_HYPER["lr"], warmup_num_steps=3, warmup_type="linear")
CLIP = 1.0


def train_batches(world: int):
    """Per step: the full batch (world * MICRO_BATCH sequences); rank r takes rows r*MICRO_BATCH..."""
    from microadam_dist.data import get_batch, split_corpus

    train, _ = split_corpus()
    gen = torch.Generator().manual_seed(11)
    return [get_batch(train, world * MICRO_BATCH, GPT["block_size"], gen) for _ in range(TRAIN_STEPS)]


def make_gpt():
    from microadam_dist.models import GPT as Model
    from microadam_dist.models import GPTConfig

    torch.manual_seed(0)
    return Model(GPTConfig(**GPT))


def train_reference(world: int, steps: int = TRAIN_STEPS) -> tuple[list[float], list[torch.Tensor]]:
    """One process, plain MicroAdam, fp32, the full batch per step (the mean over the ranks), with
    the configs' gradient clipping and WarmupLR schedule (DeepSpeed's own scheduler class)."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    from microadam_dist import MicroAdam

    model = make_gpt()
    opt = MicroAdam(model.parameters(), **TRAIN_HYPER)
    sched = WarmupLR(opt, **WARMUP)
    losses = []
    for x, y in train_batches(world)[:steps]:
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in model.parameters()]


def config_from_file(name: str, stage: int | None = None, dtype=torch.float32, accumulation: int = 1) -> dict:
    """A shipped config with the tests' batch size, small MicroAdam params and a short warm-up."""
    cfg = json.loads((CONFIGS / name).read_text())
    assert cfg["optimizer"]["type"] == "MicroAdam" and cfg["zero_allow_untested_optimizer"] is True
    cfg["train_micro_batch_size_per_gpu"] = MICRO_BATCH // accumulation
    cfg["gradient_accumulation_steps"] = accumulation
    cfg.pop("train_batch_size", None)
    cfg["optimizer"]["params"].update(TRAIN_HYPER)
    cfg["scheduler"] = {"type": "WarmupLR", "params": dict(WARMUP)}
    cfg["gradient_clipping"] = CLIP
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
    if stage is not None:
        cfg["zero_optimization"]["stage"] = stage
    cfg["steps_per_print"] = 10**9
    return cfg


def _train_steps(engine, rank, batches, accumulation=1):
    """Rank r's share of each full batch, in ``accumulation`` micro-batches; per-step losses."""
    losses = []
    for x, y in batches:
        xs, ys = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        total = 0.0
        for xm, ym in zip(xs.chunk(accumulation), ys.chunk(accumulation)):
            loss = engine(xm, ym)
            engine.backward(loss)
            engine.step()
            total += loss.item() / accumulation
        losses.append(total)
    return losses


def train_worker(rank, world, cases, out_dir):
    """cases: [(label, config file, stage override, dtype, path, accumulation)] -> losses averaged
    over the ranks per step (each rank's loss is the mean over its own sequences)."""
    torch.set_num_threads(1)  # 2-3 processes share 2 cores
    import torch.distributed as dist

    batches = train_batches(world)
    results = {}
    for label, name, stage, dtype, path, accumulation in cases:
        engine = _engine(make_gpt(), config_from_file(name, stage, dtype, accumulation), path)
        losses = torch.tensor(_train_steps(engine, rank, batches, accumulation), dtype=torch.float64)
        dist.all_reduce(losses)
        results[label] = (losses / world).tolist()
    if rank == 0:  # the reference here too, so the pytest process never imports deepspeed
        results["reference"] = train_reference(world)[0]
        torch.save(results, f"{out_dir}/train.pt")


# ---- checkpoints ------------------------------------------------------------------------------------
CKPT_STEPS = 3


def ckpt_worker(rank, world, cases, out_dir):
    """For each case: CKPT_STEPS steps, save, CKPT_STEPS more; a fresh engine loads and redoes them.
    Records both runs' losses and final fp32 master parameters (they must be bitwise equal)."""
    torch.set_num_threads(1)  # 2-3 processes share 2 cores
    batches = train_batches(world)
    results = {}
    for label, name, stage, dtype in cases:
        cfg = config_from_file(name, stage, dtype)
        engine = _engine(make_gpt(), cfg, "json")
        first = _train_steps(engine, rank, batches[:CKPT_STEPS])
        engine.save_checkpoint(f"{out_dir}/{label}", tag="t")
        cont = _train_steps(engine, rank, batches[CKPT_STEPS:])
        params_cont = full_fp32_params(engine)
        torch.manual_seed(1234)  # the fresh model's initial values must not matter
        engine2 = _engine(make_gpt(), cfg, "json")
        engine2.load_checkpoint(f"{out_dir}/{label}", tag="t")
        resumed = _train_steps(engine2, rank, batches[CKPT_STEPS:])
        results[label] = {
            "first": first,
            "cont": cont,
            "resumed": resumed,
            "params_cont": params_cont,
            "params_resumed": full_fp32_params(engine2),
        }
    torch.save(results, f"{out_dir}/ckpt_rank{rank}.pt")


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test checks the type and the message
        return type(e).__name__, str(e)
    return None


def load_elsewhere_worker(rank, world, cases, out_dir):
    """Load checkpoints saved at another world size, through the engine and directly through the
    ZeRO optimizer (bypassing the engine's check): record the error of each."""
    torch.set_num_threads(1)  # 2-3 processes share 2 cores
    results = {}
    for label, name, stage, dtype in cases:
        cfg = config_from_file(name, stage, dtype)
        engine = _engine(make_gpt(), cfg, "json")
        results[label, "engine"] = _error(lambda: engine.load_checkpoint(f"{out_dir}/{label}", tag="t"))
        files = sorted(Path(out_dir, label, "t").glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
        if files:
            saved = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
            results[label, "direct"] = _error(
                lambda: engine.optimizer.load_state_dict(
                    [saved], load_optimizer_states=True, load_from_fp32_weights=True
                )
            )
    torch.save(results, f"{out_dir}/elsewhere_rank{rank}.pt")


def disagreeing_layout_worker(rank, world, out_dir):
    """Save a ZeRO-2 checkpoint, then make only rank 1's layout description differ from its run
    (the same pieces listed in another order, which every reader still accepts), and resume
    through deepspeed_zero.load_checkpoint: rank 0 alone would take DeepSpeed's own load, rank 1
    the resharded one; the ranks must agree on one. Records the branch taken and both runs."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    import microadam_dist.deepspeed_zero as dz
    from microadam_dist.zero_layout import LAYOUT_KEY

    batches = train_batches(world)
    cfg = config_from_file("ds_zero2.json")
    engine = _engine(make_gpt(), cfg, "json")
    _train_steps(engine, rank, batches[:CKPT_STEPS])
    engine.save_checkpoint(f"{out_dir}/ckpt", tag="t")
    cont = _train_steps(engine, rank, batches[CKPT_STEPS:])
    params_cont = full_fp32_params(engine)
    dist.barrier()
    if rank == 0:
        path = Path(out_dir, "ckpt", "t", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        sd = torch.load(path, map_location="cpu", weights_only=False)
        for info in sd["optimizer_state_dict"]["base_optimizer_state"][LAYOUT_KEY]["partitions"].values():
            assert len(info["pieces"]) > 1
            info["pieces"], info["names"] = info["pieces"][::-1], info["names"][::-1]
        torch.save(sd, path)
    dist.barrier()
    engine2 = _engine(make_gpt(), cfg, "json")
    dz.load_checkpoint(engine2, f"{out_dir}/ckpt")
    resumed = _train_steps(engine2, rank, batches[CKPT_STEPS:])
    torch.save(
        {
            "load": engine2.microadam_last_load,
            "cont": cont,
            "resumed": resumed,
            "params_cont": params_cont,
            "params_resumed": full_fp32_params(engine2),
        },
        f"{out_dir}/disagree_rank{rank}.pt",
    )
