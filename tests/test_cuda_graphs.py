"""The engine's CUDA-graph orchestration (training/engine.LayerGraphs) on CPU, with a recording stand-in for
megatron's TECudaGraphHelper: when it captures, with which shapes, what megatron's micro-batch calculator is told,
and that the distributed optimizer's hooks are off during the capture. The graphs themselves need a GPU and
Transformer Engine: tests/test_gpu.py checks that training with them matches training without."""

from __future__ import annotations

import types

import pytest
import torch

from acemath_mcore.models.builder import CUDA_GRAPH_WARMUP_STEPS


class RecordingHelper:
    calls: list = []

    def __init__(self, model, config, seq_length, micro_batch_size, optimizers=()):
        self.calls.append(("helper", seq_length, micro_batch_size, tuple(optimizers)))

    def create_cudagraphs(self):
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        self.calls.append(("capture", get_num_microbatches()))

    def cuda_graph_set_manual_hooks(self):
        self.calls.append(("manual hooks",))

    def graphs_created(self):
        return self.created

    created = True


class HookedChunk:
    use_forward_hook = True

    def disable_forward_pre_hook(self, param_sync=True):
        RecordingHelper.calls.append(("disable hooks", param_sync))

    def enable_forward_pre_hook(self):
        RecordingHelper.calls.append(("enable hooks",))


def packed(tokens: int) -> dict:
    return {"tokens": torch.zeros(1, tokens, dtype=torch.long), "cu_seqlens": torch.tensor([0, tokens])}


@pytest.fixture
def graphs(monkeypatch):
    import megatron.core.transformer.cuda_graphs as cuda_graphs
    from megatron.core import parallel_state

    from acemath_mcore.training.engine import LayerGraphs

    RecordingHelper.calls = []
    monkeypatch.setattr(cuda_graphs, "TECudaGraphHelper", RecordingHelper)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    engine = types.SimpleNamespace(model=[HookedChunk()], config=object(), optimizer="the optimizer")
    yield LayerGraphs(engine)
    from megatron.core import num_microbatches_calculator

    num_microbatches_calculator.destroy_num_microbatches_calculator()


def test_capture_after_the_warmup_steps_with_the_step_shape(graphs):
    step = [packed(4096), packed(4096), packed(4096)]
    for _ in range(CUDA_GRAPH_WARMUP_STEPS):
        graphs.before_step(step)
    assert RecordingHelper.calls == []  # eager steps first
    graphs.before_step(step)
    assert RecordingHelper.calls == [
        ("disable hooks", False),  # no parameter all-gather for the capture's throw-away passes
        ("helper", 4096, 1, ("the optimizer",)),  # a packed micro-batch is one row of all its tokens
        ("capture", 3),  # the calculator counts this rank's micro-batches per step
        ("enable hooks",),
        ("manual hooks",),
    ]
    graphs.before_step(step)  # replays: nothing more to capture
    assert len(RecordingHelper.calls) == 5


def test_other_shapes_after_the_capture_are_refused(graphs):
    step = [packed(4096), packed(4096)]
    for _ in range(CUDA_GRAPH_WARMUP_STEPS + 1):
        graphs.before_step(step)
    with pytest.raises(ValueError, match=r"captured for 2 micro-batches of \(tokens, rows\) \(4096, 1\); this step "
                                         r"has 2 of \[\(2048, 1\), \(4096, 1\)\]"):
        graphs.before_step([packed(4096), packed(2048)])
    with pytest.raises(ValueError, match=r"this step has 3 of \[\(4096, 1\)\]"):
        graphs.before_step(step + [packed(4096)])


def test_a_capture_that_graphs_no_layer_stops_the_run(graphs, monkeypatch):
    monkeypatch.setattr(RecordingHelper, "created", False)
    for _ in range(CUDA_GRAPH_WARMUP_STEPS):
        graphs.before_step([packed(64)])
    with pytest.raises(RuntimeError, match="megatron found no layer to graph in this model"):
        graphs.before_step([packed(64)])


def test_a_capture_step_with_mixed_shapes_is_refused(graphs):
    for _ in range(CUDA_GRAPH_WARMUP_STEPS):
        graphs.before_step([packed(100), packed(200)])  # eager steps take any shapes
    with pytest.raises(ValueError, match=r"CUDA graphs need micro-batches of one shape, this step's have \(tokens, "
                                         r"rows\) \[\(100, 1\), \(200, 1\)\]"):
        graphs.before_step([packed(100), packed(200)])
