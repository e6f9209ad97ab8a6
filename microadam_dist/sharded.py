"""MicroAdam steps on sharded parameters: the one place where ranks exchange parts of blocks.

A rank holds *segments*: contiguous ranges ``[start, end)`` of a parameter's global flat index
(a slice of a ZeRO flat partition, an FSDP shard). Blocks are owned by the rank that holds their
first element. A segment's *head* (its elements before its first block start) belongs to a
block owned by an earlier rank; its *tail* (the rest of its last owned block) lives on later
ranks. Each step:

  1. every rank all-gathers its heads (gradient and parameter values, fp32);
  2. owners append the tail parts they need and run ``functional.microadam_blocks_`` on their
     owned blocks, exactly as a single process would;
  3. owners all-gather the updated tail values back, and every rank writes its head.

So the result is bitwise the single-process one (spec property P1) for any cut, at the cost of
two small all-gathers (at most ``block_size - 1`` elements per cut). Segments that start and end
on block boundaries (FSDP2 shards of 2-D and larger parameters: whole rows) exchange nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from .distributed import collective_device
from .functional import StepConfig, any_nonzero, microadam_blocks_, nonfinite_flags
from .geometry import Geometry
from .state import StateLayout

# the undo records of a fused step (``SplitStep``) live for one chunk of parameters: at most about
# this many elements per rank (half a byte each for the 4-bit codes)
UNDO_CHUNK_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class SplitStep:
    """A step implementation in two halves around the finiteness decision, so that the gradient
    is read once (the Triton path). Each half takes a list, so that it can batch its launches
    across parameters. ``compress([(geometry, b0, b1, grad, state, cfg, flag), ...])`` writes the
    new window slots and error feedback, sets each ``flag`` (an int32 scalar on the device) whose
    gradient holds a NaN or an infinity, and returns one undo record per item;
    ``update([(geometry, b0, b1, param, state, cfg, flag, undo), ...])`` applies the steps or,
    where the flag is set (by any rank), puts the state back."""

    compress: Callable
    update: Callable


@dataclass
class Segment:
    """Elements [start, start + numel) of parameter ``key`` held by this rank."""

    key: Hashable  # the same on every rank, e.g. the parameter's fully qualified name
    geometry: Geometry
    start: int
    param: torch.Tensor  # 1-D, contiguous, updated in place
    grad: torch.Tensor | None  # 1-D, same length
    group: dict[str, Any]  # lr, betas, eps, weight_decay, window_size (a param group)

    @property
    def end(self) -> int:
        return self.start + self.param.numel()

    def owned_blocks(self) -> tuple[int, int]:
        return self.geometry.owned_blocks(self.start, self.end)

    def state_layout(self) -> StateLayout:
        """The state this segment keeps: that of its owned blocks."""
        return StateLayout(self.geometry, self.group["window_size"], *self.owned_blocks())

    def region(self) -> tuple[int, int]:
        """Global elements [e0, e1) of the owned blocks (may run past ``end``, into the tail)."""
        b0, b1 = self.owned_blocks()
        return self.geometry.block_start(b0)[0], self.geometry.block_start(b1)[0]

    def head(self) -> tuple[int, int]:
        return self.start, min(self.end, self.region()[0])

    def tail_end(self) -> int:
        """End of the elements this rank steps: past ``end`` when its last block runs on."""
        b0, b1 = self.owned_blocks()
        return max(self.end, self.region()[1]) if b1 > b0 else self.end


@dataclass
class _Plan:
    """Who sends what, computed identically on every rank from everyone's segment ranges."""

    send_len: int = 0  # per-rank buffer length of the forward all-gather
    return_len: int = 0  # ... and of the backward one
    my_heads: list = field(default_factory=list)  # (seg index, local off, length, send off)
    my_tails: list = field(default_factory=list)  # (seg index, [(src rank, src off, length, return off)] parts)
    my_head_returns: list = field(default_factory=list)  # (seg index, local off, length, owner, off)
    keys: list = field(default_factory=list)  # every rank's parameter keys, in a common order
    chunks: list = field(default_factory=list)  # [lo, hi) ranges of keys: a fused step's undo lifetime


