"""End to end on a task where correctness is learnable: the real RM pipeline reaches >= 90% pairwise accuracy on
held-out problems.

Task: "a + b" (two-digit a, b) answered as "= s so t", where s is the worked sum and t the final answer; t = s
in correct responses and a nearby wrong number (|t - s| <= 9) in wrong ones, 1..5 of 6 responses correct per
problem. The reward model has to check the final answer against the work. The trunk is the real pretrained
stories260K Llama from ../shared (its tokenizer, plain template), converted in-process into an LM dist checkpoint
that the RM is initialised from (trunk loaded, LM head dropped, fresh scalar head) exactly as AceMath-RM starts
from the SFT model. Then: launch/preprocess.py's RM preprocessing, the shared trainer with the tiny_rm recipe
(listwise Bradley-Terry, data parallel over two gloo workers), and launch/score.py on 200 held-out problems
(different seed, unseen during training).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from distributed_helpers import run_workers
from shared_data import shared_path

REPO = Path(__file__).resolve().parents[1]
STORIES = shared_path("models/stories260K_hf")
TOKENIZER = str(STORIES / "tokenizer.model")
RESPONSES = 6
TRAIN_PROBLEMS = 1000
HELD_OUT_PROBLEMS = 200
TRAIN_STEPS = 200


def problem_group(rng: random.Random):
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    total = a + b
    labels = [1] * rng.randint(1, RESPONSES - 1)
    labels += [0] * (RESPONSES - len(labels))
    rng.shuffle(labels)
    wrong = [t for t in range(total - 9, total + 10) if t != total]
    responses = [f"= {total} so {total if label else rng.choice(wrong)}" for label in labels]
    return f"{a} + {b}", responses, labels


def _train_and_score(rank, world_size, tmp, prefix, held_out, bad_inputs):
    import torch
    from safetensors.torch import load_file

    from acemath_mcore.models import ModelOptions, family_for_hf_config
    from acemath_mcore.recipes import apply_overrides, get_recipe
    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
    from acemath_mcore.data.tokenizers import load_tokenizer
    from acemath_mcore.runtime import ParallelConfig, init_distributed
    from acemath_mcore.training import checkpointing
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.reward import RewardScorer, score_jsonl, train_reward_model

    hf_config = json.loads((STORIES / "config.json").read_text())
    family = family_for_hf_config(hf_config)
    arch = family.arch_from_hf(hf_config)
    init_distributed(ParallelConfig(), seed=1)
    lm = Engine(arch, ParallelConfig(), ModelOptions(spec="native"), OptimConfig(), train_steps=1)
    lm.load_full_weights(family.hf_to_megatron(arch, load_file(str(STORIES / "model.safetensors"))))
    checkpointing.save_checkpoint(f"{tmp}/lm", 0, lm.model, lm.optimizer, lm.scheduler, {"consumed_samples": 0})
    del lm

    config = apply_overrides(get_recipe("tiny_rm"), [
        "model=stories260K", f"data.prefixes=[{prefix}]", "data.seq_length=480", f"checkpoint.init_from={tmp}/lm",
        f"checkpoint.save_dir={tmp}/rm", f"logging.output_dir={tmp}/runs", f"train_steps={TRAIN_STEPS}",
        "global_batch_size=null", "global_batch_problems=8", "optim.lr=2e-3", "optim.min_lr=2e-4", "logging.log_interval=50",
        f"data.valid_prefixes=[{prefix}_valid]",  # the held-out problems: their pairwise accuracy after the last step
    ])
    summary = train_reward_model(config, arch=arch)

    # The trainer's process group, still up: launch/score.py below reuses it, then tears it down.
    scorer = RewardScorer(arch, f"{tmp}/rm", ParallelConfig(), ModelOptions(spec="native"), tokens_per_row=512)
    tokenizer = load_tokenizer(TOKENIZER)
    encoder = ConversationEncoder(tokenizer, build_template("plain", tokenizer))
    errors = {}
    for name, path in bad_inputs.items():  # the fault sits in rank 1's share of the records
        try:
            score_jsonl(path, f"{tmp}/{name}.scored.jsonl", scorer, encoder, show_progress=False)
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    del scorer

    spec = importlib.util.spec_from_file_location("score_cli", REPO / "launch" / "score.py")
    score_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score_cli)
    # No --model and no --template: the shapes and the data's prompt format (plain, no system turn) are the ones
    # the trainer recorded beside the checkpoint.
    score_cli.main(["--checkpoint", f"{tmp}/rm", "--tokenizer", TOKENIZER,
                    "--input", held_out, "--output", f"{tmp}/scored.jsonl",
                    "--tokens-per-row", "512"])
    return summary, torch.distributed.is_initialized(), errors


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from acemath_mcore.data.rm_data import RMPreprocessConfig, preprocess_rm
    from acemath_mcore.data.synthetic import write_jsonl

    tmp = tmp_path_factory.mktemp("rm_training")
    rng = random.Random(0)
    write_jsonl(tmp / "train.jsonl", [dict(zip(("prompt", "responses", "labels"), problem_group(rng)))
                                      for _ in range(TRAIN_PROBLEMS)])
    held_out_rng = random.Random(1)
    held_out = [problem_group(held_out_rng) for _ in range(HELD_OUT_PROBLEMS)]
    write_jsonl(tmp / "held_out.jsonl", [{"question": prompt, "code": responses, "score": [bool(x) for x in labels]}
                                         for prompt, responses, labels in held_out])
    stats = preprocess_rm(RMPreprocessConfig(inputs=[str(tmp / "train.jsonl")], output_prefix=str(tmp / "rm"),
                                             tokenizer=TOKENIZER, template="plain"))
    assert stats["groups"] == TRAIN_PROBLEMS
    preprocess_rm(RMPreprocessConfig(inputs=[str(tmp / "held_out.jsonl")], output_prefix=str(tmp / "rm_valid"),
                                     tokenizer=TOKENIZER, template="plain"))
    lines = (tmp / "held_out.jsonl").read_text().splitlines()
    bad_inputs = {"bad_record": tmp / "bad_record.jsonl", "too_long": tmp / "too_long.jsonl",
                  "surrogate": tmp / "surrogate.jsonl"}
    bad_inputs["surrogate"].write_text("\n".join(lines[:-1] + [json.dumps({"question": "1 + 1", "code": ["2 \ud83d"]})])
                                       + "\n")
    bad_inputs["bad_record"].write_text("\n".join(lines[:-1] + ['{"question": "1 + 1"}']) + "\n")
    bad_inputs["too_long"].write_text("\n".join(lines[:-1] + [json.dumps({"question": "1 + 1", "code": [" 2" * 600]})])
                                      + "\n")
    summaries = run_workers(_train_and_score, 2, str(tmp), str(tmp / "rm"), str(tmp / "held_out.jsonl"),
                            {name: str(path) for name, path in bad_inputs.items()})
    scored = [json.loads(line) for line in (tmp / "scored.jsonl").read_text().splitlines()]
    return summaries, scored


def test_training_runs_and_lowers_the_loss(trained):
    summaries, _ = trained
    summary, still_initialised, _ = summaries[0]
    assert summary["exit_code"] == 0 and summary["steps"] == TRAIN_STEPS
    assert summary["final_loss"] < 0.5 < summary["first_loss"]
    assert not still_initialised  # launch/score.py tears the process group down


def test_a_step_sized_in_problems_takes_the_bins_that_hold_about_that_many(trained, tmp_path_factory):
    """global_batch_problems=8 over bins of 480 tokens (4 groups of ~110 tokens each): 2 bins per step, one per
    data-parallel rank, as the checkpoint's train state records."""
    from megatron.core import dist_checkpointing

    from acemath_mcore.data.rm_data import build_rm_dataset

    save_dir = next(Path(tmp_path_factory.getbasetemp()).glob("rm_training*/rm"))
    state = dist_checkpointing.load_common_state_dict(str(save_dir / (save_dir / "latest").read_text().strip()))
    bins = build_rm_dataset(str(save_dir.parent / "rm"), packed_tokens=480)
    per_bin = len(bins.groups) / len(bins)
    expected = max(2, round(8 / per_bin / 2) * 2)
    assert expected == 2 and 3.5 < per_bin < 4.5
    assert state["train_state"]["global_batch_size"] == expected
    assert state["train_state"]["consumed_samples"] == expected * TRAIN_STEPS


