"""The evaluation harness with a scripted backend: prompts, grading, files, skips on rerun, and the table.

The backend answers from the prompt itself (it decodes the question and looks up the gold), so every number in
the output is known in advance: right answers on even-indexed problems and wrong ones on odd, or a mix over
samples for maj@n / pass@n.
"""

from __future__ import annotations

import json

import pytest

from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
from acemath_mcore.data.tokenizers import load_tokenizer
from acemath_mcore.eval.benchmarks import load_benchmark
from acemath_mcore.eval.generation import Generation, SamplingParams
from acemath_mcore.eval.harness import EvalSettings, format_summary, run_evaluation, summarize
from launch_scripts import launch_main
from shared_data import shared_path

LIMIT = 6


class ScriptedBackend:
    """Answers problem i with its gold when ``right(i, sample)``, else with a wrong number."""

    is_writer = True

    def __init__(self, encoder, problems, right, max_sequence_length=4096):
        self.encoder, self.right = encoder, right
        self.index_of = {problem.question: number for number, problem in enumerate(problems)}
        self.golds = [problem.gold for problem in problems]
        self.max_sequence_length = max_sequence_length
        self.calls = 0

    def generate(self, prompts, params, seed, progress):
        self.calls += 1
        seen: dict[int, int] = {}
        generations = []
        for prompt in prompts:
            text = self.encoder.tokenizer.decode(prompt)
            number = next(i for question, i in self.index_of.items() if question in text)
            sample = seen[number] = seen.get(number, -1) + 1
            answer = self.golds[number] if self.right(number, sample) else "123456789"
            response = f"Some reasoning.\nThe final answer is $\\boxed{{{answer}}}$."
            ids = self.encoder.tokenizer.encode(response) + [self.encoder.stop_ids[0]]
            generations.append(Generation(ids[:-1], "stop"))
        progress(len(prompts), len(prompts))
        return generations


@pytest.fixture(scope="module")
def encoder():
    tokenizer = load_tokenizer(shared_path("tokenizers/qwen2"))
    return ConversationEncoder(tokenizer, build_template("chatml", tokenizer))


@pytest.fixture(scope="module")
def gsm8k():
    return load_benchmark("gsm8k", shared_path("data/eval"))[0][:LIMIT]


def _settings(tmp_path, **overrides):
    values = {"benchmarks": ["gsm8k"], "data_dir": str(shared_path("data/eval")), "output_dir": str(tmp_path),
              "sampling": SamplingParams(max_new_tokens=64), "limit": LIMIT}
    values.update(overrides)
    return EvalSettings(**values)


def test_greedy_run_grades_writes_and_skips_a_finished_benchmark(tmp_path, encoder, gsm8k):
    backend = ScriptedBackend(encoder, gsm8k, right=lambda number, sample: number % 2 == 0)
    summary = run_evaluation(backend, encoder, _settings(tmp_path), model_name="scripted")
    assert summary["benchmarks"]["gsm8k"]["pass@1"] == pytest.approx(50.0)
    assert summary["average"] == pytest.approx(50.0)
    rows = [json.loads(line) for line in (tmp_path / "gsm8k.jsonl").open()]
    assert [row["idx"] for row in rows] == list(range(LIMIT))
    assert [row["score"] for row in rows] == [[number % 2 == 0] for number in range(LIMIT)]
    assert [row["pred"][0] for row in rows[::2]] == [problem.gold for problem in gsm8k[::2]]
    assert rows[1]["pred"] == ["123456789"] and rows[1]["finish_reason"] == ["stop"]
    assert "\\boxed{" in rows[0]["code"][0] and "<|im_end|>" not in rows[0]["code"][0]
    table = (tmp_path / "summary.md").read_text()
    assert "| gsm8k | 6 | 1 | 50.00 |" in table and "**50.00**" in table

    # Same settings: nothing is generated again. Another seed: it is.
    run_evaluation(backend, encoder, _settings(tmp_path), model_name="scripted")
    assert backend.calls == 1
    run_evaluation(backend, encoder, _settings(tmp_path, seed=1), model_name="scripted")
    assert backend.calls == 2
    # Settings outside the harness (template, context, precision, ...) and newer weights also redo it.
    run_evaluation(backend, encoder, _settings(tmp_path, seed=1, setup={"template": "plain"}), model_name="scripted")
    assert backend.calls == 3
    run_evaluation(backend, encoder, _settings(tmp_path, seed=1, setup={"template": "plain"}),
                   model_name="scripted/iter_0000200")
    assert backend.calls == 4


