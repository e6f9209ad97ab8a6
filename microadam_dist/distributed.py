"""The default process group's lifecycle: started safely also in workers that torchrun
restarted, and torn down so that no communication thread outlives it.

torchrun's default (static) rendezvous keeps one TCP store for the whole job and hands it to
every generation of workers, and ``init_process_group`` keys its address exchange by the same
names each time. A worker group restarted after a failure (``--max-restarts``) can then read the
addresses of the dead workers: its peers connect to closed ports ("Connection refused") or hang
in ``init_process_group`` (seen here in about one restart in four, torch 2.13, gloo; upstream:
pytorch/pytorch#135712). Each generation therefore gets its own key prefix, from
``TORCHELASTIC_RESTART_COUNT``, which every agent increments when it restarts its workers.

Teardown: ``dist.destroy_process_group()`` only unregisters a gloo group (gloo's ``shutdown`` is
a no-op); its worker threads run until the last reference to the group is dropped. FSDP2's device
meshes hold their groups, and DTensor's sharding caches hold the meshes for the life of the
process, so the threads survive into interpreter teardown. There, a worker that releases the last
reference to a finished collective's tensor must take the GIL, which a finalizing interpreter
refuses by ending the thread: ``terminate called without an active exception`` (SIGABRT) after all
the work is done (about 1 run in 5 of the main job; pytorch/pytorch#179291 is the same mechanism).
``destroy_process_group`` here drops those references, so the groups' destructors join their
threads while the interpreter is still whole.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
import types
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


def default_backend() -> str:
    """Gloo for CPU tensors and, with CUDA, NCCL for CUDA tensors: the package's own collectives
    and a CPU-offloaded run's CPU-side ones both have a backend (NCCL alone takes no CPU tensor)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def backend_device_types(group=None) -> list[str]:
    """The device types whose tensors ``group``'s backend takes, e.g. ``["cpu", "cuda"]``."""
    config = dist.get_backend_config(group)  # "cpu:gloo,cuda:nccl"; a plain name for custom backends
    if ":" not in config:
        return [torch.device("cpu").type] + ([acc.type] if (acc := _accelerator()) is not None else [])
    return [part.split(":")[0].strip() for part in config.split(",")]


def _accelerator() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return None if acc is None else torch.device(acc.type, torch.accelerator.current_device_index())


def collective_device(group=None, like: torch.device | str = "cpu") -> torch.device:
    """Where to put a collective's buffers on ``group``: ``like`` (the tensors' own device) when
    the group's backend takes that device type, else the current accelerator. So a CPU-offloaded
    parameter under an NCCL group communicates through CUDA buffers, and a CPU value is reduced on
    CUDA under NCCL. Raises when the backend takes no device this process has."""
    like = torch.device(like)
    accepted = backend_device_types(group)
    if like.type in accepted:
        return like
    acc = _accelerator()
    if acc is not None and acc.type in accepted:
        return acc
    raise RuntimeError(
        f"the process group's backend ({dist.get_backend_config(group)}) takes no {like.type} "
        f"tensors and this process has no {'/'.join(accepted)} device; start the group with "
        f"a backend for {like.type} tensors too, e.g. 'cpu:gloo,cuda:nccl'"
    )


def init_process_group(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """``dist.init_process_group`` from the launcher's environment (torchrun, the deepspeed
    launcher, ``microadam_dist.mpi``), with a per-restart store namespace under torchrun.
    ``timeout``: the group's (and the store's) timeout, torch's default when None."""
    backend = backend or default_backend()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout or default_pg_timeout,
    )
    store = dist.PrefixStore(f"microadam_dist/restart_{attempt}", agent_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def destroy_process_group(barrier: bool = True) -> None:
    """Destroy every process group and join their communication threads (see the module doc).

    Call it once the models, optimizers and engines that used the groups are no longer needed;
    the references that torch's and DeepSpeed's own caches keep are dropped here. With
    ``barrier`` (on the way out of a successful run), every rank must call it: no rank tears its
    group down while a peer still talks to it. Pass ``barrier=False`` on the way out of an error,
    where the peers may never get there.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
    if deepspeed_comm is not None and deepspeed_comm.cdb is not None and deepspeed_comm.cdb.is_initialized():
        deepspeed_comm.destroy_process_group()  # also releases the groups DeepSpeed caches
    else:
        dist.destroy_process_group()
    _release_cached_groups()
    gc.collect()  # FSDP states and hooks sit in reference cycles
    left = gloo_worker_threads()
    if left:
        # every collective has completed (the barrier); let a worker that still has to free a
        # finished one's tensors take the GIL now, while the interpreter can still give it
        time.sleep(0.1)
        warnings.warn(
            f"{left} gloo worker thread(s) still run after destroy_process_group: a live object "
            "(a model, an optimizer, a DeepSpeed engine, a DeviceMesh) still holds its process "
            "group; delete it before the teardown (DeepSpeed ZeRO-3 keeps its groups in its "
            "parameters even after engine.destroy())",
            RuntimeWarning,
            stacklevel=2,
        )


def _release_cached_groups() -> None:
    """Drop the references to destroyed groups that outlive the objects that used them.

    - A ``DeviceMesh`` keeps its groups in ``_pg_registry``, and DTensor's sharding caches keep
      meshes alive after their model is gone.
    - Functions that default to ``group=GroupMember.WORLD`` bind the group that exists when their
      module is imported: ``torch.distributed.nn.functional`` (which DTensor imports lazily, after
      the default group exists) and DeepSpeed's ``TorchBackend.barrier``. Such a default becomes
      None, which those functions read as the default group.
    """
    from torch.distributed.device_mesh import DeviceMesh

    with warnings.catch_warnings():  # some torch objects warn when isinstance looks at them
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        meshes = [obj for obj in objects if isinstance(obj, DeviceMesh)]
        functions = [obj for obj in objects if isinstance(obj, types.FunctionType) and obj.__defaults__]
    del objects
    for mesh in meshes:
        if isinstance(getattr(mesh, "_pg_registry", None), dict):
            mesh._pg_registry.clear()
    for fn in functions:
        if any(isinstance(d, dist.ProcessGroup) for d in fn.__defaults__):
            fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in fn.__defaults__)


def gloo_worker_threads() -> int:
    """How many gloo worker threads this process runs (Linux; 0 where /proc is missing)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except OSError:
            pass
    return count


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(
    nproc: int, args: list[str], *, module: str = "microadam_dist.train", restarts: int = 0, host: str = "127.0.0.1"
) -> list[str]:
    """The command that runs ``python -m module *args`` on ``nproc`` local processes under
    torchrun, with its rendezvous on a free port of ``host``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(restarts),
        "--master-addr",
        host,
        "--master-port",
        str(free_port(host)),
        "-m",
        module,
        *args,
    ]