def test_a_fault_in_one_ranks_share_of_the_records_stops_every_rank_by_its_line(trained):
    """Each data-parallel rank reads and tokenizes only its share of the input; a bad record or an over-long
    response in rank 1's share must still stop rank 0 too (else it waits in a collective), naming the line."""
    summaries, _ = trained
    for _, _, errors in summaries:
        assert errors["bad_record"].endswith("bad_record.jsonl:200: unrecognized_schema: expected a 'question' (or "
                                             "'prompt') string and a non-empty 'code' (or 'responses') list")
        assert "too_long.jsonl:200 response 0 has " in errors["too_long"]
        assert errors["too_long"].endswith("tokens, more than tokens_per_row 512; raise it")
        assert errors["surrogate"].endswith("surrogate.jsonl:200: invalid_utf8: response 0 holds an unpaired "
                                            "surrogate '\\ud83d' at character 2")


def test_held_out_pairwise_accuracy_at_least_90_percent(trained):
    _, scored = trained
    assert len(scored) == HELD_OUT_PROBLEMS
    right = pairs = best_correct = 0
    for record in scored:
        scores, correct = record["pred_score"], record["score"]
        assert len(scores) == RESPONSES and all(isinstance(s, float) for s in scores)
        for i in range(RESPONSES):
            for j in range(RESPONSES):
                if correct[i] and not correct[j]:
                    pairs += 1
                    right += scores[i] > scores[j]
        best_correct += correct[max(range(RESPONSES), key=lambda i: scores[i])]
    accuracy = right / pairs
    print(f"held-out pairwise accuracy {accuracy:.3f} over {pairs} pairs; best-of-6 correct "
          f"{best_correct / len(scored):.3f}")
    assert accuracy >= 0.9


