"""Run one function in N local CPU processes forming a gloo group, and collect what each returns.

Used where megatron-core must decide which slice of every tensor a rank holds without a GPU job: checkpoint
conversion (one process per TP x PP rank; memory-bound work that runs on login or CPU nodes) and the test
suite. Each worker is a new process, so the CPU shim and megatron's global state never leak into the caller.

Workers are forked from a fork server that imported torch and megatron-core once (``_PRELOADED``): a spawned
interpreter spends 5-9 s importing megatron-core, which the test suite (and any process that converts more than
once, or converts then verifies) paid on every call; now only the first call pays it. The fork server holds no
process group and none of our modules, and each worker takes the caller's current environment. What a process
reads only when it starts or imports a library (glibc's ``MALLOC_*`` tunables, ``TRITON_INTERPRET``) is the fork
server's, though: callers that set such a variable ask for ``fresh_interpreter=True``. On a machine with CUDA the
workers are spawned: there the fork server imports Transformer Engine with megatron-core, which may create a CUDA
context that a forked child must not inherit.
"""

from __future__ import annotations

import os
import pickle
import queue
import traceback
import warnings
from typing import Callable, List

import torch.multiprocessing as mp

from acemath_mcore.runtime import device as device_lib
from acemath_mcore.runtime.distributed import free_port


def usable_cpus() -> int:
    """CPUs this process may run on: a Slurm job or container cgroup grants fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Third-party modules only: ours may cache decisions (``device.cuda_available``) that each worker must make itself.
_PRELOADED = ("torch", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
              "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing")


def _worker_entry(rank: int, world_size: int, port: int, environment: dict, target: Callable, args: tuple,
                  results) -> None:
    # The fork server's environment is the caller's at the first call; later changes arrive here.
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      ACEMATH_FORCE_CPU="1")
    import torch

    torch.set_num_threads(max(1, usable_cpus() // world_size))
    # megatron warns about missing TE/apex once per process; on CPU that is expected.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    try:
        # Pickled bytes, not tensors: torch's queue shares tensors through handles that die with the worker.
        results.put((rank, "ok", pickle.dumps(target(rank, world_size, *args))))
    except BaseException:  # noqa: B902 - every failure, assertions included, must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_local_workers(target: Callable, world_size: int, *args, timeout: float | None = None,
                      fresh_interpreter: bool = False) -> List:
    """``target(rank, world_size, *args)`` in ``world_size`` new processes; the results in rank order.
    ``fresh_interpreter``: spawn each one instead of forking it from the preloaded fork server (always done on
    a machine with CUDA).

    A worker's exception is re-raised here with its traceback; a worker that dies without reporting (killed
    for memory, segfault) is reported with its exit code instead of hanging the caller.
    """
    if fresh_interpreter or device_lib.cuda_available():
        context = mp.get_context("spawn")
    else:
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(list(_PRELOADED))  # read when the server starts: on the first call only
    results = context.Queue()
    port = free_port()
    environment = dict(os.environ)
    processes = [context.Process(target=_worker_entry,
                                 args=(rank, world_size, port, environment, target, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected, waited = {}, 0.0
    try:
        while len(collected) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [(r, p.exitcode) for r, p in enumerate(processes) if r not in collected and p.exitcode]
                if dead:
                    raise RuntimeError(f"worker rank {dead[0][0]} died with exit code {dead[0][1]} "
                                       "(a negative code is a signal: -9 usually means out of memory)") from None
                if timeout is not None and waited > timeout:
                    raise TimeoutError(f"workers did not finish within {timeout:.0f} s "
                                       f"(done: {sorted(collected)})") from None
                continue
            if status == "error":
                raise RuntimeError(f"worker rank {rank} failed:\n{value}")
            collected[rank] = pickle.loads(value)
    finally:
        # After a failure the other ranks may wait forever in a collective: do not wait long for them.
        grace = 30.0 if len(collected) == world_size else 1.0
        for process in processes:
            process.join(timeout=grace)
            if process.is_alive():
                process.kill()
                process.join()
    return [collected[rank] for rank in range(world_size)]
