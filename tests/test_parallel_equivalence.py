"""TP / PP / VPP / DP layouts compute the same loss and gradients as a single rank (fp32, real megatron-core).

All layouts run inside one group of 4 spawned gloo workers: megatron's parallel state is rebuilt for each.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from acemath_mcore.runtime import release_model_parallel
from distributed_helpers import run_workers

WORLD_SIZE = 4
GLOBAL_BATCH = 8
SEQ = 24
STEPS = 3


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    micro_batch: int = 2
    distributed_optimizer: bool = False
    wgrad_fusion: bool = True  # gradient-accumulation fusion (runtime/wgrad_fusion on CPU)
    overlap: bool = False  # overlap_grad_reduce, and overlap_param_gather with the distributed optimizer
    recompute: str | None = None  # activation recompute: None | "selective" | "full" (the RM and 72B recipes')

    def __str__(self):
        return (f"tp{self.tp}-pp{self.pp}-vpp{self.vpp}-mbs{self.micro_batch}-distopt{int(self.distributed_optimizer)}"
                f"-wgradfusion{int(self.wgrad_fusion)}-overlap{int(self.overlap)}-recompute{self.recompute}")


def make_global_batch(vocab: int, seed: int = 0):
    """One global batch of padded samples with random response masks (about 30% of tokens excluded)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) > 0.3).float()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, -1).contiguous()}


def micro_batches_for_rank(global_batch, dp_rank, dp_size, micro_batch):
    per_rank = GLOBAL_BATCH // dp_size
    start = dp_rank * per_rank
    return [{k: v[i:i + micro_batch] for k, v in global_batch.items()}
            for i in range(start, start + per_rank, micro_batch)]


def _run_layouts(rank, world_size, layouts, arch):
    from megatron.core import parallel_state

    from acemath_mcore.models import ModelOptions
    from acemath_mcore.models.weights import canonical_parameters
    from model_weights import random_full_weights, unshard
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    full = random_full_weights(arch, seed=7)
    batch = make_global_batch(arch.vocab_size)
    results = {}
    for layout in layouts:
        parallel = ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                                  virtual_pipeline_parallel=layout.vpp)
        init_distributed(parallel, seed=1)
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        options = ModelOptions(spec="native", gradient_accumulation_fusion=layout.wgrad_fusion,
                               recompute=layout.recompute)
        engine = Engine(arch, parallel, options,
                        OptimConfig(lr=1e-2, clip_grad=1.0, weight_decay=0.01,
                                    use_distributed_optimizer=layout.distributed_optimizer,
                                    overlap_grad_reduce=layout.overlap,
                                    overlap_param_gather=layout.overlap and layout.distributed_optimizer),
                        train_steps=STEPS)
        engine.load_full_weights(full)
        task = SFTTask()

        # Gradients of the first global batch, before any optimizer step (plain DDP only: the distributed
        # optimizer keeps only this rank's shard of the reduced gradient).
        grads = None
        if not layout.distributed_optimizer:
            engine.forward_backward(task, micro_batches_for_rank(batch, dp_rank, dp_size, layout.micro_batch))
            mine = {}
            if dp_rank == 0:
                for chunk in engine.model:
                    for name, param in canonical_parameters(chunk):
                        if not (arch.tie_embeddings and name == "output_layer.weight"):
                            mine[name] = (parallel_state.get_tensor_model_parallel_rank(), param.main_grad.clone())
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, mine)
            pieces = {}
            for per_rank in gathered:
                for name, (tp_rank, grad) in per_rank.items():
                    pieces.setdefault(name, {})[tp_rank] = grad
            grads = {name: unshard(name, [by_rank[r] for r in sorted(by_rank)]) for name, by_rank in pieces.items()}

        losses = []
        for _ in range(STEPS):  # the same batch each step: the loss must fall, identically in every layout
            metrics = engine.train_step(task, micro_batches_for_rank(batch, dp_rank, dp_size, layout.micro_batch))
            losses.append(metrics["lm_loss"])
        results[str(layout)] = {"losses": losses, "grads": grads}
        release_model_parallel()
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def layout_results():
    from acemath_mcore.models import get_preset

    arch = get_preset("tiny")
    arch = dataclasses.replace(arch, vocab_size=256)  # keeps the test fast; shapes otherwise the tiny preset's
    layouts = [Layout(), Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=2), Layout(pp=2, vpp=2),
               Layout(pp=2, vpp=2, micro_batch=1),  # 4 micro-batches: interleaved steady state (batched P2P bug)
               Layout(tp=2, pp=2, micro_batch=1), Layout(micro_batch=1), Layout(tp=2, distributed_optimizer=True),
               Layout(distributed_optimizer=True),
               Layout(wgrad_fusion=False), Layout(tp=2, pp=2, micro_batch=1, wgrad_fusion=False),
               Layout(overlap=True), Layout(distributed_optimizer=True, overlap=True),
               Layout(pp=2, vpp=2, micro_batch=1, distributed_optimizer=True, overlap=True),
               Layout(recompute="selective"), Layout(recompute="full"),
               Layout(tp=2, pp=2, micro_batch=1, recompute="full")]
    return run_workers(_run_layouts, WORLD_SIZE, layouts, arch)[0], layouts


def test_losses_match_single_rank_layout(layout_results):
    results, layouts = layout_results
    reference = results[str(layouts[0])]["losses"]
    assert reference[-1] < reference[0], f"training did not lower the loss: {reference}"
    for layout in layouts[1:]:
        losses = results[str(layout)]["losses"]
        assert losses == pytest.approx(reference, abs=1e-5, rel=0), f"{layout}: {losses} vs {reference}"


def test_gradients_match_single_rank_layout(layout_results):
    results, layouts = layout_results
    reference = results[str(layouts[0])]["grads"]
    assert len(reference) == 4 * 7 + 2  # 7 tensors per layer (qkv bias included) + embedding + final norm
    for layout in layouts[1:]:
        grads = results[str(layout)]["grads"]
        if grads is None:
            continue
        assert grads.keys() == reference.keys(), layout
        for name, grad in grads.items():
            diff = (grad - reference[name]).abs().max().item()
            assert diff <= 1e-5, f"{layout}: gradient of {name} differs by {diff}"
            assert reference[name].abs().max() > 0, f"{name} has an all-zero gradient"
