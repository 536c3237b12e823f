"""The whole AceMath pipeline at toy scale, on CPU, with no downloads (what ``launch/demo.py`` runs).

    synthetic data -> preprocess -> base model (HF -> Megatron) -> general SFT stage 1 -> stage 2 -> math SFT
    -> sample candidates for training problems, label them with the grader -> reward model (listwise BT)
    -> held-out problems: greedy pass@1, n samples scored by the RM: rm@k / maj@k / pass@k table and plot
    -> export the math-SFT model and the RM to Hugging Face format

Every stage uses the production code path (HF conversion, preprocessing to .bin/.idx, the shared trainer, the
Megatron generation loop, the grader, RM scoring, best-of-n, the HF exporter); only the sizes are toy: the real
pretrained stories260K Llama from ../shared (5 layers, hidden 64) and its 512-piece SentencePiece tokenizer. The
math data is three-step single-digit arithmetic; like real SFT mixtures it holds some answers without their
working, so the policy sometimes answers bare, and a bare answer is usually wrong. docs/demo.md says what the
reward model learns from that, and what a model this small does not learn (checking the arithmetic).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger("acemath_mcore.toy_pipeline")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE_MODEL = REPO.parent / "shared" / "models" / "stories260K_hf"
DEFAULT_TOKENIZER = DEFAULT_BASE_MODEL / "tokenizer.model"
STAGES = ("sft_stage1", "sft_stage2", "math_sft")


@dataclasses.dataclass
class ToyPipelineConfig:
    workdir: str = "outputs/demo"
    tokenizer: str = str(DEFAULT_TOKENIZER)
    # A Hugging Face model directory to start from (converted to a Megatron checkpoint first), or a preset name
    # such as "tiny", trained from random initialisation.
    base_model: str = str(DEFAULT_BASE_MODEL)
    general_problems: int = 3000
    math_problems: int = 6000
    rm_problems: int = 1500  # problems sampled for reward-model data (may overlap the SFT questions)
    heldout_problems: int = 200
    candidates: int = 8  # samples per problem, for the RM data and for best-of-n
    steps: int = 3  # operations per problem
    max_operand: int = 9  # operands 2..max_operand
    max_total: Optional[int] = 9  # every running total stays within 0..max_total (None: no bound)
    bare_answer_fraction: float = 0.3  # math-SFT responses that state only the answer, without the working
    # A short instruction keeps rows short on CPU (AceMath's own is 45 tokens with this tokenizer).
    instruction: str = "Solve step by step."
    stage_steps: List[int] = dataclasses.field(default_factory=lambda: [30, 30, 250])  # stage 1, 2, math SFT
    rm_steps: int = 0  # 0: the recipe's two epochs of the RM data, as in the paper
    global_batch_size: int = 8
    micro_batch_size: int = 8
    sequence_length: int = 512
    temperature: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    export: bool = True


def _synthetic_data(config: ToyPipelineConfig, data_dir: Path) -> Dict[str, object]:
    """SFT JSONL files for the three stages, and the RM-training and held-out problems. The math-SFT set is
    decontaminated against the held-out problems: a generated training question equal to one of them is skipped
    (and counted), so held-out accuracy measures problems the model never saw. RM-training problems may repeat
    SFT questions, as AceMath's RM prompts overlap its SFT data."""
    import itertools
    import random

    from acemath_mcore.data.synthetic import arithmetic_problem, general_records, sft_records, write_jsonl
    from acemath_mcore.eval.benchmarks import Problem

    rng, drawn = random.Random(config.seed + 3), {}  # RM-training problems first, then the held-out ones
    wanted = config.rm_problems + config.heldout_problems
    for _ in range(100 * wanted):
        problem = arithmetic_problem(rng, config.steps, config.max_operand, config.max_operand, config.max_total)
        drawn.setdefault(problem["question"], problem)
        if len(drawn) == wanted:
            break
    else:
        raise ValueError(f"could not draw {wanted} distinct problems with operands up to {config.max_operand}")
    # The problem text is the whole user prompt (question + instruction) exactly as in the SFT data, so the reward
    # model, which sees the candidates' ``question`` field, reads the prompt the policy answered.
    problems = [Problem("toy_math", index, f"{p['question']}\n{config.instruction}", p["answer"])
                for index, p in enumerate(drawn.values())]

    evaluation_questions = set(list(drawn)[config.rm_problems:])
    skipped = 0

    def decontaminated(records):
        nonlocal skipped
        for record in records:
            if record["messages"][0]["content"].split("\n")[0] in evaluation_questions:
                skipped += 1
            else:
                yield record

    math_records = itertools.islice(decontaminated(sft_records(
        10**9, config.seed + 2, steps=config.steps, max_start=config.max_operand, max_operand=config.max_operand,
        instruction=config.instruction, max_total=config.max_total,
        bare_answer_fraction=config.bare_answer_fraction)), config.math_problems)
    files = {
        "sft_stage1": write_jsonl(data_dir / "general_stage1.jsonl", general_records(config.general_problems,
                                                                                    config.seed)),
        "sft_stage2": write_jsonl(data_dir / "general_stage2.jsonl",
                                  general_records(config.general_problems, config.seed + 1, two_turn_fraction=0.5)),
        "math_sft": write_jsonl(data_dir / "math_sft.jsonl", math_records),
    }
    return {"files": files, "rm_problems": problems[: config.rm_problems],
            "heldout": problems[config.rm_problems:], "math_sft_skipped_as_evaluation_questions": skipped}


