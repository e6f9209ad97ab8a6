"""microadam-ckpt: inspect, reshard, convert and export MicroAdam checkpoints.

Reads FSDP2 DCP checkpoints, DeepSpeed ZeRO-1/2/3 checkpoints (any world size) and canonical
directories; writes canonical directories (world-size free; what one process, DeepSpeed at any
size and this tool load) and DCP checkpoints (FSDP2 at any size). Output is built in a temporary
directory beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path

import typer

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    canonical_parameter,
    export_adam,
    open_checkpoint,
    write_canonical,
    write_dcp,
)

EXAMPLES = """
Examples:

\b
  microadam-ckpt inspect runs/demo/ckpt/microadam          # a DCP checkpoint of FSDP2
  microadam-ckpt inspect ckpts/global_step100 --verify      # DeepSpeed, every tensor checked
  microadam-ckpt convert ckpts OUT --to single              # DeepSpeed (any size) -> canonical
  microadam-ckpt convert ckpts OUT --to dcp                 # DeepSpeed -> FSDP2 (any size)
  microadam-ckpt convert runs/demo/ckpt/microadam OUT --to deepspeed
  microadam-ckpt reshard ckpts OUT --world-size 8           # DeepSpeed's own layout at 8 ranks
  microadam-ckpt export-adam OUT adamw/                     # dense AdamW moments from the window

\b
Exit status:
  0  done; for inspect --verify: integrity ok, or "unverified" (read and checked, but some bytes
     have no digest: the output says which)
  2  the command line is wrong
  3  a checkpoint cannot be used: damaged, truncated, incomplete, foreign, of another model or
     geometry, an output that exists without --overwrite, or --verify found a problem; the
     message names the file and the problem
"""
EXIT_BAD_CHECKPOINT = 3  # documented above and in the README: the one code for bad input

app = typer.Typer(
    help=__doc__ + EXAMPLES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Target(str, Enum):
    single = "single"
    canonical = "canonical"
    dcp = "dcp"
    deepspeed = "deepspeed"


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(EXIT_BAD_CHECKPOINT)


def _open(path: Path) -> Checkpoint:
    try:
        return open_checkpoint(path)
    except CheckpointError as e:
        _fail(e)


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _write(
    ckpt: Checkpoint, out: Path, to: Target, world_size: int | None, overwrite: bool, shard_size: str, quiet: bool
) -> None:
    started = time.perf_counter()
    try:
        if to == Target.dcp:
            write_dcp(ckpt, out, overwrite=overwrite, progress=not quiet)
            how = "FSDP2 loads it at any world size (dcp.load + set_state_dict; microadam_dist.train --resume)"
        else:
            note = None
            if to == Target.deepspeed:
                note = "for DeepSpeed: microadam_dist.deepspeed_zero.load_checkpoint(engine, DIR) at any world size"
            write_canonical(
                ckpt,
                out,
                world_size=world_size,
                shard_bytes=_parse_size(shard_size),
                overwrite=overwrite,
                progress=not quiet,
                note=note,
            )
            how = note or "one process: microadam_dist.checkpoint.load(model, optimizer, DIR)"
    except CheckpointError as e:
        _fail(e)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    typer.echo(
        f"wrote {out} ({to.value}, {size / 1e9:.3f} GB in {seconds:.1f} s, {size / 1e9 / max(seconds, 1e-9):.2f} "
        f"GB/s); {how}"
    )


@app.command()
def inspect(
    ckpt: Path = typer.Argument(..., help="checkpoint directory (canonical, DCP or DeepSpeed)"),
    verify: bool = typer.Option(False, "--verify", help="read and check every tensor (and file hashes)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """Engine, world size, parameters, hyperparameters, step counts, state bytes; --verify checks integrity."""
    c = _open(ckpt)
    problems: list[str] = []
    steps: dict[int, int] = {}
    unverified: list[str] = []
    if verify:
        try:
            problems += c.verify()  # digests first: tensors of files known to be damaged are not read
            if not problems:
                for name in c.params:
                    _, st = canonical_parameter(c, name)
                    step = -1 if st is None else int(st["step"])
                    steps[step] = steps.get(step, 0) + 1
                unverified = c.unverified()
        except CheckpointError as e:
            problems.append(str(e))
    integrity = "not checked (use --verify)"
    if verify:
        integrity = problems or ("ok" if not unverified else "unverified (no digest covers some bytes)")
    summary = {
        "path": str(ckpt),
        "engine": c.kind,
        "world_size": c.world_size,
        "step": c.step,
        "parameters": len(c.params),
        "elements": sum(_numel(e.shape) for e in c.params.values()),
        "state_bytes": c.state_bytes(),
        "param_groups": c.groups,
        "step_counts": {("no state" if k < 0 else str(k)): v for k, v in sorted(steps.items())} if verify else None,
        "lr_scheduler": c.lr_scheduler is not None,
        "integrity": integrity,
        "unverified": unverified,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
    else:
        typer.echo(
            f"{ckpt}: {c.kind} checkpoint, world size {c.world_size or '-'}, step {c.step}, LR scheduler "
            + ("recorded" if c.lr_scheduler is not None else "not recorded")
        )
        typer.echo(
            f"  {summary['parameters']} parameters, {summary['elements']:,} elements, MicroAdam state "
            f"{summary['state_bytes']:,} bytes ({summary['state_bytes'] / max(1, summary['elements']):.3f} B/param)"
        )
        for i, g in enumerate(c.groups):
            typer.echo(f"  group {i}: " + ", ".join(f"{k}={v}" for k, v in g.items()))
        if verify and not problems:
            typer.echo("  step counts: " + ", ".join(f"{k}: {v}" for k, v in summary["step_counts"].items()))
        typer.echo(f"  integrity: {integrity if isinstance(integrity, str) else 'FAILED'}")
        for p in problems or unverified:
            typer.echo(f"    {p}")
    if problems:
        raise typer.Exit(EXIT_BAD_CHECKPOINT)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@app.command()
def convert(
    ckpt: Path = typer.Argument(..., help="source checkpoint"),
    out: Path = typer.Argument(..., help="output directory (must not exist unless --overwrite)"),
    to: Target = typer.Option(
        ...,
        "--to",
        help="single/canonical: world-size free directory; dcp: FSDP2; "
        "deepspeed: canonical for deepspeed_zero.load_checkpoint",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT once the new one is complete"),
    shard_size: str = typer.Option("1GiB", "--shard-size", help="largest safetensors file"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
):
    """Convert a checkpoint to another engine's format."""
    _write(_open(ckpt), out, to, None, overwrite, shard_size, quiet)


