"""Runtime: launcher environments, the CPU shim and when it is (not) used."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_workers


def test_torchrun_environment_wins_over_slurm():
    from acemath_mcore.runtime import read_launch_env

    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node7", "MASTER_PORT": "6000",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port) == (
        3, 8, 3, "node7", 6000)


def test_slurm_environment():
    from acemath_mcore.runtime import read_launch_env

    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "123456",
           "SLURM_NODELIST": "gpu-h100-[007-008,011]", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (13, 16, 5)
    assert launch.master_addr == "gpu-h100-007"
    assert launch.master_port == 10000 + 123456 % 20000


def test_slurm_job_ports_stay_below_the_ephemeral_range():
    """Linux hands out 32768-60999 to outgoing connections: a rendezvous port there may be held by another socket
    on the first node (the old 20000 + job id % 20000 landed there for 36% of job ids)."""
    from acemath_mcore.runtime import read_launch_env

    ports = {read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": str(job),
                              "SLURM_NODELIST": "n1"}).master_port for job in range(40_000)}
    assert min(ports) >= 1024 and max(ports) < 32768
    assert len(ports) == 20000  # jobs sharing a node still get different ports


def test_a_batch_script_outside_srun_runs_one_process(caplog):
    """sbatch --ntasks=8 gives the batch script SLURM_PROCID=0 and SLURM_NTASKS=8 but no job step: a plain
    python there must not wait for seven ranks that never start."""
    import logging

    from acemath_mcore.runtime import read_launch_env

    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77",
           "SLURM_NODELIST": "node[1-2]"}
    with caplog.at_level(logging.WARNING, logger="acemath_mcore"):
        launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.master_addr) == (0, 1, "127.0.0.1")
    assert "not a step of its 8 tasks (start them with srun)" in caplog.text


def test_lone_process_takes_a_free_port_unless_told():
    import socket

    from acemath_mcore.runtime import read_launch_env

    launch = read_launch_env({})
    assert (launch.rank, launch.world_size) == (0, 1)
    with socket.socket() as probe:  # the port it chose can be bound: a second lone run does not collide
        probe.bind(("127.0.0.1", launch.master_port))
    assert read_launch_env({"MASTER_PORT": "6123"}).master_port == 6123


@pytest.mark.parametrize("env,rank", [
    ({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 3),
    ({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_NODELIST": "n1"}, 13),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n1"}, 0),  # a batch script, not a step task
    ({}, 0),
], ids=["torchrun", "slurm_step", "batch_script", "lone"])
def test_the_rank_known_before_the_ranks_meet_is_the_rendezvous_rank(env, rank):
    from acemath_mcore.runtime.distributed import launch_rank, read_launch_env

    assert launch_rank(env) == read_launch_env(env).rank == rank


def _console_lines(rank, world_size):
    import io
    import logging
    import sys

    from acemath_mcore.training.logging import setup_console_logging

    sys.stdout = io.StringIO()
    setup_console_logging(rank)
    logger = logging.getLogger("acemath_mcore")
    logger.info("step 1")
    logger.warning("the data leaves samples out")
    logger.error("this rank failed")
    return [line.split(" ", 1)[1] for line in sys.stdout.getvalue().splitlines()]


def test_only_rank_0_prints_progress_and_warnings_every_rank_prints_errors():
    """Every rank sees the same config, data and checkpoints: a 256-GPU job printed each warning 256 times."""
    assert run_workers(_console_lines, 2) == [
        ["INFO step 1", "WARNING the data leaves samples out", "ERROR this rank failed"],
        ["ERROR this rank failed"],
    ]


@pytest.mark.parametrize("nodelist,first", [
    ("node001", "node001"), ("a1,b2", "a1"), ("gpu[3-5]", "gpu3"), ("gpu[010,012-014]", "gpu010"),
])
def test_first_slurm_host(nodelist, first):
    from acemath_mcore.runtime.distributed import first_slurm_host

    assert first_slurm_host(nodelist) == first


def test_layout_that_does_not_divide_world_size_names_the_numbers():
    from acemath_mcore.runtime import ParallelConfig

    with pytest.raises(ValueError, match=r"world size 6 is not divisible by .*tensor_parallel\(4\).* = 4"):
        ParallelConfig(tensor_parallel=4).data_parallel_size(6)


def test_language_model_loss_kernel_follows_the_machine(monkeypatch):
    """Ours (Triton) wherever CUDA and Triton are there, megatron's otherwise; asking for ours without them, or for
    an unknown kernel, is an error that says what to use instead."""
    from acemath_mcore.models import ModelOptions, get_preset, transformer_config
    from acemath_mcore.runtime import ParallelConfig, device

    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert device.lm_cross_entropy("auto") == "megatron"
    assert device.lm_cross_entropy("megatron") == "megatron"
    with pytest.raises(RuntimeError, match="needs a CUDA device and the triton package; use 'auto' or 'megatron'"):
        device.lm_cross_entropy("triton")
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert device.lm_cross_entropy("auto") == "triton"  # the test extra installs triton
    assert device.lm_cross_entropy("megatron") == "megatron"
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: None)
    assert device.lm_cross_entropy("auto") == "megatron"
    with pytest.raises(ValueError, match=r"model cross_entropy must be one of \('auto', 'triton', 'megatron'\)"):
        transformer_config(get_preset("tiny"), ParallelConfig(), ModelOptions(spec="native", cross_entropy="fused"))


def test_shim_is_never_selected_on_cuda(monkeypatch):
    """On a CUDA machine setup_device binds the GPU and leaves torch untouched."""
    from acemath_mcore.runtime import cpu_shim, device

    assert device.needs_cpu_shim(has_cuda=True) is False
    assert device.needs_cpu_shim(has_cuda=False) is True
    bound = []
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(cpu_shim, "install", lambda: pytest.fail("the CPU shim must not be installed on CUDA"))
    assert device.setup_device(local_rank=3) == torch.device("cuda", 3)
    assert bound == [3]


def _shim_worker(rank, world_size):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from acemath_mcore.runtime import cpu_shim, device

    assert not cpu_shim.is_installed()
    first = device.setup_device(0)
    mode = cpu_shim.install()
    assert cpu_shim.install() is mode, "installing twice must be a no-op"
    results = {"device": str(first)}
    results["empty_device"] = str(torch.empty(2, device="cuda").device)
    results["int_device"] = str(torch.zeros(2, device=torch.cuda.current_device()).device)
    results["to_device"] = str(torch.ones(2).to(torch.device("cuda", 0)).device)
    results["cuda_method"] = str(torch.ones(2).cuda().device)
    results["type_name"] = torch.ones(2).type()
    results["bf16_type_name"] = torch.ones(2, dtype=torch.bfloat16).type()
    torch.cuda.synchronize()

    class AllocatesInBackward(torch.autograd.Function):
        """Like megatron's linear layers, which allocate on torch.cuda.current_device() in backward."""

        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return grad * 2 + torch.ones(grad.shape, device=torch.cuda.current_device())

    leaf = torch.ones(3, requires_grad=True)
    AllocatesInBackward.apply(leaf).sum().backward()
    results["grad_from_custom_backward"] = leaf.grad.tolist()

    # The tracker's named stream is independent of the default one and advances across forks.
    torch.cuda.manual_seed(11)
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    default_before = torch.get_rng_state()
    with tracker.fork():
        first_draw = torch.rand(3)
    with tracker.fork():
        second_draw = torch.rand(3)
    results["default_state_restored"] = torch.equal(default_before, torch.get_rng_state())
    results["fork_streams_advance"] = not torch.equal(first_draw, second_draw)
    expected = torch.Generator().manual_seed(1234)
    results["fork_uses_named_seed"] = torch.equal(first_draw, torch.rand(3, generator=expected))
    return results