def _train(kind: str, recipe: str, overrides: List[str]) -> dict:
    from acemath_mcore.launch_common import trainer_for
    from acemath_mcore.recipes import apply_overrides, get_recipe

    config = apply_overrides(get_recipe(recipe), overrides)
    summary = trainer_for(kind)(config)
    if summary["exit_code"] != 0:
        raise RuntimeError(f"{config.name} stopped with exit code {summary['exit_code']}")
    return {key: summary[key] for key in ("first_loss", "final_loss", "steps", "wall_s")}


def run_toy_pipeline(config: ToyPipelineConfig) -> dict:
    """Run every stage; returns (and writes to ``<workdir>/results.json``) the numbers of each."""
    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
    from acemath_mcore.data.preprocess import PreprocessConfig, preprocess_sft
    from acemath_mcore.data.rm_data import RMPreprocessConfig, preprocess_rm
    from acemath_mcore.data.tokenizers import load_tokenizer
    from acemath_mcore.eval.generation import SamplingParams
    from acemath_mcore.models.presets import PRESETS, resolve_arch

    if not Path(config.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer not found: {config.tokenizer} (expected the read-only ../shared "
                                "beside the repository)")
    try:
        arch = resolve_arch(config.base_model)
    except ValueError as error:
        raise ValueError(f"base_model: {error}") from None
    starts_from_pretrained = config.base_model not in PRESETS
    if len(config.stage_steps) != len(STAGES):
        raise ValueError(f"stage_steps needs {len(STAGES)} numbers ({', '.join(STAGES)}), got {config.stage_steps}")
    work = Path(config.workdir)
    for stale in ("checkpoints", "runs", "eval", "hf"):  # a rerun starts clean; the data is regenerated too
        shutil.rmtree(work / stale, ignore_errors=True)
    started, results, timings = time.perf_counter(), {"config": dataclasses.asdict(config)}, {}

    def stage_done(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        log.info("[%s] done in %.1f s (%.1f s so far)", name, timings[name], time.perf_counter() - started)
        return time.perf_counter()

    log.info("[data] synthetic general and math SFT sets, %d RM-training and %d held-out problems",
             config.rm_problems, config.heldout_problems)
    now = time.perf_counter()
    data = _synthetic_data(config, work / "data")
    prefixes = {}
    for stage, jsonl in data["files"].items():
        prefixes[stage] = str(work / "data" / stage)
        stats = preprocess_sft(PreprocessConfig(inputs=[str(jsonl)], output_prefix=prefixes[stage],
                                                tokenizer=config.tokenizer, template="plain",
                                                max_length=config.sequence_length, workers=1, progress=False))
        results.setdefault("data", {})[stage] = {key: stats[key] for key in ("samples", "tokens", "loss_tokens",
                                                                             "dropped_total")}
    results["data"]["math_sft_skipped_as_evaluation_questions"] = data["math_sft_skipped_as_evaluation_questions"]
    now = stage_done("data", now)

    checkpoints = work / "checkpoints"
    common = [f"global_batch_size={config.global_batch_size}", f"micro_batch_size={config.micro_batch_size}",
              f"data.seq_length={config.sequence_length}", f"logging.output_dir={work / 'runs'}",
              f"seed={config.seed}", "checkpoint.resume=false", "logging.log_interval=10"]
    previous = None
    if starts_from_pretrained:
        from acemath_mcore.convert import convert_hf_to_megatron

        log.info("[base] converting %s to a Megatron checkpoint", config.base_model)
        previous = convert_hf_to_megatron(config.base_model, checkpoints / "base", overwrite=True)
        now = stage_done("base", now)
    common.append(f"model={config.base_model}")
    for stage, steps in zip(STAGES, config.stage_steps):
        log.info("[%s] SFT for %d steps%s", stage, steps,
                 f", starting from {previous}" if previous else " from random initialisation")
        overrides = [*common, f"name=toy-{stage}", f"data.prefixes=[{prefixes[stage]}]", f"train_steps={steps}",
                     f"checkpoint.save_dir={checkpoints / stage}",
                     f"checkpoint.init_from={previous}" if previous else "checkpoint.init_from=none"]
        results[stage] = _train("sft", "tiny_sft", overrides)
        previous = checkpoints / stage
        now = stage_done(stage, now)

    tokenizer = load_tokenizer(config.tokenizer)
    encoder = ConversationEncoder(tokenizer, build_template("plain", tokenizer))
    sampled = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    greedy = SamplingParams(max_new_tokens=config.max_new_tokens)
    eval_dir = work / "eval"

    log.info("[candidates] %d samples for each of %d training problems from the math-SFT model",
             config.candidates, config.rm_problems)
    backend = _megatron_backend(checkpoints / "math_sft", arch, encoder)
    candidates = _evaluate(backend, encoder, data["rm_problems"], eval_dir / "rm_candidates.jsonl", sampled,
                           config.candidates, config.seed)
    results["rm_candidates"] = _accuracy_counts(candidates)
    now = stage_done("candidates", now)

    log.info("[rm] reward model from the math-SFT weights, listwise Bradley-Terry over each problem's candidates")
    rm_stats = preprocess_rm(RMPreprocessConfig(inputs=[str(eval_dir / "rm_candidates.jsonl")],
                                                output_prefix=str(work / "data" / "rm"), tokenizer=config.tokenizer,
                                                template="plain", max_length=config.sequence_length))
    results["rm_data"] = {key: rm_stats[key] for key in ("groups_read", "groups", "responses", "dropped")}
    results["rm"] = _train("rm", "tiny_rm", [
        *common, "name=toy-rm", f"data.prefixes=[{work / 'data' / 'rm'}]", f"train_steps={config.rm_steps}",
        "micro_batch_size=1", f"data.seq_length={4 * config.sequence_length}",
        f"checkpoint.save_dir={checkpoints / 'rm'}", f"checkpoint.init_from={checkpoints / 'math_sft'}"])
    now = stage_done("rm", now)

    log.info("[eval] %d held-out problems: greedy pass@1, then %d samples each scored by the RM",
             config.heldout_problems, config.candidates)
    greedy_records = _evaluate(backend, encoder, data["heldout"], eval_dir / "heldout_greedy.jsonl", greedy, 1,
                               config.seed)
    sampled_path = eval_dir / "heldout_samples.jsonl"
    _evaluate(backend, encoder, data["heldout"], sampled_path, sampled, config.candidates, config.seed + 1)
    scored_path = eval_dir / "heldout_scored.jsonl"
    _score(checkpoints / "rm", arch, encoder, sampled_path, scored_path, config.sequence_length)
    results["heldout"] = _best_of_n(greedy_records, scored_path, config.candidates, eval_dir)
    now = stage_done("eval", now)

    if config.export:
        from acemath_mcore.convert import export_megatron_to_hf

        for name in ("math_sft", "rm"):
            out = work / "hf" / name
            export_megatron_to_hf(checkpoints / name, out, progress=False, overwrite=True)
            if not (out / Path(config.tokenizer).name).exists():  # a preset base model brings no tokenizer files
                shutil.copy(config.tokenizer, out / Path(config.tokenizer).name)
            results.setdefault("exports", {})[name] = str(out)
        now = stage_done("export", now)

    results["timings_s"] = timings
    results["wall_s"] = round(time.perf_counter() - started, 1)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _megatron_backend(checkpoint: Path, arch, encoder):
    from acemath_mcore.eval.backends import MegatronBackend

    return MegatronBackend(str(checkpoint), arch, encoder.stop_ids, max_batch_size=128)


def _evaluate(backend, encoder, problems, path: Path, sampling, samples: int, seed: int) -> List[dict]:
    from acemath_mcore.eval.harness import EvalSettings, evaluate_problems

    settings = EvalSettings(benchmarks=[], data_dir="", output_dir=str(path.parent), sampling=sampling,
                            num_samples=samples, seed=seed, instruction=None)
    return evaluate_problems(backend, encoder, settings, "toy_math", problems, path)


def _accuracy_counts(records: Sequence[dict]) -> dict:
    scores = [flag for record in records for flag in record["score"]]
    mixed = sum(0 < sum(record["score"]) < len(record["score"]) for record in records)
    return {"problems": len(records), "responses": len(scores), "accuracy": 100.0 * sum(scores) / len(scores),
            "problems_with_right_and_wrong": mixed}


def _score(rm_checkpoint: Path, arch, encoder, input_path: Path, output_path: Path, tokens_per_row: int) -> None:
    from acemath_mcore.models import ModelOptions
    from acemath_mcore.runtime import ParallelConfig
    from acemath_mcore.training.reward import RewardScorer, score_jsonl

    scorer = RewardScorer(arch, rm_checkpoint, ParallelConfig(), ModelOptions(spec="native"),
                          tokens_per_row=4 * tokens_per_row)
    score_jsonl(input_path, output_path, scorer, encoder, show_progress=False)


def _best_of_n(greedy_records: Sequence[dict], scored_path: Path, k_max: int, eval_dir: Path) -> dict:
    from acemath_mcore.eval.bestofn import (evaluate, format_table, k_ladder, mean_accuracy_percent, read_records,
                                            save_plot)

    records = read_records(scored_path)
    metrics = evaluate(records, k_max)
    ks = k_ladder(k_max)
    table = format_table(metrics, ks)
    (eval_dir / "bestofn.md").write_text(table + "\n")
    save_plot(metrics, ks, eval_dir / "bestofn.png", title="toy AceMath: best-of-n on held-out problems")
    greedy = 100.0 * sum(record["score"][0] for record in greedy_records) / len(greedy_records)
    mean_accuracy = mean_accuracy_percent(records)
    # Within a problem, how often the RM scores a right candidate above a wrong one (0.5 = chance).
    pairs = [(right > wrong) + 0.5 * (right == wrong) for r in records
             for right, ok_right in zip(r.rm_scores, r.correct) if ok_right
             for wrong, ok_wrong in zip(r.rm_scores, r.correct) if not ok_wrong]
    return {"greedy_pass@1": greedy, "mean_sample_accuracy": mean_accuracy,
            f"rm@{k_max}_random_scores": random_scorer_pick_accuracy(scored_path),
            "rm_pairwise_accuracy": sum(pairs) / max(1, len(pairs)), "rm_pairs": len(pairs), **metrics, "table": table,
            "plot": str(eval_dir / "bestofn.png")}


def random_scorer_pick_accuracy(scored_path: Path) -> float:
    """Expected accuracy (%) of picking the top-scored of all n candidates when the scorer is noise: a scorer gives
    equal texts equal scores, so its pick is uniform over the *distinct* responses. Right answers are often
    repeated and wrong ones varied, which puts this chance level below the mean sample accuracy: a reward model
    has to rank by correctness to pick better than a single sample."""
    per_problem = []
    for line in Path(scored_path).read_text().splitlines():
        row = json.loads(line)
        distinct = dict(zip(row["code"], row["score"]))
        per_problem.append(sum(map(bool, distinct.values())) / len(distinct))
    return 100.0 * sum(per_problem) / max(1, len(per_problem))


def format_report(results: dict) -> str:
    """The console summary: stage losses, RM data, held-out metrics, exports, time."""
    lines = ["", "== toy AceMath pipeline =="]
    for stage in (*STAGES, "rm"):
        if stage in results:
            r = results[stage]
            lines.append(f"{stage:>10}: loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} in {r['steps']} steps "
                         f"({r['wall_s']:.0f} s)")
    if "rm_candidates" in results:
        c = results["rm_candidates"]
        lines.append(f"RM data: {c['responses']} candidates for {c['problems']} problems, {c['accuracy']:.1f}% right, "
                     f"{c['problems_with_right_and_wrong']} problems with both right and wrong ones")
    if "heldout" in results:
        h = results["heldout"]
        n = results["config"]["candidates"]
        lines += [f"held-out: greedy pass@1 {h['greedy_pass@1']:.1f}%, mean sample accuracy "
                  f"{h['mean_sample_accuracy']:.1f}%, RM ranks a right candidate above a wrong one in "
                  f"{100 * h['rm_pairwise_accuracy']:.1f}% of {h['rm_pairs']} pairs; rm@{n} {h[f'rm@{n}']:.1f}% "
                  f"(a scorer giving random scores: {h[f'rm@{n}_random_scores']:.1f}%)", h["table"],
                  f"plot: {h['plot']}"]
    for name, path in results.get("exports", {}).items():
        lines.append(f"HF export ({name}): {path}")
    lines.append(f"total {results.get('wall_s', 0):.0f} s; stage times {results.get('timings_s')}")
    return "\n".join(lines)