def test_validation_metrics_are_those_of_the_held_out_scores(trained):
    """The trainer's validation pass after the last step runs the final weights over the held-out problems
    (preprocessed as an RM prefix): its loss and accuracy are the listwise Bradley-Terry loss (mean over problems of
    the mean over positive-negative pairs of -log sigma(s_p - s_n)) and the pairwise accuracy (ties count half)
    computed here, in float64, from launch/score.py's scores of the same problems with the saved weights."""
    summaries, scored = trained
    losses, score_margins, best_correct, right, pairs = [], [], 0, 0.0, 0
    for record in scored:
        scores, correct = record["pred_score"], record["score"]
        margins = [scores[i] - scores[j] for i in range(RESPONSES) for j in range(RESPONSES)
                   if correct[i] and not correct[j]]
        losses.append(sum(math.log1p(math.exp(-margin)) for margin in margins) / len(margins))
        right += sum(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0 for margin in margins)
        pairs += len(margins)
        positive = [score for score, ok in zip(scores, correct) if ok]
        negative = [score for score, ok in zip(scores, correct) if not ok]
        score_margins.append(sum(positive) / len(positive) - sum(negative) / len(negative))
        best_correct += correct[scores.index(max(scores))]  # the first top score, as best-of-n picks
    final = summaries[0][0]["final_metrics"]
    assert final["valid_rm_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert final["valid_pairwise_accuracy"] == pytest.approx(right / pairs, abs=1e-9)
    assert final["valid_score_margin"] == pytest.approx(sum(score_margins) / len(score_margins), rel=1e-4)
    assert final["valid_best_correct"] == pytest.approx(best_correct / len(scored), abs=1e-9)
