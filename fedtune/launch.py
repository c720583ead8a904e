"""One site's training data-parallel over several processes on one machine.

`train-local --num-processes N` starts N fresh processes (torch.multiprocessing, spawn) that form one
torch.distributed group: one process per GPU over nccl, or N CPU processes over gloo. Inside, train_loop's
accelerate `Accelerator` finds the group and wraps the model in DistributedDataParallel, which averages the
gradients; each process takes its share of every batch. Processes started by `accelerate launch` or `torchrun`
are recognised by the environment those set (WORLD_SIZE, RANK), so the same command runs under them too.

What crosses between the processes here is progress lines and one error message, both plain strings; tensors
move only through torch.distributed's collectives.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from fedtune import errors
from fedtune.errors import BadInput, FedtuneError, StageFailed


def group() -> tuple[int, int]:
    """(rank, number of processes) of this process's launched group; (0, 1) when it runs alone."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    return (int(os.environ.get("RANK") or 0), world) if world > 1 else (0, 1)


def check(processes: int, batch_size: int, local_dp: bool, launched: bool, source: str = "train-local") -> None:
    """BadInput naming every reason `processes` cannot train this run (all of them, at once). `launched`: the
    processes are a launcher's, which placed them on its machines' GPUs itself."""
    import torch

    if processes == 1:
        return
    problems = []
    if local_dp:
        problems.append("privacy.mode local clips and noises each record's own gradient (Opacus), which fedtune "
                        "runs in one process only; give --num-processes 1")
    if batch_size < processes:
        problems.append(f"the processes split each step's batch (--batch-size, else training.batch_size: "
                        f"{batch_size}), so it needs at least {processes} sequences; give --batch-size {processes} "
                        "or more, or fewer processes")
    if not launched and torch.cuda.is_available() and processes > torch.cuda.device_count():
        problems.append(f"one process per GPU, and torch sees {torch.cuda.device_count()} GPU(s) here; give at most "
                        f"--num-processes {torch.cuda.device_count()}")
    if problems:
        raise BadInput(f"{source} --num-processes {processes}: " + "; ".join(problems))


def sync_trained_only(module) -> None:
    """Every process loaded the same fingerprint-checked base, so DDP need not broadcast the frozen weights from
    process 0 (gigabytes for a real model), nor the buffers at every step: it syncs only the trained factors."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, frozen + [name for name, _ in module.named_buffers()])


def run(processes: int, fn: Callable, args: tuple, kwargs: dict, log: Callable[[str], None]) -> None:
    """Run `fn(*args, **kwargs, log=…)` in `processes` fresh processes that form one torch.distributed group, and
    return when all have finished. Rank 0's progress lines reach `log`. The first process to fail stops the others,
    and its error is raised here as what it was (BadInput stays BadInput), so the command prints one line."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    messages = context.SimpleQueue()
    rendezvous = Path(tempfile.mkdtemp(prefix="fedtune-group-"))
    # torch logs a warning for each process it stops after a failure; the failure itself is the one line to show.
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    procs = None
    try:
        procs = mp.start_processes(_worker, args=(processes, str(rendezvous / "store"), messages, fn, args, kwargs),
                                   nprocs=processes, join=False, start_method="spawn")
        failed: dict[int, tuple[str, str]] = {}
        try:
            while not procs.join(timeout=0.5):
                failed.update(_forward(messages, log))
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as stop:
            failed.update(_forward(messages, log))
            raise _failure(stop, failed, processes) from None
        _forward(messages, log)
    finally:
        spawn_log.setLevel(level)
        for process in procs.processes if procs is not None else ():
            if process.is_alive():  # interrupted here: no process may outlive the command
                process.kill()
            process.join()
        shutil.rmtree(rendezvous, ignore_errors=True)


def _forward(messages, log: Callable[[str], None]) -> dict[int, tuple[str, str]]:
    """Pass the progress lines waiting in `messages` to `log`; return the errors among them, by rank."""
    failed = {}
    while not messages.empty():
        kind, rank, *rest = messages.get()
        if kind == "log":
            log(rest[0])
        else:
            failed[rank] = (rest[0], rest[1])
    return failed


def _failure(stop, failed: dict[int, tuple[str, str]], processes: int) -> FedtuneError:
    """The error to raise for a stopped group: the first FedtuneError a process reported (when one process refuses
    its input, the others may fail too, only because their peer left the group), else the first process to end."""
    own = [r for r, (name, _) in failed.items() if _fedtune_error(name)]
    rank = own[0] if own else stop.error_index
    if rank in failed:
        name, message = failed[rank]
        kind = _fedtune_error(name)
        return kind(message) if kind else StageFailed(f"train-local: process {rank} of {processes} failed: {message}")
    code = getattr(stop, "exit_code", None)
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return StageFailed(f"train-local: process {rank} of {processes} was killed by signal {name}"
                           + (" (out of memory?)" if name == "SIGKILL" else ""))
    return StageFailed(f"train-local: process {rank} of {processes} exited with status {code}")


def _fedtune_error(name: str) -> type[FedtuneError] | None:
    kind = getattr(errors, name, None) if name else None
    return kind if isinstance(kind, type) and issubclass(kind, FedtuneError) else None


def _worker(rank: int, processes: int, store: str, messages, fn: Callable, args: tuple, kwargs: dict) -> None:
    """One process of the group: join it, run `fn`, report a failure as (class name, message) and exit non-zero
    so that the launcher stops the others."""
    # The same environment `torchrun` gives its processes: accelerate and train_local read their place from it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                      LOCAL_WORLD_SIZE=str(processes), GROUP_RANK="0")
    for module in ("peft", "transformers", "accelerate", "torch"):  # as the command quiets them in its own process
        warnings.filterwarnings("ignore", module=module)
    try:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(rank)
        else:
            # The cores are shared out: N processes each using every core would only contend.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes)))
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # A file store: the group meets through a file of its own, not a TCP port that another run may hold.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{store}",
                                rank=rank, world_size=processes)
        log = (lambda line: messages.put(("log", rank, line))) if rank == 0 else (lambda _line: None)
        fn(*args, **kwargs, log=log)
    except Exception as problem:  # every failure becomes one message for the parent
        if os.environ.get("FEDTUNE_DEBUG"):
            import traceback

            traceback.print_exc()
        if isinstance(problem, FedtuneError):
            # Named by its nearest class in fedtune.errors, which the parent can raise again with the same exit code.
            kind = next(c for c in type(problem).__mro__ if c.__module__ == errors.__name__)
            messages.put(("error", rank, kind.__name__, str(problem)))
            code = problem.exit_code
        else:
            first = (str(problem).strip().splitlines() or [""])[0][:300]
            messages.put(("error", rank, "", f"{type(problem).__name__}: {first}" if first else type(problem).__name__))
            code = 1
        sys.exit(code or 1)
    dist.destroy_process_group()
