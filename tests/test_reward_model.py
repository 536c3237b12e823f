"""The reward model on real megatron-core (fp32, two spawned gloo workers, one spawn for every check):

- TP=2, PP=2 and PP=2 x VPP=2 give the loss of TP=1 (data parallel over both workers), padded and packed;
- a response's score does not depend on padding or on packed neighbours;
- dist checkpoints save and load the head, at any layout (scorers at TP=1, PP=2, PP=2 x VPP=2 reproduce TP=2);
- a weights-only load from an LM checkpoint keeps the trunk and starts a fresh head;
- in bf16 the head stays fp32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from acemath_mcore.runtime import release_model_parallel
from distributed_helpers import run_workers

WORLD_SIZE = 2
# Responses per problem: AceMath samples 6, and a problem with fewer candidates keeps fewer, so the padded
# micro-batches (one group each) differ in shape, which pipeline stages must exchange (engine.run_schedule).
GROUP_SIZES = (6, 4, 6, 3)
PADDED_LENGTH = 16
PACKED_LENGTH = 160  # two groups of at most 6 x 12 tokens per packed micro-batch
# (TP, PP, VPP), the rest of the 2 ranks data parallel; TP=2 runs first: its checkpoint is the scorers' reference.
LAYOUTS = ((2, 1, None), (1, 1, None), (1, 2, None), (1, 2, 2))
STEPS = 2


def make_groups(vocab: int, seed: int = 0):
    """Problem groups of GROUP_SIZES random responses (4..12 tokens) with at least one positive and one negative."""
    from acemath_mcore.data.rm_data import RMGroupSample

    rng = np.random.default_rng(seed)
    groups = []
    for index, size in enumerate(GROUP_SIZES):
        labels = np.zeros(size, dtype=np.float32)
        labels[rng.permutation(size)[:1 + index % (size - 1)]] = 1.0
        responses = [rng.integers(3, vocab, size=rng.integers(4, 13)) for _ in range(size)]
        groups.append(RMGroupSample(responses, labels))
    return groups


def global_batches(groups):
    """The same global batch as padded micro-batches (one group each, topped up with unscored rows to the largest
    group, as the loader does under pipeline parallelism), as ragged padded ones (each group's own rows) and as
    packed ones (two groups each)."""
    from acemath_mcore.data.rm_data import collate_rm_packed, collate_rm_padded

    return {
        "padded": [collate_rm_padded([[group]], pad_id=0, seq_length=PADDED_LENGTH, num_rows=max(GROUP_SIZES))
                   for group in groups],
        "ragged": [collate_rm_padded([[group]], pad_id=0, seq_length=PADDED_LENGTH) for group in groups],
        "packed": [collate_rm_packed([groups[i:i + 2]], pad_id=0, total_length=PACKED_LENGTH)
                   for i in range(0, len(groups), 2)],
    }


def _scores_alone_padded_and_packed(model, groups, qkv_format):
    """Scores of every response alone in a row of its own length, in a padded batch, and in packed rows with
    other responses before and after it (two orders)."""
    from acemath_mcore.data.rm_data import RMGroupSample, collate_rm_packed, collate_rm_padded
    from acemath_mcore.models.reward import response_scores
    from acemath_mcore.training.engine import packed_seq_params

    def run(batch):
        output = model(batch["tokens"], batch["position_ids"], None,
                       packed_seq_params=packed_seq_params(batch, qkv_format))
        return response_scores(output, batch["score_index"], packed="cu_seqlens" in batch)

    responses = [r for group in groups for r in group.responses]
    singles = [RMGroupSample([r], np.zeros(1, dtype=np.float32)) for r in responses]
    with torch.no_grad():
        alone = torch.cat([run(collate_rm_padded([[s]], 0, len(s.responses[0]))) for s in singles])
        padded = run(collate_rm_padded([[group] for group in groups], 0, 2 * PADDED_LENGTH))
        packed = run(collate_rm_packed([groups], 0, 400))
        reversed_order = run(collate_rm_packed([singles[::-1]], 0, 400)).flip(0)
    return alone, padded, packed, reversed_order


def _worker(rank, world_size, arch, tmp):
    from megatron.core import parallel_state

    from acemath_mcore.models import ModelOptions, build_model_chunk
    from acemath_mcore.models.families import REWARD_HEAD_WEIGHT
    from acemath_mcore.models.reward import build_reward_model_chunk
    from acemath_mcore.models.weights import canonical_parameters
    from model_weights import random_full_weights
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training import checkpointing
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.reward import RewardScorer, RewardTask

    lm_weights = random_full_weights(arch, seed=7)
    rm_weights = dict(lm_weights)
    rm_weights[REWARD_HEAD_WEIGHT] = 0.05 * torch.randn(1, arch.hidden_size, generator=torch.Generator().manual_seed(3))
    groups = make_groups(arch.vocab_size)
    batches = global_batches(groups)
    sequences = [r for group in groups for r in group.responses]
    results = {"losses": {}, "scores": {}}

    def engine_for(tp, pp, vpp=None, options=ModelOptions(spec="native"), builder=build_reward_model_chunk):
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_parallel=vpp)
        if parallel_state.model_parallel_is_initialized():
            release_model_parallel()
        init_distributed(parallel, seed=1)
        return parallel, Engine(arch, parallel, options, OptimConfig(lr=1e-3), train_steps=STEPS,
                                model_chunk_builder=builder)

    for layout in LAYOUTS:
        for form, micro_batches in batches.items():
            parallel, engine = engine_for(*layout)
            engine.load_full_weights(rm_weights)
            dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
            per_rank = len(micro_batches) // dp_size
            mine = micro_batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            if form == "ragged" and layout[1] > 1:
                try:
                    engine.train_step(RewardTask("listwise_bt"), mine)
                except ValueError as error:
                    results["ragged_pipeline_error"] = str(error)
                continue
            results["losses"][(*layout, form)] = [engine.train_step(RewardTask("listwise_bt"), mine)
                                                 for _ in range(STEPS)]
        if layout == (1, 1, None):
            results["invariance"] = _scores_alone_padded_and_packed(
                engine.model[0].eval(), groups, engine.packed_qkv_format)
        if layout == (2, 1, None):  # the trained TP=2 model is the reference for checkpoint round trips
            checkpointing.save_checkpoint(f"{tmp}/rm", STEPS, engine.model, engine.optimizer, engine.scheduler,
                                          {"consumed_samples": 0})
            trained_head = engine.model[0].module.reward_head.weight.detach().clone()
        scorer = RewardScorer(arch, f"{tmp}/rm", parallel, ModelOptions(spec="native"), tokens_per_row=48)
        results["scores"][layout] = scorer.score(sequences, show_progress=False)
        if layout == (2, 1, None):
            results["head_round_trip"] = torch.equal(scorer.chunks[-1].reward_head.weight, trained_head)

    # A reward model initialised from an LM checkpoint: trunk loaded, LM head ignored, head freshly initialised.
    _, lm_engine = engine_for(1, 1, builder=build_model_chunk)
    lm_engine.load_full_weights(lm_weights)
    checkpointing.save_checkpoint(f"{tmp}/lm", 1, lm_engine.model, lm_engine.optimizer, lm_engine.scheduler,
                                  {"consumed_samples": 0})
    _, rm_engine = engine_for(1, 1)
    fresh_head = rm_engine.model[0].module.reward_head.weight.detach().clone()
    checkpointing.load_weights(f"{tmp}/lm", rm_engine.model, keep_missing_optional=True)
    loaded = dict(canonical_parameters(rm_engine.model[0]))
    try:  # scoring with the LM checkpoint by mistake: an untrained head would score at random
        RewardScorer(arch, f"{tmp}/lm", ParallelConfig(), ModelOptions(spec="native"), tokens_per_row=48)
        results["lm_scoring_error"] = None
    except ValueError as error:
        results["lm_scoring_error"] = str(error)
    results["lm_init"] = {
        "trunk_equal": all(torch.equal(param, lm_weights[name]) for name, param in loaded.items()
                           if name != REWARD_HEAD_WEIGHT),
        "head_kept": torch.equal(loaded[REWARD_HEAD_WEIGHT], fresh_head),
        "head_std": fresh_head.std().item(),
        "names": sorted(loaded),
    }

    # bf16: Float16Module casts the model to bf16, except the head.
    _, bf16_engine = engine_for(1, 1, options=ModelOptions(spec="native", bf16=True))
    bf16_engine.load_full_weights(rm_weights)
    model = bf16_engine.model[0].module.module
    metrics = bf16_engine.train_step(RewardTask("listwise_bt"), batches["padded"][rank::world_size])
    results["bf16"] = {"head": model.reward_head.weight.dtype, "trunk": model.decoder.final_layernorm.weight.dtype,
                       "loss": metrics["rm_loss"]}
    release_model_parallel()
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from acemath_mcore.models import get_preset

    arch = dataclasses.replace(get_preset("tiny"), vocab_size=256)
    return run_workers(_worker, WORLD_SIZE, arch, str(tmp_path_factory.mktemp("rm_model")))


@pytest.mark.parametrize("form", ["padded", "packed"])
def test_tensor_and_pipeline_parallel_losses_equal_single_rank(results, form):
    reference = [m["rm_loss"] for m in results[0]["losses"][(1, 1, None, form)]]
    assert reference[1] < reference[0], f"training did not lower the loss: {reference}"
    for layout in LAYOUTS:
        for rank_results in results:
            steps = rank_results["losses"][(*layout, form)]
            assert [m["rm_loss"] for m in steps] == pytest.approx(reference, abs=1e-5, rel=0), layout
            assert steps[0]["pairwise_accuracy"] == pytest.approx(
                results[0]["losses"][(1, 1, None, form)][0]["pairwise_accuracy"], abs=1e-6)


def test_padded_and_packed_global_batches_give_the_same_loss(results):
    padded, packed = (results[0]["losses"][(1, 1, None, form)][0]["rm_loss"] for form in ("padded", "packed"))
    assert packed == pytest.approx(padded, abs=1e-5, rel=0)


def test_unscored_filler_rows_leave_the_loss_unchanged(results):
    padded = [m["rm_loss"] for m in results[0]["losses"][(1, 1, None, "padded")]]
    for layout in ((1, 1, None), (2, 1, None)):
        ragged = [m["rm_loss"] for m in results[0]["losses"][(*layout, "ragged")]]
        assert ragged == pytest.approx(padded, abs=1e-5, rel=0), layout


def test_pipeline_refuses_micro_batches_of_several_shapes_by_name(results):
    error = results[0]["ragged_pipeline_error"]
    assert "pipeline parallelism needs micro-batches of one shape" in error
    assert "(16, 6)" in error and "(16, 3)" in error


def test_scores_do_not_depend_on_padding_or_packed_neighbours(results):
    alone, padded, packed, reversed_order = results[0]["invariance"]
    assert alone.std() > 0.1, "scores should differ between responses for this check to mean anything"
    for name, scores in (("padded", padded), ("packed", packed), ("packed, reversed order", reversed_order)):
        difference = (scores - alone).abs().max().item()
        assert difference <= 1e-5, f"{name}: scores differ from single-response rows by {difference}"


def test_checkpoint_keeps_the_head_and_loads_at_any_layout(results):
    assert results[0]["head_round_trip"], "the TP=2 scorer did not load the trained head"
    reference = results[0]["scores"][(2, 1, None)]
    for layout in LAYOUTS:
        for rank_results in results:  # every rank returns every score (data-parallel ranks split the work)
            assert rank_results["scores"][layout] == pytest.approx(reference, abs=1e-5, rel=0), layout


def test_lm_checkpoint_initialises_the_trunk_and_a_fresh_head(results):
    lm_init = results[0]["lm_init"]
    assert lm_init["trunk_equal"]
    assert lm_init["head_kept"] and 0.01 < lm_init["head_std"] < 0.03  # normal(0, init_method_std=0.02)
    assert "output_layer.weight" not in lm_init["names"]


def test_scoring_refuses_a_checkpoint_without_a_reward_head(results):
    for rank_results in results:
        error = rank_results["lm_scoring_error"]
        assert error is not None and error.endswith("has no reward_head.weight: it holds no trained head for this "
                                                    "model (a language model's checkpoint, e.g. an SFT stage's, "
                                                    "where a reward model's was expected?)")


def test_bf16_keeps_the_head_in_fp32(results):
    bf16 = results[0]["bf16"]
    assert bf16["head"] == torch.float32 and bf16["trunk"] == torch.bfloat16
    assert np.isfinite(bf16["loss"])
