"""Process-group and model-parallel set-up from torchrun or Slurm environments."""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import logging
import os
import random
import re
import signal
import socket
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np
import torch

from acemath_mcore.options import ParallelConfig
from acemath_mcore.runtime import device as device_lib

logger = logging.getLogger("acemath_mcore")


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-010,012],login1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_NODELIST {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _launcher(environ: Mapping[str, str]) -> Optional[str]:
    """Who started this process: "torchrun", "slurm" (a task of an srun step) or None (a lone process).

    Slurm's task variables count only inside a job step (``SLURM_STEP_ID``, set by srun): a batch script run
    with ``--ntasks=8`` also carries ``SLURM_PROCID=0`` and ``SLURM_NTASKS=8``, and a plain ``python`` there would
    wait for seven ranks that never start."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "torchrun"
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return "slurm"
    return None


def launch_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank, known before the ranks meet (read_launch_env's, without its free port)."""
    launcher = _launcher(environ)
    return int(environ["RANK"] if launcher == "torchrun" else environ["SLURM_PROCID"] if launcher == "slurm" else 0)


def read_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """torchrun variables win; otherwise Slurm's (one task per GPU under srun); otherwise a single process."""
    launcher = _launcher(environ)
    if launcher == "torchrun":
        return LaunchEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")),
        )
    if launcher == "slurm":
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"])),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            master_addr=environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_NODELIST", "localhost")),
            # A job-specific port lets several jobs share a node without colliding; below Linux's ephemeral
            # ports (32768-60999), one of which another socket may hold (the same as slurm/common.sh).
            master_port=int(environ.get("MASTER_PORT", str(10000 + job_id % 20000))),
        )
    if "SLURM_STEP_ID" not in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        logger.warning("running as one process: this is a Slurm job's batch script, not a step of its "
                       "%s tasks (start them with srun)", environ["SLURM_NTASKS"])
    # A lone process: any free port, so two single-process runs on one machine never collide.
    port = int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else free_port()
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=port)


def free_port() -> int:
    """A TCP port the OS reports free on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# What Slurm sends every process of a job step to stop it with time to spare: SIGUSR1 before the time limit
# (``--signal``, ``scancel --signal=USR1``), SIGTERM at a preemption. The trainer answers them (checkpoint, exit 75);
# its helper processes must not die of them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def install_stack_dumps() -> None:
    """Every thread's Python stack to stderr when the process crashes (SIGSEGV, or SIGABRT from NCCL's watchdog
    after a collective timed out) and on SIGUSR2 (``scancel --signal=USR2 <job>``: where is each rank now?).
    faulthandler writes from the C signal handler, so it answers while a rank is blocked inside a collective."""
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR2, all_threads=True)


def init_distributed(
    parallel: ParallelConfig,
    launch: Optional[LaunchEnv] = None,
    seed: int = 1234,
) -> LaunchEnv:
    """Create the default process group and megatron's parallel groups, then seed every RNG."""
    from megatron.core import parallel_state

    launch = launch or read_launch_env()
    parallel.data_parallel_size(launch.world_size)  # fail early, with the numbers, on a bad layout
    device_lib.setup_device(launch.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=device_lib.distributed_backend(),
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
            context_parallel_size=parallel.context_parallel,
            distributed_timeout_minutes=parallel.timeout_minutes,
        )
    seed_everything(seed)
    return launch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and megatron's model-parallel tracker (distinct streams per TP rank)."""
    from megatron.core import parallel_state, tensor_parallel

    offset = 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed + offset)
    np.random.seed(seed + offset)
    torch.manual_seed(seed + offset)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + offset)


def release_model_parallel() -> None:
    """Destroy megatron's parallel groups and state, keeping the default group, so the process can build
    another layout.

    megatron's ``destroy_model_parallel`` forgets most groups without destroying them. On gloo each one keeps
    threads that wake up periodically, so a process that rebuilds its layout slowed down with every rebuild
    (measured: each CPU worker gained 51 threads and 2% of a core per layout; after 18 layouts a step
    ran 10x slower than in a fresh process).
    """
    from megatron.core import parallel_state

    groups = {id(group): group for group in _process_groups_in(vars(parallel_state).values())}
    parallel_state.destroy_model_parallel()
    for group in groups.values():
        if group is torch.distributed.group.WORLD:
            continue
        try:
            torch.distributed.destroy_process_group(group)
        except ValueError:  # destroyed by destroy_model_parallel already (its gloo data-parallel groups)
            pass


def _process_groups_in(values: Iterable) -> Iterator["torch.distributed.ProcessGroup"]:
    for value in values:
        if isinstance(value, dict):
            value = list(value.values())
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.distributed.ProcessGroup):
                yield item


def raise_on_every_rank(error: Optional[Exception]) -> None:
    """Raise the lowest rank's error on every rank (collective): a rank that stopped alone would leave the others
    waiting for it in the next collective until the timeout."""
    errors: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    first = next((found for found in errors if found is not None), None)
    if first is not None:
        raise first


def data_parallel_share(count: int) -> range:
    """This data-parallel rank's contiguous part of ``count`` items (sizes differ by at most one, in rank order)."""
    from megatron.core import parallel_state

    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    return range(count * rank // size, count * (rank + 1) // size)


def destroy_distributed() -> None:
    if torch.distributed.is_initialized():
        release_model_parallel()
        torch.distributed.destroy_process_group()