def _key_chunks(keys: list, numel: dict, world: int) -> list[tuple[int, int]]:
    """Consecutive ranges of ``keys`` of about UNDO_CHUNK_ELEMENTS elements or fewer per rank (a
    larger parameter makes a chunk of its own); every rank computes the same from the layouts."""
    chunks, lo, size = [], 0, 0
    for i, key in enumerate(keys):
        n = -(-numel[key] // world)
        if i > lo and size + n > UNDO_CHUNK_ELEMENTS:
            chunks.append((lo, i))
            lo, size = i, 0
        size += n
    return chunks + [(lo, len(keys))] if keys else chunks


def _build_plan(layout: list[list[tuple[Hashable, int, int, int, int, int]]], rank: int) -> _Plan:
    """layout[r] = [(key, start, end, head_end, tail_end, numel), ...] of rank r's segments, in
    order; numel is the whole parameter's."""
    plan = _Plan()
    heads = {}  # (key, start) -> (rank, send offset, end, head end) of every non-empty head
    send_lens = []
    for r, segs in enumerate(layout):
        off = 0
        for i, (key, start, end, head_end, *_) in enumerate(segs):
            if head_end > start:
                heads[(key, start)] = (r, off, end, head_end)
                if r == rank:
                    plan.my_heads.append((i, 0, head_end - start, off))
                off += 2 * (head_end - start)  # gradient values, then parameter values
        send_lens.append(off)
    # each owner's tail: the heads of later segments of the same parameter, in element order
    returned = {}  # (key, start) -> (owner, return offset)
    return_lens = []
    for r, segs in enumerate(layout):
        off = 0
        for i, (key, start, end, head_end, tail_end, _) in enumerate(segs):
            parts = []
            pos = end
            while pos < tail_end:
                if (key, pos) not in heads:
                    raise RuntimeError(f"no rank holds elements from {pos} of parameter {key!r}")
                src_rank, src_off, e, h = heads[(key, pos)]
                if h != min(e, tail_end):
                    raise RuntimeError(f"inconsistent shard layout of parameter {key!r} at {pos}")
                parts.append((src_rank, src_off, h - pos, off))
                returned[(key, pos)] = (r, off)
                off += h - pos
                pos = h
            if r == rank and parts:
                plan.my_tails.append((i, parts))
        return_lens.append(off)
    for i, (key, start, end, head_end, *_) in enumerate(layout[rank]):
        if head_end > start:
            if (key, start) not in returned:
                raise RuntimeError(
                    f"elements [{start}, {head_end}) of parameter {key!r} belong to a "
                    "block whose first element no rank holds"
                )
            owner, off = returned[(key, start)]
            plan.my_head_returns.append((i, 0, head_end - start, owner, off))
    plan.send_len, plan.return_len = max(send_lens), max(return_lens)
    plan.keys = list(dict.fromkeys(key for segs in layout for key, *_ in segs))
    plan.chunks = _key_chunks(plan.keys, {seg[0]: seg[-1] for segs in layout for seg in segs}, len(layout))
    return plan


class ShardedStepper:
    """Runs MicroAdam steps on one process group's segments; keeps the exchange plan cached.

    ``process_group`` None is the default group; ``local=True``: this process alone (parameters no
    other rank holds), no collectives. Collective buffers sit on a device the group's backend takes
    (``distributed.collective_device``): the parameters' own, or CUDA for CPU-offloaded parameters
    under NCCL.
    """

    def __init__(self, process_group=None, *, local: bool = False):
        self.process_group = process_group
        self.local = local
        self._plan_key = None
        self._plan: _Plan | None = None

    def _world(self) -> tuple[int, int]:
        if self.local or not dist.is_available() or not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    @staticmethod
    def _layout(segments: list[Segment]) -> list[tuple]:
        return [(s.key, s.start, s.end, s.head()[1], s.tail_end(), s.geometry.numel) for s in segments]

    def plan(self, segments: list[Segment], *, replan: bool | None = None) -> _Plan:
        """The exchange plan of this layout. Every rank must call it together when ``replan`` is
        True (it all-gathers every rank's layout); None: replan when the local layout changed,
        which only a single process may decide alone."""
        rank, world = self._world()
        mine = self._layout(segments)
        if replan is None:
            replan = mine != self._plan_key or self._plan is None
        if not replan:
            return self._plan
        everyone = [None] * world
        if world > 1:
            dist.all_gather_object(everyone, mine, group=self.process_group)
        else:
            everyone = [mine]
        self._plan = _build_plan(everyone, rank)
        self._plan_key = mine
        return self._plan

    @torch.no_grad()
    def step(
        self, segments: list[Segment], states: dict[Hashable, dict], chunk_elements: int, blocks_fn=microadam_blocks_
    ) -> list[Hashable]:
        """One step of every segment; ``blocks_fn`` is the reference (a function) or a ``SplitStep``.

        Returns the keys of the parameters skipped because some rank's part of the gradient held a NaN
        or an infinity (all ranks skip them together: state, step count and values unchanged).
        Step counts advance only once a parameter's step has been applied.

        The finiteness check: with a function, one batched check of the gradients before the step
        (``functional.nonfinite_flags``); with a ``SplitStep``, the compress half flags a non-finite
        gradient on the device as it reads it, the flags are all-reduced on the device, and the
        update half skips (and undoes) flagged parameters. The host reads the flags once, at the
        end. A step where some parameter has no state yet (the probe decision) checks first.
        """
        rank, world = self._world()
        param_device = segments[0].param.device if segments else torch.device("cpu")
        device = collective_device(self.process_group, param_device) if world > 1 else param_device
        split = isinstance(blocks_fn, SplitStep)
        plan, skipped, probes, checked = self._agree(segments, states, world, device, precheck=not split)
        for seg in segments:
            if seg.grad is not None and seg.key not in skipped:
                state = states.setdefault(seg.key, {})
                if not state:  # filled in place: callers may pass their own (empty) dicts
                    state.update(seg.state_layout().zeros(seg.param.device))
        idle = skipped | probes
        if idle:
            if set(plan.keys) <= idle:  # nothing steps on any rank: no exchange either
                return sorted(skipped, key=plan.keys.index)
            segments = [replace(seg, grad=None) if seg.key in idle else seg for seg in segments]

        # 1. heads out
        send = torch.zeros(plan.send_len, dtype=torch.float32, device=device)
        for i, off, n, dst in plan.my_heads:
            seg = segments[i]
            if seg.grad is not None:
                send[dst : dst + n] = seg.grad[off : off + n]
            send[dst + n : dst + 2 * n] = seg.param[off : off + n]
        gathered = [g.to(param_device) for g in self._all_gather(send, world)]

        # 2. owners step on their blocks, the received tail appended
        ret = torch.zeros(plan.return_len, dtype=torch.float32, device=param_device)
        tails = dict(plan.my_tails)
        jobs = []
        for i, seg in enumerate(segments):
            if seg.grad is None:
                self._fill_returns(ret, tails.get(i, []), gathered, param=None)
                continue
            b0, b1 = seg.owned_blocks()
            e0, e1 = seg.region()
            lo, hi = e0 - seg.start, min(e1, seg.end) - seg.start
            param, grad = seg.param[lo:hi], seg.grad[lo:hi]
            if i in tails:
                parts = tails[i]
                param = torch.cat([param] + [gathered[r][o + n : o + 2 * n].to(param.dtype) for r, o, n, _ in parts])
                grad = torch.cat([grad] + [gathered[r][o : o + n].to(grad.dtype) for r, o, n, _ in parts])
            state = states[seg.key]
            cfg = StepConfig.from_group(seg.group, step=int(state["step"]) + 1, chunk_elements=chunk_elements)
            jobs.append((i, seg, (seg.geometry, b0, b1), param, grad, state, cfg, (lo, hi)))
        if split:
            skipped = skipped | self._fused_steps(jobs, plan, world, (param_device, device), blocks_fn, checked)
        else:
            for _, _, blocks, param, grad, state, cfg, _ in jobs:
                if blocks[2] > blocks[1]:
                    blocks_fn(*blocks, param, grad, state, cfg)
        for i, seg, _, param, _, state, _, (lo, hi) in jobs:
            if seg.key not in skipped:
                state["step"] += 1
            if i in tails:  # (a skipped parameter's values come back unchanged)
                seg.param[lo:hi].copy_(param[: hi - lo])
                self._fill_returns(ret, tails[i], gathered, param=param[hi - lo :])

        # 3. updated heads back
        if world > 1:
            back = [b.to(param_device) for b in self._all_gather(ret.to(device), world)]
            for i, off, n, owner, src in plan.my_head_returns:
                segments[i].param[off : off + n].copy_(back[owner][src : src + n])
        return sorted(skipped, key=plan.keys.index)

    def _fused_steps(self, jobs, plan, world, devices, split: SplitStep, checked: bool) -> set:
        """Both halves of a ``SplitStep`` for every job, a chunk of parameters at a time (the undo
        records live for one chunk): compress, all-reduce the chunk's flags on the device, update.
        Returns the skipped keys: the flags read once, after the last chunk (none to read when the
        step was checked before: the skipped parameters were taken out then)."""
        param_device, collective = devices
        index = {key: i for i, key in enumerate(plan.keys)}
        flags = torch.zeros(len(plan.keys), dtype=torch.int32, device=param_device)
        for lo, hi in plan.chunks:
            chunk = [job for job in jobs if lo <= index[job[1].key] < hi and job[2][2] > job[2][1]]
            flag_of = [flags[index[job[1].key]] for job in chunk]
            halves = [(*blocks, grad, state, cfg) for _, _, blocks, _, grad, state, cfg, _ in chunk]
            undo = split.compress([(*half, flag) for half, flag in zip(halves, flag_of)])
            if world > 1 and not checked:  # (through CUDA under NCCL for CPU-offloaded parameters)
                agreed = flags[lo:hi].to(collective)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.process_group)
                flags[lo:hi].copy_(agreed)
            split.update(
                [
                    (*blocks, param, state, cfg, flag, rec)
                    for (_, _, blocks, param, _, state, cfg, _), flag, rec in zip(chunk, flag_of, undo)
                ]
            )
        if checked:
            return set()
        return {key for key, flag in zip(plan.keys, flags.tolist()) if flag}

    @staticmethod
    def _fill_returns(ret, parts, gathered, param):
        pos = 0
        for r, o, n, dst in parts:
            ret[dst : dst + n] = gathered[r][o + n : o + 2 * n] if param is None else param[pos : pos + n]
            pos += n

    def _all_gather(self, t: torch.Tensor, world: int) -> list[torch.Tensor]:
        if world == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t, group=self.process_group)
        return out

    def _agree(self, segments, states, world, device, precheck: bool) -> tuple[_Plan, set, set, bool]:
        """The decisions all ranks must share: the exchange plan (rebuilt when some rank's layout
        changed), the parameters whose gradient holds a NaN or an infinity on some rank (skipped:
        nothing changes), and the *probes*: parameters without state whose group has lr 0 and whose
        gradient is zero on every rank (the state-creating step torch.distributed.checkpoint runs:
        state is created, nothing else changes). One all-reduce of a fixed size decides whether
        anything is to look at; only then (first steps, non-finite gradients), on every rank
        together, a second one says which parameters.

        ``precheck``: the gradients are checked here (the reference path; the first all-reduce's
        result is then the step's one read of device values on the host). Without it (a fused
        step checks as it reads) the first all-reduce holds host values only and runs on the CPU
        where the group's backend takes CPU tensors; a step where some parameter has no state yet
        still checks here, for the probe decision. The last value returned says whether it did."""
        stepping = [s for s in segments if s.grad is not None]
        fresh = [s for s in stepping if not states.get(s.key)]
        stale = self._plan is None or self._layout(segments) != self._plan_key
        if world == 1:
            plan = self.plan(segments, replan=stale)
            if not (precheck or fresh):
                return plan, set(), set(), False
            nonfinite = nonfinite_flags([s.grad for s in stepping])
            bad = {s.key for s, flag in zip(stepping, nonfinite.tolist()) if flag}
            return plan, bad, {s.key for s in fresh} - self._live(fresh, bad) - bad, True
        where = device if precheck else collective_device(self.process_group, "cpu")
        local = torch.tensor([stale, bool(fresh), False], dtype=torch.int64, device=where)
        if precheck:  # on the gradients' device: no read back before the all-reduce's result
            nonfinite = nonfinite_flags([s.grad for s in stepping])
            local[2] = nonfinite.any()
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
        stale, any_fresh, any_bad = local.tolist()
        plan = self.plan(segments, replan=bool(stale))
        if not (precheck or any_fresh):
            return plan, set(), set(), False
        if not precheck:
            nonfinite = nonfinite_flags([s.grad for s in stepping])
        if not (any_fresh or any_bad):
            return plan, set(), set(), True
        bad = {s.key for s, flag in zip(stepping, nonfinite.tolist()) if flag}
        live = self._live(fresh, bad)
        # per parameter: [non-finite somewhere, fresh somewhere, not a probe somewhere]
        per_key = torch.zeros(len(plan.keys), 3, dtype=torch.int64)
        fresh_keys = {s.key for s in fresh}
        for i, key in enumerate(plan.keys):
            per_key[i] = torch.tensor([key in bad, key in fresh_keys, key in live])
        per_key = per_key.to(device)
        dist.all_reduce(per_key, op=dist.ReduceOp.MAX, group=self.process_group)
        skipped, probes = set(), set()
        for key, (is_bad, is_fresh, is_live) in zip(plan.keys, per_key.tolist()):
            if is_bad:
                skipped.add(key)
            elif is_fresh and not is_live:
                probes.add(key)
        return plan, skipped, probes, True

    @staticmethod
    def _live(fresh: list[Segment], bad: set) -> set:
        """Fresh parameters that are no probe here: lr > 0, or a non-zero part of the gradient."""
        return {s.key for s in fresh if s.group["lr"] != 0 or (s.key not in bad and any_nonzero(s.grad, 1 << 20))}
