"""Run a function in N spawned processes that form a gloo process group, and collect what each returns.

Every worker is a fresh interpreter, so the CPU shim and megatron's global parallel state never leak into
the pytest process or into other tests.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
import warnings

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, target, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    warnings.simplefilter("ignore")  # megatron's optional-dependency warnings, once per rank, drown the output
    try:
        # Plain pickle bytes: torch's queue would share tensors through file descriptors that die with the worker.
        results.put((rank, "ok", pickle.dumps(target(rank, world_size, *args))))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_workers(target, world_size: int, *args, timeout: float = 600.0) -> list:
    """Results of ``target(rank, world_size, *args)`` for every rank, in rank order; a worker's exception fails
    the caller with that worker's traceback."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, world_size, port, target, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            collected[rank] = pickle.loads(value)
    except queue.Empty:
        raise AssertionError(f"workers did not finish within {timeout:.0f} s (got ranks {sorted(collected)})")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(world_size)]
