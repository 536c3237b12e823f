"""Runtime: device selection (the only module that knows CPU from GPU), distributed set-up, seeding."""

from acemath_mcore.runtime.device import (
    cuda_available,
    current_device,
    distributed_backend,
    peak_memory_bytes,
    setup_device,
    synchronize,
    transformer_engine_available,
)
from acemath_mcore.runtime.distributed import (
    LaunchEnv,
    ParallelConfig,
    destroy_distributed,
    init_distributed,
    install_stack_dumps,
    read_launch_env,
    release_model_parallel,
    seed_everything,
)

__all__ = [
    "LaunchEnv",
    "ParallelConfig",
    "cuda_available",
    "current_device",
    "destroy_distributed",
    "distributed_backend",
    "init_distributed",
    "install_stack_dumps",
    "peak_memory_bytes",
    "read_launch_env",
    "release_model_parallel",
    "seed_everything",
    "setup_device",
    "synchronize",
    "transformer_engine_available",
]
