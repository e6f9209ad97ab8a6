"""Worker bodies for tests/test_hf.py: the real HF Trainer and Accelerate on CPU with gloo (imported in
spawned processes only, so pytest collection never imports transformers, accelerate or deepspeed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_AT = 6, 3
GLOBAL_BATCH = 4  # sequences per step at every world size
SEQ = 16
HYPER = dict(lr=1e-2, weight_decay=0.0, window_size=3, density=0.1, block_size=64, quant_bucket_size=16)


def tiny_gpt2():
    """A GPT-2 built from a config (no download); its forward records the training losses."""
    from transformers import GPT2Config, GPT2LMHeadModel

    class Recording(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if self.training:
                self.losses.append(float(out.loss.detach()))
            return out

    torch.manual_seed(0)
    model = Recording(
        GPT2Config(
            vocab_size=64,
            n_positions=SEQ,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    model.losses = []
    return model


def dataset():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (GLOBAL_BATCH * STEPS, SEQ), generator=gen)
    return [{"input_ids": x, "labels": x} for x in ids]


def _trainer(out_dir: str, world: int, engine: str, **extra):
    """A Trainer whose data order does not depend on the world size: a sequential sampler, so the
    global batch of step k is sequences 4k..4k+3 (rank r takes its share of them)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from microadam_dist import MicroAdam

    class Sequential(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = dict(
        output_dir=out_dir,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=HYPER["lr"],
        weight_decay=HYPER["weight_decay"],
        lr_scheduler_type="linear",
        warmup_steps=2,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        remove_unused_columns=False,
        use_cpu=True,
        **extra,
    )
    kwargs = {}
    if engine == "deepspeed":
        cfg = json.loads((ROOT / "configs" / "hf_ds_zero2.json").read_text())  # as shipped
        cfg["optimizer"]["params"].update({k: v for k, v in HYPER.items() if k not in ("lr", "weight_decay")})
        args["deepspeed"] = cfg
    elif engine == "fsdp":  # FSDP2: the Trainer takes an optimizer class and its arguments
        args.update(fsdp="full_shard", fsdp_config={"version": 2, "state_dict_type": "FULL_STATE_DICT"})
        kwargs["optimizer_cls_and_kwargs"] = (MicroAdam, {k: v for k, v in HYPER.items() if k != "lr"})
    import microadam_dist  # noqa: F401  (registers "MicroAdam" for the DeepSpeed config)

    model = tiny_gpt2()
    if engine == "ddp":  # the README's DDP recipe: an optimizer instance, the Trainer's own scheduler
        kwargs["optimizers"] = (MicroAdam(model.parameters(), **HYPER), None)
    trainer = Sequential(model=model, args=TrainingArguments(**args), train_dataset=dataset(), **kwargs)
    return trainer, model


def trainer_run(rank, world, engine, out_dir, resumes):
    """For each of ``resumes`` (None: from scratch, saving every SAVE_AT steps), a Trainer run to STEPS
    steps; writes this rank's training losses and the final weights (``Trainer.save_model``: the
    full weights however they are sharded) under ``out_dir/<i>``."""
    torch.set_num_threads(1)
    results = []
    for i, resume in enumerate(resumes):
        trainer, model = _trainer(f"{out_dir}/{i}/run", world, engine)
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(f"{out_dir}/{i}/final")
        results.append(
            {
                "losses": model.losses,
                "step": trainer.state.global_step,
                "load": getattr(trainer.model_wrapped, "microadam_last_load", None),
            }
        )
    torch.save(results, f"{out_dir}/losses_rank{rank}.pt")


def torch_full_state_dict(rank, world, out_dir):
    """FSDP2 with torch's full state dicts (what accelerate's FULL_STATE_DICT calls): get_state_dict with
    and without cpu_offload, set_state_dict into a fresh run; its next steps equal the run that never
    saved. (Fails on int16 window indices: gloo and NCCL have no int16 collectives.)"""
    import test_fsdp as T
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from microadam_dist import MicroAdam

    model, mesh = T.sharded_model(world)
    opt = MicroAdam(model.parameters(), **T.HP)
    for t in range(3):
        T.inject(model, mesh, t)
        opt.step()
    full = {
        off: get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=off))
        for off in (False, True)
    }
    if rank == 0:  # with cpu_offload only rank 0 holds it
        torch.save(full[True][1], f"{out_dir}/full_optim.pt")
        for name, st in full[False][1]["state"].items():
            assert all(torch.equal(v.cpu(), full[True][1]["state"][name][k]) for k, v in st.items()), name
    model2, mesh2 = T.sharded_model(world)
    opt2 = MicroAdam(model2.parameters(), **T.HP)
    set_state_dict(
        model2,
        opt2,
        model_state_dict=full[False][0],
        optim_state_dict=full[False][1],
        options=StateDictOptions(full_state_dict=True),
    )
    for t in range(3, 5):
        T.inject(model, mesh, t)
        opt.step()
        T.inject(model2, mesh2, t)
        opt2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
