"""The SFT recipes carry the paper's numbers (arXiv 2412.15084, written out here, not read from the recipes) and
chain their stages: base -> general SFT stage 1 -> stage 2 -> math SFT."""

import logging

import pytest

from acemath_mcore.recipes import RECIPES, get_recipe, recipe_kind

BACKBONES = {"qwen25_math_1p5b": "qwen2.5-math-1.5b", "qwen25_math_7b": "qwen2.5-math-7b",
             "qwen25_math_72b": "qwen2.5-math-72b", "llama31_8b": "llama3.1-8b", "qwen25_1p5b": "qwen2.5-1.5b",
             "qwen25_7b": "qwen2.5-7b", "qwen25_72b": "qwen2.5-72b"}
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
    # The paper's batch counts conversations: the trainer sizes the packed rows per step from the data.
    assert config.global_batch_size is None
    assert config.global_batch_conversations == (256 if "72b" in model else 128)
    assert (config.data.seq_length, config.epochs) == (4096, 1.0)
    assert config.model_options.bf16
    assert config.checkpoint.save_dir == f"checkpoints/{model}-{stage}"
    assert config.checkpoint.init_from == f"checkpoints/{model}-{STARTS_FROM[stage]}"
    # On the recipe's own node count, with AceMath-like data (~8.2 conversations per packed row: 492 tokens on
    # average in 4096), a step's whole micro-batches on every data-parallel rank hold within 20% of that.
    parallel = config.parallel
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    gpus = 32 if "72b" in model else 8
    assert gpus % model_parallel == 0
    unit = gpus // model_parallel * config.micro_batch_size
    unit *= parallel.pipeline_parallel if parallel.virtual_pipeline_parallel else 1
    best_rows = min(range(unit, 100 * unit, unit), key=lambda rows: abs(rows * 8.2 - config.global_batch_conversations))
    assert 0.8 <= best_rows * 8.2 / config.global_batch_conversations <= 1.2


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


def _sized(layout, conversations, saved_rows=None, world_size=8):
    """size_batch_in_units at micro-batch 1 for 820 conversations in 100 rows (8.2 per row): the config it
    set and the log lines."""
    from acemath_mcore.recipes import apply_overrides, get_recipe
    from acemath_mcore.training.trainer import size_batch_in_units
    from acemath_mcore.training.trainer import TrainingData

    tp, pp, vpp = layout
    config = apply_overrides(get_recipe("tiny_sft"), [
        "global_batch_size=null", f"global_batch_conversations={conversations}", "micro_batch_size=1",
        f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
        f"parallel.virtual_pipeline_parallel={vpp or 'none'}"])
    data = TrainingData(num_samples=100, make_loader=None, sequence_lengths=None, documents=820)
    recorder = _Recorder()
    logger = logging.getLogger("acemath_mcore")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(recorder)
    try:
        size_batch_in_units(config, data, world_size=world_size, saved_rows=saved_rows)
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)
    return config, recorder.lines


@pytest.mark.parametrize("layout, conversations, rows", [
    ((2, 1, None), 128, 16),  # DP 4: 15.6 rows wanted, 16 hold 131
    ((1, 2, 2), 96, 8),  # DP 4, interleaved: groups of 4 x PP 2 = 8 rows; 11.7 wanted, 8 (65.6) nearer than 16
])
def test_a_batch_in_conversations_becomes_the_nearest_whole_micro_batches_of_rows(layout, conversations, rows):
    config, lines = _sized(layout, conversations)
    assert config.global_batch_size == rows
    held = rows * 8.2
    assert ("INFO", f"global batch: {rows} rows of 8.20 conversations on average, about {held:.0f} conversations "
                    f"per step (global_batch_conversations={conversations})") in lines
    warnings = [message for levelname, message in lines if levelname == "WARNING"]
    assert bool(warnings) == (not 0.8 <= held / conversations <= 1.25)
    if rows == 8:
        assert warnings == ["a step holds about 66 conversations, not the 96 asked for: its rows come in multiples "
                            "of 8 (micro_batch_size x data-parallel size x pipeline_parallel); lower "
                            "micro_batch_size, use fewer GPUs, or set global_batch_size (and "
                            "global_batch_conversations=null)"]


def test_a_batch_more_than_twice_off_its_conversations_is_refused():
    """128 conversations on 64 data-parallel ranks: a step cannot be smaller than 64 rows, ~525 conversations."""
    with pytest.raises(ValueError) as refused:
        _sized((1, 1, None), 128, world_size=64)
    assert str(refused.value) == (
        "a step would hold about 525 conversations, 4.1x the global_batch_conversations=128 asked for: its rows come "
        "in multiples of 64 (micro_batch_size x data-parallel size); lower micro_batch_size, use fewer GPUs, or set "
        "global_batch_size (and global_batch_conversations=null)")


def test_a_resumed_run_keeps_its_checkpoints_rows_per_step_or_says_why_it_cannot():
    config, lines = _sized((2, 1, None), 64, saved_rows=12)  # 64 conversations would round to 8 rows here
    assert config.global_batch_size == 12
    assert lines == [("INFO", "global batch: 12 rows per step, as in the checkpoint being resumed "
                              "(global_batch_conversations=64)")]
    with pytest.raises(ValueError, match=r"the checkpoint being resumed took 14 rows per step "
                                         r"\(global_batch_conversations=64\), which do not split into whole "
                                         r"micro-batches of micro_batch_size x data-parallel size = 4 here"):
        _sized((2, 1, None), 64, saved_rows=14)


def test_every_backbone_has_all_three_stages_and_nothing_else_is_sft():
    sft = {name for name in RECIPES if recipe_kind(name) == "sft"}
    expected = {f"{prefix}_{stage}" for prefix in BACKBONES for stage in PAPER_LR}
    assert sft - {"tiny_sft"} == expected


def test_a_resume_whose_rows_held_other_samples_is_refused(monkeypatch, tmp_path):
    """An RM run saved under the padded recipe (256 problems of 4,096-token rows per step) resumed under packed
    bins sized in problems would have read its 256 as bins, ~8x the batch."""
    from megatron.core import dist_checkpointing

    from acemath_mcore.recipes import get_recipe
    from acemath_mcore.training import trainer

    latest = tmp_path / "iter_0000010"
    monkeypatch.setattr(trainer, "resume_point", lambda config: latest)
    saved = {"global_batch_size": 256, "data": {"packed": False, "seq_length": 4096}}
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda path: {"train_state": saved})
    with pytest.raises(ValueError) as refused:
        trainer.saved_rows_per_step(get_recipe("qwen25_math_7b_rm"))
    assert str(refused.value) == (
        f"{latest} was trained on other rows (data.packed=false data.seq_length=4096, global_batch_size=256): its "
        "step count and data position count in them. Resume it with data.packed=false data.seq_length=4096 "
        "global_batch_size=256 global_batch_problems=null, or start a new stage from its weights with "
        f"checkpoint.init_from={latest} and another checkpoint.save_dir")
    saved["data"] = {"packed": True, "seq_length": 6 * 4096}
    assert trainer.saved_rows_per_step(get_recipe("qwen25_math_7b_rm")) == 256
