"""acemath_mcore.runtime.local_workers: workers forked from a preloaded fork server behave like spawned ones
(the caller's environment, no state carried between calls), and failures reach the caller."""

from __future__ import annotations

import os
import sys

import pytest

from acemath_mcore.runtime.local_workers import run_local_workers


def _describe(rank, world_size, variable):
    import megatron.core.parallel_state as parallel_state

    left_by_earlier_call = getattr(parallel_state, "_test_mark", None)
    parallel_state._test_mark = rank
    return dict(rank=rank, env_rank=os.environ["RANK"], world=os.environ["WORLD_SIZE"], pid=os.getpid(),
                variable=os.environ.get(variable), left_by_earlier_call=left_by_earlier_call)


def _megatron_already_imported(rank, world_size):
    return "megatron.core" in sys.modules


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("bad shard 17")
    return rank


def _die(rank, world_size):
    os._exit(3)


def test_workers_see_the_callers_environment_now_and_nothing_from_earlier_calls(monkeypatch):
    variable = "ACEMATH_TEST_LOCAL_WORKERS"
    monkeypatch.delenv(variable, raising=False)
    first = run_local_workers(_describe, 2, variable, timeout=120)
    monkeypatch.setenv(variable, "set after the first call")
    second = run_local_workers(_describe, 2, variable, timeout=120)

    assert [r["rank"] for r in first] == [0, 1] and [r["env_rank"] for r in second] == ["0", "1"]
    assert {r["world"] for r in first + second} == {"2"}
    assert len({r["pid"] for r in first + second} | {os.getpid()}) == 5
    assert [r["variable"] for r in first] == [None, None]
    assert [r["variable"] for r in second] == ["set after the first call"] * 2
    assert [r["left_by_earlier_call"] for r in first + second] == [None] * 4


def test_forked_workers_start_with_megatron_imported_and_fresh_interpreters_without(monkeypatch):
    from acemath_mcore.runtime import local_workers

    assert run_local_workers(_megatron_already_imported, 1, timeout=120) == [True]
    assert run_local_workers(_megatron_already_imported, 1, timeout=120, fresh_interpreter=True) == [False]
    # With CUDA the fork server could hold a CUDA context (Transformer Engine's import): workers are spawned.
    monkeypatch.setattr(local_workers.device_lib, "cuda_available", lambda: True)
    assert run_local_workers(_megatron_already_imported, 1, timeout=120) == [False]


def test_a_workers_exception_reaches_the_caller_with_its_traceback():
    with pytest.raises(RuntimeError, match="worker rank 1 failed") as error:
        run_local_workers(_fail_on_rank_one, 2, timeout=120)
    assert "ValueError: bad shard 17" in str(error.value) and "_fail_on_rank_one" in str(error.value)


def test_a_worker_that_dies_is_reported_with_its_exit_code():
    with pytest.raises(RuntimeError, match=r"worker rank 0 died with exit code 3"):
        run_local_workers(_die, 1, timeout=120)