def test_cpu_shim_redirects_cuda_calls_and_backs_the_rng_tracker():
    results = run_workers(_shim_worker, 1)[0]
    assert results["device"] == "cpu"
    for key in ("empty_device", "int_device", "to_device", "cuda_method"):
        assert results[key] == "cpu", key
    assert results["type_name"] == "torch.cuda.FloatTensor"
    assert results["bf16_type_name"] == "torch.cuda.BFloat16Tensor"
    assert results["grad_from_custom_backward"] == [3.0, 3.0, 3.0]
    assert results["default_state_restored"]
    assert results["fork_streams_advance"]
    assert results["fork_uses_named_seed"]


def _group_timeouts(rank, world_size):
    import torch.distributed
    from megatron.core import parallel_state

    from acemath_mcore.runtime import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2, timeout_minutes=7))
    try:
        groups = {"world": torch.distributed.group.WORLD,
                  "tensor_parallel": parallel_state.get_tensor_model_parallel_group()}
        return {name: group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60
                for name, group in groups.items()}
    finally:
        destroy_distributed()


def test_parallel_timeout_minutes_reaches_every_process_group():
    """The watchdog's limit on a collective that waits for a hung peer: the process group and megatron's groups."""
    assert run_workers(_group_timeouts, 2) == [{"world": 7.0, "tensor_parallel": 7.0}] * 2


def _rebuilt_layouts(rank, world_size):
    import torch.distributed
    from megatron.core import parallel_state

    from acemath_mcore.runtime import ParallelConfig, destroy_distributed, init_distributed, release_model_parallel

    def threads():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))

    counts, sums = [], []
    for tensor_parallel in (2, 1, 2, 1, 2):
        init_distributed(ParallelConfig(tensor_parallel=tensor_parallel))
        ones = torch.ones(1)
        torch.distributed.all_reduce(ones, group=parallel_state.get_tensor_model_parallel_group())
        sums.append(ones.item())
        release_model_parallel()
        counts.append(threads())
    world = torch.ones(1)
    torch.distributed.all_reduce(world)  # the default group outlives the layouts
    destroy_distributed()
    return {"threads": counts, "tensor_parallel_sums": sums, "world_sum": world.item()}


def test_rebuilding_the_layout_leaves_no_process_groups_behind():
    """Tests and tools build several layouts in one process: megatron's own destroy leaves its gloo groups (and
    their threads, which wake up periodically) alive, so each layout made the next one slower."""
    for result in run_workers(_rebuilt_layouts, 2):
        assert result["tensor_parallel_sums"] == [2.0, 1.0, 2.0, 1.0, 2.0]
        assert result["world_sum"] == 2.0
        assert len(set(result["threads"])) == 1, result["threads"]  # megatron's destroy alone: 51 more per layout


def test_stack_dumps_on_sigusr2_keep_the_process_running():
    """``scancel --signal=USR2`` must show where every rank is, and not stop it."""
    import subprocess
    import sys

    script = ("import os, signal\n"
              "from acemath_mcore.runtime import install_stack_dumps\n"
              "def where_the_rank_waits():\n"
              "    os.kill(os.getpid(), signal.SIGUSR2)\n"
              "install_stack_dumps()\n"
              "where_the_rank_waits()\n"
              "print('still running')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running"
    assert "most recent call first" in done.stderr
    assert 'line 4 in where_the_rank_waits' in done.stderr
