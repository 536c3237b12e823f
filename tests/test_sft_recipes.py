"""The SFT recipes carry the paper's numbers (arXiv 2412.15084, written out here, not read from the recipes) and
chain their stages: base -> general SFT stage 1 -> stage 2 -> math SFT."""

import pytest

from acemath_mcore.recipes import RECIPES, get_recipe, recipe_kind

BACKBONES = {"qwen25_math_1p5b": "qwen2.5-math-1.5b", "qwen25_math_7b": "qwen2.5-math-7b",
             "qwen25_math_72b": "qwen2.5-math-72b", "llama31_8b": "llama3.1-8b"}
PAPER_LR = {"sft_stage1": 5e-6, "sft_stage2": 5e-6, "math_sft": 3e-6}
STARTS_FROM = {"sft_stage1": "base", "sft_stage2": "sft_stage1", "math_sft": "sft_stage2"}


@pytest.mark.parametrize("prefix", sorted(BACKBONES))
@pytest.mark.parametrize("stage", sorted(PAPER_LR))
def test_paper_sft_recipes(prefix, stage):
    model = BACKBONES[prefix]
    config = get_recipe(f"{prefix}_{stage}")
    assert recipe_kind(f"{prefix}_{stage}") == "sft"
    assert config.model == model
    assert config.optim.lr == PAPER_LR[stage] and config.optim.decay_style == "cosine"
    assert config.global_batch_size == (256 if "72b" in model else 128)
    assert (config.data.seq_length, config.epochs) == (4096, 1.0)
    assert config.model_options.bf16
    assert config.checkpoint.save_dir == f"checkpoints/{model}-{stage}"
    assert config.checkpoint.init_from == f"checkpoints/{model}-{STARTS_FROM[stage]}"
    # One step's rows divide over data-parallel ranks and micro-batches on the recipe's own node count.
    parallel = config.parallel
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    gpus = 32 if "72b" in model else 8
    assert gpus % model_parallel == 0
    assert config.global_batch_size % (gpus // model_parallel * config.micro_batch_size) == 0


def test_every_backbone_has_all_three_stages_and_nothing_else_is_sft():
    sft = {name for name in RECIPES if recipe_kind(name) == "sft"}
    expected = {f"{prefix}_{stage}" for prefix in BACKBONES for stage in PAPER_LR}
    assert sft - {"tiny_sft"} == expected
