"""Distributed optimizer with overlap_param_gather (DP=2, fp32, real megatron-core on gloo): the same losses as
without the overlap, and a checkpoint saved right after an optimizer step holds the updated weights of every
shard, not the stale ones a rank keeps until its next forward pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from acemath_mcore.runtime import release_model_parallel
from distributed_helpers import run_workers

STEPS = 3


def _micro_batches(vocab: int, dp_rank: int):
    tokens = torch.randint(0, vocab, (8, 25), generator=torch.Generator().manual_seed(0))[dp_rank * 4:dp_rank * 4 + 4]
    return [{"tokens": tokens[i:i + 2, :-1].contiguous(), "labels": tokens[i:i + 2, 1:].contiguous(),
             "loss_mask": torch.ones(2, 24), "position_ids": torch.arange(24).expand(2, -1).contiguous()}
            for i in (0, 2)]


def _runs(rank, world_size, root):
    from megatron.core import parallel_state

    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.models.weights import canonical_parameters
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training import checkpointing
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    arch = dataclasses.replace(get_preset("tiny"), vocab_size=256)
    full = random_full_weights(arch, seed=7)

    def engine(overlap: bool, lr: float = 1e-2):
        init_distributed(ParallelConfig(), seed=1)
        built = Engine(arch, ParallelConfig(), ModelOptions(spec="native"),
                       OptimConfig(lr=lr, use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                                   overlap_param_gather=overlap), train_steps=STEPS + 1)
        built.load_full_weights(full)
        return built

    def weights(built):
        return {name: param.detach().clone() for name, param in canonical_parameters(built.model[0])}

    results = {}
    for overlap in (False, True):
        trained = engine(overlap)
        batches = _micro_batches(arch.vocab_size, parallel_state.get_data_parallel_rank())
        losses = [trained.train_step(SFTTask(), batches)["lm_loss"] for _ in range(STEPS)]
        if overlap:
            results["stale_before_save"] = any(not torch.equal(a, b) for a, b in zip(
                weights(trained).values(), results["weights_overlap0"].values()))
            checkpointing.save_checkpoint(root, STEPS, trained.model, trained.optimizer, trained.scheduler, {})
        else:
            results["weights_overlap0"] = weights(trained)
        losses.append(trained.train_step(SFTTask(), batches)["lm_loss"])  # training goes on after a save
        results[f"losses_overlap{int(overlap)}"] = losses
        release_model_parallel()

    fresh = engine(False, lr=0.0)
    checkpointing.load_weights(f"{root}/iter_{STEPS:07d}", fresh.model)
    results["saved_weights"] = weights(fresh)
    release_model_parallel()
    return results


@pytest.fixture(scope="module")
def overlap_results(tmp_path_factory):
    return run_workers(_runs, 2, str(tmp_path_factory.mktemp("overlap")))


def test_losses_match_the_distributed_optimizer_without_overlap(overlap_results):
    for rank_results in overlap_results:
        reference = rank_results["losses_overlap0"]
        assert reference[-1] < reference[0]
        assert rank_results["losses_overlap1"] == pytest.approx(reference, abs=1e-6, rel=0)


def test_checkpoint_after_a_step_holds_every_shard_updated(overlap_results):
    # The overlap really defers the gather: some rank holds stale shards right after its optimizer step...
    assert any(rank_results["stale_before_save"] for rank_results in overlap_results)
    # ...and the saved model tensors are nevertheless the fully updated weights.
    for rank_results in overlap_results:
        expected = rank_results["weights_overlap0"]
        saved = rank_results["saved_weights"]
        assert saved.keys() == expected.keys()
        for name, tensor in saved.items():
            assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name


def test_overlap_param_gather_needs_the_distributed_optimizer_and_overlapped_grad_reduce():
    """For library callers that skip the recipes' checks (megatron-core 0.16 would not say)."""
    from acemath_mcore.models import ModelOptions, get_preset
    from acemath_mcore.runtime import ParallelConfig
    from acemath_mcore.training.engine import Engine, OptimConfig

    with pytest.raises(ValueError, match="optim.overlap_param_gather=true needs optim.use_distributed_optimizer"):
        Engine(get_preset("tiny"), ParallelConfig(), ModelOptions(spec="native"),
               OptimConfig(overlap_param_gather=True, overlap_grad_reduce=True), train_steps=1)
