"""The README's main job (launch/demo.py) on a smaller run: every stage of the toy AceMath pipeline, end to end.

Asserts what the demo only prints: each SFT stage and the RM lower their loss, the math-SFT model solves held-out
problems it never saw, the reward model picks better than chance (rm@8 above the mean single-sample accuracy, and
far above the pick of a scorer giving random scores), and the exported RM is usable: in transformers it gives the
candidates the same scores as the megatron RM did (both read the last token of the rendered conversation).
docs/demo.md has the demo's numbers and what the reward model learns at this size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_workers
from shared_data import shared_path

# Fewer problems and steps than the demo (about 5 minutes on 2 cores, measured: 295 s on idle cores).
# 40 RM steps were enough in one environment (rm@8 75.0) but not in a fresh one (63.0 vs a mean sample accuracy of
# 60.1: the RM had learnt the format of right answers, not yet the arithmetic); 80 steps gave 70.0 there.
pytestmark = pytest.mark.timeout(1500)  # one pipeline run serves the whole module

SMALL = {"general_problems": 300, "math_problems": 3000, "rm_problems": 400, "heldout_problems": 100,
         "stage_steps": [10, 10, 200], "rm_steps": 80}


def _pipeline_worker(rank, world_size, workdir, base_model):
    from acemath_mcore.toy_pipeline import ToyPipelineConfig, run_toy_pipeline

    return run_toy_pipeline(ToyPipelineConfig(workdir=workdir, base_model=base_model,
                                              tokenizer=f"{base_model}/tokenizer.model", **SMALL))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy_pipeline")
    base_model = shared_path("models/stories260K_hf")
    return run_workers(_pipeline_worker, 1, str(workdir), str(base_model), timeout=1500)[0]


def test_every_training_stage_learns(results):
    for stage in ("sft_stage1", "sft_stage2", "math_sft"):
        assert results[stage]["final_loss"] < 0.8 * results[stage]["first_loss"], stage
    assert results["rm"]["final_loss"] < results["rm"]["first_loss"]
    assert results["math_sft"]["steps"] == SMALL["stage_steps"][2]
    assert results["data"]["math_sft"]["dropped_total"] == 0


def test_policy_solves_unseen_problems_and_best_of_n_has_candidates_to_rank(results):
    heldout = results["heldout"]
    print(json.dumps({k: v for k, v in heldout.items() if k not in ("table",)}, indent=1))
    assert heldout["greedy_pass@1"] >= 80  # measured 99%; 0% before math SFT
    assert 0 < heldout["mean_sample_accuracy"] < heldout["pass@8"] <= 100
    assert heldout["rm_pairs"] > 500  # right-vs-wrong pairs for the RM to order
    assert Path(heldout["plot"]).stat().st_size > 0
    assert results["rm_candidates"]["problems_with_right_and_wrong"] > 0


def test_reward_model_picks_better_than_chance(results):
    """Measured on this run's settings (2026-11-25): rm@8 72.0 against a mean sample accuracy of 63.25 and a
    random-scores pick of 40.3; the RM ordered 84.2% of right-vs-wrong pairs (2026-11-23, before generation hashed
    each batch's seed: 76.0, 61.8, 38.7 and 85.7%; before the native attention batched a row's documents: 70.0,
    60.1, 37.6 and 82.0%)."""
    heldout = results["heldout"]
    assert heldout["rm_pairwise_accuracy"] >= 0.7
    assert heldout["rm@8"] >= heldout["mean_sample_accuracy"] + 5
    assert heldout["rm@8"] >= heldout["rm@8_random_scores"] + 20
    assert heldout["rm@8_random_scores"] < heldout["mean_sample_accuracy"]  # repeated right answers, varied wrong ones
    assert heldout["pass@8"] >= heldout["rm@8"]


def test_exported_reward_model_scores_like_the_megatron_one(results):
    import transformers

    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
    from acemath_mcore.data.tokenizers import load_tokenizer

    export = Path(results["exports"]["rm"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(export / "tokenizer.model")
    encoder = ConversationEncoder(tokenizer, build_template("plain", tokenizer))
    scored = Path(results["heldout"]["plot"]).parent / "heldout_scored.jsonl"
    record = json.loads(scored.open().readline())
    for response, megatron_score in list(zip(record["code"], record["pred_score"]))[:3]:
        ids = encoder.encode([{"role": "user", "content": record["question"]},
                              {"role": "assistant", "content": response}]).input_ids
        with torch.no_grad():
            hf_score = model(torch.tensor([ids.tolist()])).logits[0, 0].item()
        assert hf_score == pytest.approx(megatron_score[0] if isinstance(megatron_score, list) else megatron_score,
                                         abs=1e-4)
    # Every stage's save dir inherited the base model's HF config and files: the exports carry them.
    for name in ("math_sft", "rm"):
        export = Path(results["exports"][name])
        config = json.loads((export / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2), name
        assert (export / "generation_config.json").is_file() and (export / "tokenizer_config.json").is_file(), name