def test_a_multiple_choice_benchmarks_results_are_redone_when_its_prompt_layout_changes(tmp_path, monkeypatch):
    """Exemplars and layout live in code: a stored MMLU-STEM result made with others must not be reused. Open
    benchmarks' prompts (question + instruction) are fingerprinted by their settings alone."""
    from acemath_mcore.eval import benchmarks

    settings = _settings(tmp_path)
    mmlu = settings.fingerprint("mmlu_stem", "m")
    [turn] = mmlu["prompt_layout"]
    assert turn["content"].endswith("<question>\nAnswer Choices: (A) <A> (B) <B> (C) <C> (D) <D>\n"
                                    + settings.instruction)
    assert "prompt_layout" not in settings.fingerprint("gsm8k", "m")
    monkeypatch.setattr(benchmarks, "DEFAULT_MMLU_EXEMPLARS", benchmarks.DEFAULT_MMLU_EXEMPLARS[:1])
    assert settings.fingerprint("mmlu_stem", "m") != mmlu


def test_a_run_killed_while_writing_is_redone_not_skipped(tmp_path, encoder, gsm8k, monkeypatch):
    """An --overwrite rerun killed while writing its results must not leave the old .meta.json beside a
    truncated .jsonl: the next run would take them for finished results."""
    import acemath_mcore.eval.harness as harness

    backend = ScriptedBackend(encoder, gsm8k, right=lambda number, sample: True)
    run_evaluation(backend, encoder, _settings(tmp_path), model_name="scripted")
    finished = (tmp_path / "gsm8k.jsonl").read_text()

    write = harness.write_atomically

    def killed(path, text):  # the job dies half-way through its results file
        if path.name != "gsm8k.jsonl":
            return write(path, text)
        path.with_name(path.name + ".partial").write_text(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "write_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(backend, encoder, _settings(tmp_path, overwrite=True), model_name="scripted")
    monkeypatch.undo()
    assert (tmp_path / "gsm8k.jsonl").read_text() == finished  # the complete old file, not a truncated one
    assert not (tmp_path / "gsm8k.meta.json").exists()
    run_evaluation(backend, encoder, _settings(tmp_path), model_name="scripted")
    assert backend.calls == 2  # not skipped: graded and written again from the generations the killed run saved
    assert (tmp_path / "gsm8k.meta.json").is_file() and (tmp_path / "gsm8k.jsonl").read_text() == finished


class DyingBackend(ScriptedBackend):
    """ScriptedBackend whose process is killed during its ``dies_on``-th generate call."""

    def __init__(self, *args, dies_on=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dies_on, self.prompts_seen, self.seeds = dies_on, [], []

    def generate(self, prompts, params, seed, progress):
        if self.calls + 1 == self.dies_on:
            raise KeyboardInterrupt
        self.prompts_seen.append(len(prompts))
        self.seeds.append(seed)
        return super().generate(prompts, params, seed, progress)


def test_a_killed_run_resumes_after_its_last_finished_chunk(tmp_path, encoder, gsm8k):
    """A 72B benchmark at 8 samples runs for hours: a run killed part-way keeps its finished chunks, and the
    rerun generates only the rest, with the seeds an uninterrupted run uses, into the same results."""
    from acemath_mcore.eval.harness import CHUNK_SEED_STRIDE

    def right(number, sample):
        return (number + sample) % 3 != 0

    sampled = SamplingParams(max_new_tokens=64, temperature=0.7)
    whole = DyingBackend(encoder, gsm8k, right)
    run_evaluation(whole, encoder, _settings(tmp_path / "whole", num_samples=2, sampling=sampled, chunk_problems=2),
                   model_name="scripted")
    assert whole.prompts_seen == [4, 4, 4] and whole.seeds == [0, CHUNK_SEED_STRIDE, 2 * CHUNK_SEED_STRIDE]

    settings = _settings(tmp_path / "cut", num_samples=2, sampling=sampled, chunk_problems=2)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(DyingBackend(encoder, gsm8k, right, dies_on=3), encoder, settings, model_name="scripted")
    progress = tmp_path / "cut" / "gsm8k.jsonl.progress"
    with open(progress, "a") as stream:
        stream.write('{"chunk": 2, "generations": [[[1, 2')  # torn by the kill
    resumed = DyingBackend(encoder, gsm8k, right)
    run_evaluation(resumed, encoder, settings, model_name="scripted")
    assert resumed.prompts_seen == [4] and resumed.seeds == [2 * CHUNK_SEED_STRIDE]
    assert (tmp_path / "cut" / "gsm8k.jsonl").read_text() == (tmp_path / "whole" / "gsm8k.jsonl").read_text()
    assert not progress.exists()
    # The rate counts what this run generated in its time: the last chunk's two problems, not the restored ones.
    records = [json.loads(line) for line in (tmp_path / "cut" / "gsm8k.jsonl").open()]
    meta = json.loads((tmp_path / "cut" / "gsm8k.meta.json").read_text())
    assert meta["generated_tokens"] == sum(sum(r["num_tokens"]) for r in records)
    assert meta["timed_tokens"] == sum(sum(r["num_tokens"]) for r in records[4:]) < meta["generated_tokens"]
    whole_meta = json.loads((tmp_path / "whole" / "gsm8k.meta.json").read_text())
    assert whole_meta["timed_tokens"] == whole_meta["generated_tokens"] == meta["generated_tokens"]

    with pytest.raises(KeyboardInterrupt):  # other settings: the saved chunks are not theirs
        run_evaluation(DyingBackend(encoder, gsm8k, right, dies_on=2), encoder,
                       _settings(tmp_path / "other", num_samples=2, sampling=sampled, chunk_problems=2),
                       model_name="scripted")
    changed = DyingBackend(encoder, gsm8k, right)
    run_evaluation(changed, encoder, _settings(tmp_path / "other", num_samples=2, sampling=sampled, chunk_problems=2,
                                               seed=5), model_name="scripted")
    assert changed.prompts_seen == [4, 4, 4]


def test_the_table_names_benchmarks_made_with_other_settings(tmp_path, encoder, gsm8k):
    backend = ScriptedBackend(encoder, gsm8k, right=lambda number, sample: True)
    run_evaluation(backend, encoder, _settings(tmp_path), model_name="scripted")
    meta = json.loads((tmp_path / "gsm8k.meta.json").read_text())
    for name, changes in (("minerva_math", {}), ("math", {"seed": 1}), ("college_math", {"model": "other"})):
        (tmp_path / f"{name}.jsonl").write_text((tmp_path / "gsm8k.jsonl").read_text())
        settings = {**meta["settings"], "benchmark": name, **changes}
        (tmp_path / f"{name}.meta.json").write_text(json.dumps({**meta, "settings": settings}))
    summary = summarize(tmp_path)
    assert summary["mixed_settings"] == {"math": ["seed"], "college_math": ["model"]}
    assert format_summary(summary).endswith("**Not comparable:** made with other settings than the rest: "
                                            "college_math (model), math (seed)")
    assert "mixed_settings" not in summarize(tmp_path, ["gsm8k", "minerva_math"])


def test_summarize_only_tables_just_the_named_benchmarks(tmp_path, encoder, gsm8k, capsys):
    evaluate_main = launch_main("evaluate")
    backend = ScriptedBackend(encoder, gsm8k, right=lambda number, sample: True)
    run_evaluation(backend, encoder, _settings(tmp_path), model_name="scripted")
    (tmp_path / "math500.jsonl").write_text((tmp_path / "gsm8k.jsonl").read_text().replace('"score": [true]',
                                                                                           '"score": [false]'))
    (tmp_path / "math500.meta.json").write_text("{}")
    (tmp_path / "gsm8k.scored.jsonl").write_text((tmp_path / "gsm8k.jsonl").read_text())  # not a benchmark result
    assert evaluate_main(["--summarize-only", "--benchmarks", "gsm8k", "--output-dir", str(tmp_path)]) == 0
    assert "math500" not in capsys.readouterr().out
    assert evaluate_main(["--summarize-only", "--output-dir", str(tmp_path)]) == 0  # no list: every result
    table = capsys.readouterr().out
    assert "math500" in table and "scored" not in table


def test_samples_give_majority_and_oracle_metrics(tmp_path, encoder, gsm8k):
    # Problem 0: 3 of 3 right; 1: 1 of 3 (majority wrong); 2-5: 2 of 3 (majority right).
    def right(number, sample):
        return {0: True, 1: sample == 0}.get(number, sample < 2)

    backend = ScriptedBackend(encoder, gsm8k, right)
    settings = _settings(tmp_path, num_samples=3, sampling=SamplingParams(max_new_tokens=64, temperature=0.7))
    row = run_evaluation(backend, encoder, settings, model_name="scripted")["benchmarks"]["gsm8k"]
    assert row["pass@1"] == pytest.approx(100 * (3 + 1 + 4 * 2) / 18)
    assert row["maj@3"] == pytest.approx(100 * 5 / 6)
    assert row["pass@3"] == pytest.approx(100.0)
    assert "maj@3" in format_summary(summarize(tmp_path))


def test_prompts_over_the_context_are_scored_wrong_and_reported(tmp_path, encoder, gsm8k):
    lengths = [len(encoder.encode([{"role": "user", "content": p.question}], True).input_ids) for p in gsm8k]
    limit = sorted(lengths)[LIMIT // 2] + 20  # roughly half the prompts (with the instruction) do not fit
    backend = ScriptedBackend(encoder, gsm8k, right=lambda number, sample: True, max_sequence_length=limit)
    summary = run_evaluation(backend, encoder, _settings(tmp_path), model_name="scripted")
    rows = [json.loads(line) for line in (tmp_path / "gsm8k.jsonl").open()]
    too_long = [row["finish_reason"] == ["prompt_too_long"] for row in rows]
    assert 0 < sum(too_long) < LIMIT
    assert [row["score"] == [True] for row in rows] == [not flag for flag in too_long]
    assert summary["benchmarks"]["gsm8k"]["prompts_too_long"] == sum(too_long)
    assert f"gsm8k {sum(too_long)}" in format_summary(summary)


class CutOffBackend(ScriptedBackend):
    """Like ScriptedBackend, but the first sample of every odd-numbered problem runs into the token limit while
    repeating a number."""

    def generate(self, prompts, params, seed, progress):
        generations = super().generate(prompts, params, seed, progress)
        seen: dict[int, int] = {}
        for row, prompt in enumerate(prompts):
            text = self.encoder.tokenizer.decode(prompt)
            number = next(i for question, i in self.index_of.items() if question in text)
            seen[number] = seen.get(number, -1) + 1
            if number % 2 and seen[number] == 0:
                generations[row] = Generation(self.encoder.tokenizer.encode("so 19 = 19 = 19 = 19"), "length")
        return generations


def test_responses_cut_off_at_the_token_limit_are_counted_and_graded_on_their_last_number(tmp_path, encoder, gsm8k):
    backend = CutOffBackend(encoder, gsm8k, right=lambda number, sample: True)
    settings = _settings(tmp_path, num_samples=2, sampling=SamplingParams(max_new_tokens=64, temperature=0.7))
    summary = run_evaluation(backend, encoder, settings, model_name="scripted")
    rows = [json.loads(line) for line in (tmp_path / "gsm8k.jsonl").open()]
    assert [row["pred"][0] == "19" for row in rows] == [bool(i % 2) for i in range(LIMIT)]
    assert summary["benchmarks"]["gsm8k"]["responses_cut_off"] == LIMIT // 2
    assert f"gsm8k {LIMIT // 2} of {2 * LIMIT}" in format_summary(summary)


def test_the_paper_average_is_over_its_seven_benchmarks_when_more_ran(tmp_path):
    """The Slurm array runs nine benchmarks; the paper's Table 3 average is over seven of them."""
    from acemath_mcore.eval.harness import TABLE3_BENCHMARKS

    accuracy = {name: 10.0 * (index + 1) for index, name in enumerate([*TABLE3_BENCHMARKS, "aime24", "amc23"])}
    for name, percent in accuracy.items():  # ten problems, one response each, percent / 10 of them right
        with open(tmp_path / f"{name}.jsonl", "w") as stream:
            for idx in range(10):
                stream.write(json.dumps({"idx": idx, "question": "q", "gt": "1", "code": ["x"], "pred": ["1"],
                                         "score": [idx < percent / 10], "finish_reason": ["stop"]}) + "\n")
        (tmp_path / f"{name}.meta.json").write_text("{}")
    summary = summarize(tmp_path)
    assert summary["average"] == pytest.approx(sum(accuracy.values()) / 9)
    assert summary["table3_average"] == pytest.approx(sum(accuracy[name] for name in TABLE3_BENCHMARKS) / 7)
    assert "| **Table 3 average** (7 benchmarks) | | | **40.00** |" in format_summary(summary)
    (tmp_path / "aime24.meta.json").unlink()
    (tmp_path / "amc23.meta.json").unlink()
    assert "table3_average" not in summarize(tmp_path)  # the seven alone: the average is already theirs


def test_greedy_with_several_samples_is_refused(tmp_path, encoder, gsm8k):
    backend = ScriptedBackend(encoder, gsm8k, right=lambda number, sample: True)
    with pytest.raises(ValueError, match="set a temperature"):
        run_evaluation(backend, encoder, _settings(tmp_path, num_samples=4), model_name="scripted")



@pytest.mark.parametrize("setting", [{"chunk_problems": -1}, {"chunk_problems": 0}, {"limit": 0}])
def test_chunks_and_limits_below_one_are_refused_before_anything_is_written(tmp_path, encoder, gsm8k, setting):
    """A negative chunk size once generated nothing and stored the empty results as finished."""
    backend = ScriptedBackend(encoder, gsm8k, right=lambda number, sample: True)
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name} must be >= 1 \\(or unset\\), got {setting[name]}"):
        run_evaluation(backend, encoder, _settings(tmp_path / "out", **setting), model_name="scripted")
    assert not (tmp_path / "out").exists()


def test_multiple_choice_records_keep_the_choices_a_reward_model_must_see(tmp_path, encoder):
    """launch/score.py gives the RM each record's question as the user turn: without the choices it cannot judge
    a response ending in \\boxed{C}."""
    problems = load_benchmark("mmlu_stem", shared_path("data/eval"))[0][:3]
    backend = ScriptedBackend(encoder, problems, right=lambda number, sample: True)
    summary = run_evaluation(backend, encoder, _settings(tmp_path, benchmarks=["mmlu_stem"], limit=3),
                             model_name="scripted")
    assert summary["benchmarks"]["mmlu_stem"]["pass@1"] == pytest.approx(100.0)
    rows = [json.loads(line) for line in (tmp_path / "mmlu_stem.jsonl").open()]
    for row, problem in zip(rows, problems):
        assert row["question"].startswith(problem.question)
        assert all(f"({letter}) {choice}" in row["question"] for letter, choice in zip("ABCD", problem.choices))


def test_cli_input_errors_are_one_line_without_a_traceback(tmp_path):
    import subprocess
    import sys

    from launch_scripts import LAUNCH

    done = subprocess.run([sys.executable, str(LAUNCH / "evaluate.py"), "--summarize-only", "--output-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"evaluate.py: error: no benchmark results (<benchmark>.jsonl with its .meta.json) in {tmp_path}" in \
        done.stderr and "Traceback" not in done.stderr


def test_shards_merge_into_what_one_unsharded_run_writes(tmp_path, encoder, gsm8k, monkeypatch, capsys):
    """A long benchmark split over jobs: each shard generates its run of chunks with the seeds an unsharded run
    gives them, and whoever finds every part finished (the last shard, or ``--summarize-only``) merges them into
    the unsharded run's results and settings, so a rerun of either kind skips it. Some prompts are over the
    context, and 4 shards over 3 chunks leave shard 0 with none."""
    from acemath_mcore.eval import harness
    from acemath_mcore.eval.harness import Shard, finished_with

    evaluate_main = launch_main("evaluate")
    lengths = [len(encoder.encode([{"role": "user", "content": p.question}], True).input_ids) for p in gsm8k]
    limit = sorted(lengths)[LIMIT // 2] + 20

    def right(number, sample):
        return (number + sample) % 3 != 0

    def settings(output_dir, shard=None):
        return _settings(output_dir, num_samples=2, sampling=SamplingParams(max_new_tokens=64, temperature=0.7),
                         chunk_problems=2, shard=shard)

    whole = DyingBackend(encoder, gsm8k, right, max_sequence_length=limit)
    expected = run_evaluation(whole, encoder, settings(tmp_path / "whole"), model_name="scripted")
    assert expected["benchmarks"]["gsm8k"]["prompts_too_long"] > 0

    out, seeds = tmp_path / "sharded", []
    for index in (2, 0, 3):
        backend = DyingBackend(encoder, gsm8k, right, max_sequence_length=limit)
        assert run_evaluation(backend, encoder, settings(out, Shard(index, 4)), model_name="scripted") is None
        seeds += backend.seeds
    assert (out / "shards" / "gsm8k.shard0-of-4.jsonl").read_text() == ""
    assert not (out / "gsm8k.jsonl").exists()
    assert evaluate_main(["--summarize-only", "--if-complete", "--benchmarks", "gsm8k", "--output-dir", str(out)]) == 0
    assert "no table yet: no results for gsm8k" in capsys.readouterr().err and not (out / "summary.md").exists()

    # The last shard finishes but does not merge (two shards finishing at once on a file system that shows
    # neither the other's files): --summarize-only, which every array task runs, merges.
    with monkeypatch.context() as patched:
        patched.setattr(harness, "merge_shards", lambda *args, **kwargs: False)
        backend = DyingBackend(encoder, gsm8k, right, max_sequence_length=limit)
        run_evaluation(backend, encoder, settings(out, Shard(1, 4)), model_name="scripted")
        seeds += backend.seeds
    assert sorted(seeds) == whole.seeds
    assert not (out / "gsm8k.jsonl").exists()
    assert evaluate_main(["--summarize-only", "--output-dir", str(out)]) == 0  # no list: the parts name it
    assert "| gsm8k | 6 | 2 |" in capsys.readouterr().out
    assert (out / "gsm8k.jsonl").read_text() == (tmp_path / "whole" / "gsm8k.jsonl").read_text()
    meta, whole_meta = (json.loads((path / "gsm8k.meta.json").read_text()) for path in (out, tmp_path / "whole"))
    assert meta["settings"] == whole_meta["settings"] and meta["shards"] == 4
    assert meta["prompts_too_long"] == whole_meta["prompts_too_long"]
    assert summarize(out)["benchmarks"] == expected["benchmarks"]
    assert not list((out / "shards").iterdir())
    assert finished_with(settings(out), "gsm8k", "scripted")
    assert finished_with(settings(out, Shard(3, 4)), "gsm8k", "scripted")
    again = DyingBackend(encoder, gsm8k, right, max_sequence_length=limit)
    assert run_evaluation(again, encoder, settings(out, Shard(1, 4)), model_name="scripted") is not None
    assert again.calls == 0


def test_shard_arguments_are_checked(tmp_path, encoder, gsm8k):
    from acemath_mcore.eval.harness import Shard

    evaluate_main = launch_main("evaluate")
    for bad, message in (("4/4", "need 0 <= index < count"), ("1of4", "expected INDEX/COUNT"),
                         ("-1/2", "expected INDEX/COUNT")):
        with pytest.raises(SystemExit, match=f"--shard: shard .*{message}"):
            evaluate_main(["--output-dir", str(tmp_path), f"--shard={bad}"])
    with pytest.raises(SystemExit, match="it needs --chunk-problems > 0"):
        evaluate_main(["--output-dir", str(tmp_path), "--shard", "0/2", "--chunk-problems", "0"])
    with pytest.raises(ValueError, match="set chunk_problems"):
        run_evaluation(ScriptedBackend(encoder, gsm8k, right=lambda number, sample: True), encoder,
                       _settings(tmp_path, shard=Shard(0, 2)), model_name="scripted")


def test_progress_lines_give_the_rate_of_this_run_and_the_time_left(monkeypatch, caplog):
    """A resumed run's restored responses count as done, not toward the rate (800 left at 200 / 40 s = 5/s: 160 s);
    lines come at most every interval, and when the benchmark completes."""
    import logging

    from acemath_mcore import progress as progress_lines

    clock = {"now": 1000.0}
    monkeypatch.setattr(progress_lines.time, "perf_counter", lambda: clock["now"])
    progress = progress_lines.ProgressLog("math", "generated", "responses", interval=30)
    progress.start(100)
    with caplog.at_level(logging.INFO, logger="acemath_mcore"):
        for seconds, done in ((10, 150), (40, 300), (50, 400), (75, 1100)):
            clock["now"] = 1000.0 + seconds
            progress(done, 1100)
        silent = progress_lines.ProgressLog("math", "generated", "responses", enabled=False)
        silent(1100, 1100)
    assert [record.getMessage() for record in caplog.records] == [
        "math: generated 300/1100 responses (40 s, 5.00 responses/s, 2 min 40 s left)",
        "math: generated 1100/1100 responses (1 min 15 s, 13.33 responses/s)",
    ]
