"""Reward-model recipes (the paper's numbers), config overrides and the launch/train_rm.py entry point."""

import json
import logging

import pytest

from acemath_mcore.launch_common import main_for
from acemath_mcore.recipes import apply_overrides, get_recipe
from acemath_mcore.training.reward import train_reward_model


@pytest.mark.parametrize("name, model, lr", [("qwen25_math_7b_rm", "qwen2.5-math-7b", 5e-6),
                                             ("qwen25_math_72b_rm", "qwen2.5-math-72b", 2e-6)])
def test_paper_recipes(name, model, lr):
    config = get_recipe(name)
    assert (config.model, config.optim.lr, config.optim.decay_style, config.epochs) == (model, lr, "cosine", 2.0)
    assert config.reward.loss == "listwise_bt"
    # Packed bins that always hold a group of six 4,096-token responses, as many per step as hold ~256 problems.
    assert config.global_batch_size is None and config.global_batch_problems == 256
    assert config.data.packed and config.data.seq_length == 6 * 4096
    assert config.checkpoint.init_from == f"checkpoints/{model}-math_sft"


def test_the_paper_recipes_step_takes_the_bins_that_hold_about_256_problems(caplog):
    """On 8 GPUs at TP 2 (DP 4): 8.2 groups per bin (~500-token responses) -> 32 bins, about 262 problems."""
    from acemath_mcore.training.trainer import TrainingData, size_batch_in_units

    config = get_recipe("qwen25_math_7b_rm")
    data = TrainingData(num_samples=1000, make_loader=None, sequence_lengths=None, documents=8200)
    with caplog.at_level(logging.INFO, logger="acemath_mcore"):
        size_batch_in_units(config, data, world_size=8)
    assert config.global_batch_size == 32
    assert caplog.messages == ["global batch: 32 rows of 8.20 problems on average, about 262 problems per step "
                               "(global_batch_problems=256)"]


def test_dry_run_prints_the_resolved_rm_config(capsys):
    """The config is printed even when the checks fail; here the recipe has no data yet (exit status 2)."""
    assert main_for("rm", "", ["--recipe", "tiny_rm", "--dry-run", "reward.loss=pairwise_bt"]) == 2
    printed, errors = capsys.readouterr()
    assert json.loads(printed)["reward"]["loss"] == "pairwise_bt" and json.loads(printed)["model"] == "tiny"
    assert errors == "error: data.prefixes: none given: pass data.prefixes=[PREFIX,...], outputs of " \
        "launch/preprocess.py rm\n"


def test_bad_settings_fail_before_any_process_group_exists():
    with pytest.raises(ValueError, match="reward.loss=hinge: choose one of listwise_bt, pairwise_bt, bce, mse"):
        train_reward_model(apply_overrides(get_recipe("tiny_rm"), ["reward.loss=hinge"]))
    with pytest.raises(ValueError, match="a reward model trains on exactly one RM prefix and no blend weights, got 2"):
        train_reward_model(apply_overrides(get_recipe("tiny_rm"), ["data.prefixes=[a,b]"]))


def test_each_entry_point_takes_only_its_own_recipes(capsys):
    """train_rm.py on an SFT recipe would train a reward model into (and resume from) that stage's save dir."""
    for kind, recipe, other in (("rm", "qwen25_math_7b_math_sft", "launch/train_sft.py"),
                                ("sft", "qwen25_math_7b_rm", "launch/train_rm.py")):
        with pytest.raises(SystemExit):
            main_for(kind, "", ["--recipe", recipe, "--dry-run"])
        assert f"--recipe {recipe} is a {'sft' if kind == 'rm' else 'rm'} recipe: run it with {other}" in \
            capsys.readouterr().err


def test_overrides_sit_on_either_side_of_dry_run_and_a_mistyped_recipe_gets_a_suggestion(capsys):
    """Overrides after --dry-run used to be refused as 'unrecognized arguments' when others came before it; an
    unknown recipe listed the other kind's recipes too."""
    assert main_for("rm", "", ["--recipe", "tiny_rm", "reward.loss=pairwise_bt", "--dry-run", "optim.lr=0.5"]) == 2
    printed = json.loads(capsys.readouterr().out)
    assert (printed["reward"]["loss"], printed["optim"]["lr"]) == ("pairwise_bt", 0.5)
    with pytest.raises(SystemExit):
        main_for("rm", "", ["--recipe", "tiny_rn", "--dry-run"])
    assert "error: unknown recipe 'tiny_rn' (did you mean tiny_rm?); rm recipes: qwen25_math_72b_rm, " \
           "qwen25_math_7b_rm, tiny_rm\n" in capsys.readouterr().err