@app.command()
def reshard(
    ckpt: Path = typer.Argument(..., help="source checkpoint"),
    out: Path = typer.Argument(..., help="output directory"),
    world_size: int = typer.Option(..., "--world-size", min=1, help="ranks that will load it"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    shard_size: str = typer.Option("1GiB", "--shard-size"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Prepare a checkpoint for WORLD_SIZE ranks of the same engine.

    A DeepSpeed checkpoint becomes DeepSpeed's own layout at WORLD_SIZE ranks (latest, global_stepN/,
    per-rank files, written by DeepSpeed in WORLD_SIZE CPU processes; files beside it such as a
    Trainer's trainer_state.json and RNG states are copied): engine.load_checkpoint and the Trainer's
    resume_from_checkpoint load it. A DCP checkpoint stays DCP (FSDP2 reshards it at load); a
    canonical one stays canonical (world-size free)."""
    c = _open(ckpt)
    if c.kind == "deepspeed":
        from .deepspeed_zero.reshard import reshard_deepspeed

        started = time.perf_counter()
        try:
            reshard_deepspeed(ckpt, out, world_size, overwrite=overwrite)
        except CheckpointError as e:
            _fail(e)
        typer.echo(
            f"wrote {out} (DeepSpeed at {world_size} ranks, {time.perf_counter() - started:.1f} s); "
            "engine.load_checkpoint(DIR) or the Trainer's resume_from_checkpoint loads it"
        )
        return
    _write(c, out, Target.dcp if c.kind == "dcp" else Target.deepspeed, world_size, overwrite, shard_size, quiet)


@app.command("export-adam")
def export_adam_command(
    ckpt: Path = typer.Argument(..., help="source checkpoint"),
    out: Path = typer.Argument(..., help="output directory"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Dense AdamW state (exp_avg = (1-b1) M, exp_avg_sq = (1-b2) S, step = t) rebuilt from the window."""
    c = _open(ckpt)
    try:
        export_adam(c, out, overwrite=overwrite, progress=not quiet)
    except CheckpointError as e:
        _fail(e)
    typer.echo(
        f"wrote {out / 'adamw_state.pt'}: torch.optim.AdamW.load_state_dict format ({len(c.params)} "
        "parameters, numbered in the order of param_names)"
    )


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="microadam-ckpt")
    except (CheckpointError, OSError) as e:  # raised outside a command's own handling: same code
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_CHECKPOINT)


if __name__ == "__main__":
    sys.exit(main())
