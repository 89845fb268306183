"""Cases for test_nonfinite_ranks.py: run on every rank of a gloo group by ``run_ranks``."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmlinattn.engine.optim import FiniteOptimWrapper

#: The iteration whose gradient is made non-finite on one rank.
BAD_ITERATION = 2


def _train(rank: int, bad_rank: int, nonfinite: str, iterations: int
           ) -> tuple[nn.Module, FiniteOptimWrapper, list, list]:
    """A DDP linear model trained ``iterations`` steps through :class:`FiniteOptimWrapper`;
    at ``BAD_ITERATION`` rank ``bad_rank``'s gradient of ``fc.weight`` turns NaN after
    DDP's all-reduce (a fault of that rank alone). Returns the model, the wrapper, the
    weights before each step and the error of each step (None, or the message)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.fc = nn.Linear(4, 2)
    ddp = DistributedDataParallel(net.fc)
    wrapper = FiniteOptimWrapper(torch.optim.SGD(ddp.parameters(), lr=0.1), nonfinite=nonfinite)
    wrapper.param_names = {id(p): f'fc.{n}' for n, p in net.fc.named_parameters()}
    before, errors = [], []
    for it in range(iterations):
        wrapper.iteration = it
        x = torch.full((3, 4), float(rank + 1 + it))
        loss = ddp(x).square().mean()
        wrapper._loss_value = float(loss)  # as update_params records it
        wrapper.backward(loss)
        if it == BAD_ITERATION and rank == bad_rank:
            net.fc.weight.grad[0, 0] = float('nan')
        before.append({k: v.clone() for k, v in net.fc.state_dict().items()})
        try:
            wrapper.step()
            errors.append(None)
        except FloatingPointError as e:
            errors.append(str(e))
            break
        wrapper.zero_grad()
    return net, wrapper, before, errors


def one_rank_nan_gradient_stops_every_rank(rank: int, world: int, bad_rank: int) -> None:
    net, _, before, errors = _train(rank, bad_rank, 'stop', 4)
    # Every rank stopped at the bad iteration, and not before.
    assert len(errors) == BAD_ITERATION + 1 and errors[:-1] == [None] * BAD_ITERATION, errors
    text = errors[-1]
    assert text is not None and f'iteration {BAD_ITERATION}' in text, text
    if rank == bad_rank:
        assert f'non-finite gradient at iteration {BAD_ITERATION} on rank {rank}' in text
        assert 'fc.weight' in text, text
    else:
        assert f'on rank(s) {bad_rank} (rank {rank} is finite)' in text, text
    assert 'every rank stopped before the optimizer step' in text
    # The weights were not touched by the bad step, on any rank.
    now = net.fc.state_dict()
    assert all(torch.equal(now[k], before[-1][k]) for k in now)
    # ... and the ranks still agree (no rank stepped alone).
    flat = torch.cat([v.flatten() for v in now.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered)


def one_rank_nan_gradient_is_skipped_by_every_rank(rank: int, world: int, bad_rank: int
                                                    ) -> None:
    net, wrapper, before, errors = _train(rank, bad_rank, 'skip', 4)
    assert errors == [None] * 4 and wrapper.skipped_steps == 1
    after_bad = before[BAD_ITERATION + 1]
    assert all(torch.equal(after_bad[k], before[BAD_ITERATION][k]) for k in after_bad)
    flat = torch.cat([v.flatten() for v in net.fc.state_dict().values()])
    assert torch.isfinite(flat).all()
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered)
