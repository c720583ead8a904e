"""fedtune.launch.run: real processes in a real gloo group. What rank 0 logs reaches the caller; the first process
to fail stops the others, and the caller gets its error as one FedtuneError (never a traceback, never a hang)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedtune import launch
from fedtune.errors import BadInput, StageFailed

# With CUDA the group forms over nccl, one process per GPU: these tests are of the CPU (gloo) group.
pytestmark = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU (gloo) group")

# The functions below run in the spawned processes, which import this module by name to find them.


def _sum_ranks(base: float, log) -> None:
    import torch
    import torch.distributed as dist

    total = torch.tensor([base + dist.get_rank()])
    dist.all_reduce(total)
    log(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum {total.item():g}")


def _refuse_on_rank_1(log) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise BadInput("data/data_card.json: process 1 refuses it")
    dist.barrier()  # process 0 waits in a collective for a peer that has left: the launcher must stop it


def _crash_on_rank_1(log) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("CUDA out of memory\nsecond line of detail")
    time.sleep(120)  # stopped by the launcher long before


def _killed_on_rank_1(log) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)


def test_the_group_runs_and_rank_0_speaks_for_it():
    lines = []
    launch.run(2, _sum_ranks, (10.0,), {}, lines.append)
    assert lines == ["rank 0 of 2: sum 21"]  # 10 + 11, through gloo; process 1's line is not forwarded


@pytest.mark.parametrize("fn, error, message", [
    (_refuse_on_rank_1, BadInput, "data/data_card.json: process 1 refuses it"),
    (_crash_on_rank_1, StageFailed, "train-local: process 1 of 2 failed: RuntimeError: CUDA out of memory"),
    (_killed_on_rank_1, StageFailed, "train-local: process 1 of 2 was killed by signal SIGKILL (out of memory?)"),
])
def test_the_first_failure_stops_the_group_and_is_raised_as_one_error(fn, error, message):
    with pytest.raises(error) as raised:
        launch.run(2, fn, (), {}, lambda _line: None)
    assert type(raised.value) is error and str(raised.value) == message
