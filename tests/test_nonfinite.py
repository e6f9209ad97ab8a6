"""A NaN or an infinity in a gradient never reaches the optimizer state (policy: skip or raise)."""

import warnings

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_workers
from torch.distributed.tensor import distribute_tensor

from microadam_dist import MicroAdam

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs for real on a GPU
HP = dict(lr=1e-2, weight_decay=0.1, block_size=64, quant_bucket_size=16, density=0.05, window_size=3)


def snapshot(opt, p):
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


def assert_untouched(opt, p, snap):
    value, state = snap
    assert torch.equal(p.detach(), value)
    for key, t in state.items():
        assert torch.equal(opt.state[p][key], t), key


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_that_parameter(backend, dtype, bad):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 70, generator=gen).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(50, generator=gen).to(DEVICE, dtype).requires_grad_()
    opt = MicroAdam([a, b], backend=backend, **HP)
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    snap_a, b_before = snapshot(opt, a), b.detach().clone()
    g = torch.randn_like(a)
    g[3, 17] = bad
    a.grad, b.grad = g, torch.randn_like(b)
    with pytest.warns(RuntimeWarning, match="NaN or an infinity"):
        opt.step()
    assert_untouched(opt, a, snap_a)  # state, step count and values as before
    assert int(opt.state[b]["step"]) == 3 and not torch.equal(b.detach(), b_before)  # others step
    assert opt.nonfinite_skips == 1
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()  # the next finite step goes on from the untouched state
    assert int(opt.state[a]["step"]) == 3
    assert all(torch.isfinite(t.float()).all() for t in opt.state[a].values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_gradient_on_the_first_step(backend):
    """No state yet: the step checks before it starts (the probe decision needs it), creates no
    state for the skipped parameter and steps the other one."""
    a = torch.nn.Parameter(torch.randn(4, 64))
    b = torch.nn.Parameter(torch.randn(64))
    opt = MicroAdam([a, b], backend=backend, **HP)
    a.grad, b.grad = torch.full_like(a, float("inf")), torch.randn_like(b)
    with pytest.warns(RuntimeWarning, match="NaN or an infinity"):
        opt.step()
    assert not opt.state.get(a) and int(opt.state[b]["step"]) == 1 and opt.nonfinite_skips == 1


def test_nonfinite_raise_policy():
    p = torch.randn(4, 64, requires_grad=True)
    opt = MicroAdam([p], nonfinite="raise", **HP)
    p.grad = torch.randn_like(p)
    opt.step()
    snap = snapshot(opt, p)
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or an infinity"):
        opt.step()
    assert_untouched(opt, p, snap)
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        MicroAdam([p], nonfinite="ignore", **HP)


def _fsdp_worker(rank, world, out_dir, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from microadam_dist import sharded

    sharded.UNDO_CHUNK_ELEMENTS = 64  # the weight and the bias in two chunks: one flag all-reduce each

    torch.manual_seed(0)
    model = torch.nn.Linear(70, 9)  # weight (9, 70): row shards; bias (9,): 1-D, owner scheme
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    opt = MicroAdam(model.parameters(), backend=backend, **HP)

    def inject(step, poison):
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            g = torch.randn(p.shape, generator=gen)
            if poison and p.dim() == 1:
                g[-1] = float("nan")  # the last element: on the last rank's piece only
            p.grad = distribute_tensor(g, mesh, p.placements)

    for t in range(2):
        inject(t, poison=False)
        opt.step()
    weight, bias = model.weight, model.bias
    before = {k: v.clone() for k, v in opt.state[bias].items()}
    bias_before, weight_before = bias.full_tensor(), weight.full_tensor()
    inject(2, poison=True)
    opt.step()
    # every rank skipped the bias (even ranks whose piece was finite), the weight stepped
    assert all(torch.equal(opt.state[bias][k], v) for k, v in before.items())
    assert torch.equal(bias.full_tensor(), bias_before)
    assert not torch.equal(weight.full_tensor(), weight_before)
    assert opt.nonfinite_skips == 1 and int(opt.state[weight]["step"]) == 3
    dist.barrier()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_on_one_rank_is_skipped_by_all_ranks(tmp_path, backend):
    """The Triton step finds the NaN in its compress kernel on the bias's owner (the NaN sits in
    the tail it received), and the device flags' all-reduce tells the other ranks."""
    run_workers(_fsdp_worker, 3, str(tmp_path), backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huge_finite_gradient_is_not_mistaken_for_an_overflow(backend):
    """A gradient whose sum overflows although every value is finite must not skip the step: the
    check is the max-magnitude norm, which cannot overflow, and it sees NaN and infinities."""
    from microadam_dist.functional import nonfinite_flags

    g = torch.full((1000,), 3e38)
    assert not bool(torch.isfinite(g.sum()))  # a sum overflows ...
    empty, bf16 = torch.zeros(0), torch.tensor([1.0, 3e38], dtype=torch.bfloat16)
    assert nonfinite_flags([g, empty, bf16]).tolist() == [False, False, False]  # ... the check does not
    g[500] = float("nan")
    assert nonfinite_flags([g, torch.tensor([1.0, float("-inf")]), bf16]).tolist() == [True, True, False]
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = MicroAdam([p], lr=1e-3, backend=backend, block_size=256, quant_bucket_size=64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "MicroAdam skipped")  # (numpy warns of v * v overflowing)
        for _ in range(2):  # the second step is a fused one on the Triton path (state exists)
            p.grad = torch.full((1000,), 3e38)
            opt.step()
    assert opt.nonfinite_skips == 0 and int(opt.state[p]["step"]) == 2
