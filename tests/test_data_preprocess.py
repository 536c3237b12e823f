"""Preprocessing JSONL → megatron IndexedDataset: round trip, bad-line accounting with file:line, strict mode,
max-length policies, worker determinism, curation steps and the CLI."""

import json
from collections import Counter

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from launch_scripts import launch_main
from shared_data import shared_path

from acemath_mcore.data.chat_templates import MATH_SYSTEM_PROMPT, ConversationEncoder, build_template
from acemath_mcore.data.indexed import LOSS_MASK_SUFFIX, SFTIndexedDataset
from acemath_mcore.data.jsonl import DataError
from acemath_mcore.data.jsonl import dropped_path
from acemath_mcore.data.preprocess import PreprocessConfig, preprocess_sft, stats_path
from acemath_mcore.data.tokenizers import load_tokenizer
QWEN = str(shared_path("tokenizers/qwen2"))


def load_cli():
    return launch_main("preprocess")


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN)


@pytest.fixture(scope="module")
def real_records():
    records = []
    for line in shared_path("data/rm/math_cot_100.jsonl").read_text().splitlines()[:30]:
        row = json.loads(line)
        records.append({"messages": [{"role": "user", "content": row["question"]},
                                     {"role": "assistant", "content": row["code"][0]}], "answer": row["gt"]})
    records.append({"prompt": "What is 3+3?", "response": "It is $\\boxed{6}$.", "system": "Be brief."})
    return records


def write_jsonl(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def run(qwen):
    """Preprocess with the Qwen2 tokenizer loaded once for the module."""

    def preprocess(tmp_path, inputs, name="out", **options):
        options.setdefault("progress", False)
        options.setdefault("workers", 1)
        config = PreprocessConfig(inputs=inputs, output_prefix=str(tmp_path / name), tokenizer=QWEN, **options)
        return preprocess_sft(config, qwen), str(tmp_path / name)

    return preprocess


def test_round_trip_through_megatron_indexed_dataset(tmp_path, qwen, real_records, run):
    data = write_jsonl(tmp_path / "train.jsonl", real_records)
    stats, prefix = run(tmp_path, [data], system_prompt=MATH_SYSTEM_PROMPT)
    tokens, masks = IndexedDataset(prefix), IndexedDataset(prefix + LOSS_MASK_SUFFIX)
    assert tokens.index.dtype == np.int32 and masks.index.dtype == np.uint8  # 151,646 ids need int32
    assert len(tokens) == len(masks) == stats["samples"] == len(real_records)
    assert tokens.document_indices.tolist() == list(range(len(real_records) + 1))  # one document per sample
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen, MATH_SYSTEM_PROMPT))
    conversations = [r["messages"] if "messages" in r else
                     [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["prompt"]},
                      {"role": "assistant", "content": r["response"]}] for r in real_records]
    for index, expected in enumerate(encoder.encode_batch(conversations)):
        assert np.array_equal(tokens[index], expected.input_ids)
        assert np.array_equal(masks[index], expected.loss_mask)
    assert stats["tokens"] == int(tokens.sequence_lengths.sum())
    assert stats["loss_tokens"] == sum(int(masks[i].sum()) for i in range(len(masks)))
    assert stats["dropped_total"] == stats["truncated"] == 0
    assert json.loads(stats_path(prefix).read_text())["samples"] == len(real_records)
    assert SFTIndexedDataset(prefix)[0][0].tolist() == tokens[0].tolist()


def test_acemath_instruct_rows_train_on_their_answer_field(tmp_path, qwen, run):
    """nvidia/AceMath-Instruct-Training-Data keeps the prompt turns in 'messages' and the response in 'answer'."""
    rows = [
        {"messages": [{"role": "user", "content": "What is 1+1?"}], "answer": "1+1 = 2, so \\boxed{2}."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "And 2+2?"}], "answer": "\\boxed{4}"},
    ]
    stats, prefix = run(tmp_path, [write_jsonl(tmp_path / "acemath.jsonl", rows)])
    assert stats["samples"] == 2 and stats["dropped_total"] == 0
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen))
    data = SFTIndexedDataset(prefix)
    for index, row in enumerate(rows):
        expected = encoder.encode(row["messages"] + [{"role": "assistant", "content": row["answer"]}])
        tokens, mask = data[index]
        assert np.array_equal(tokens, expected.input_ids) and np.array_equal(mask, expected.loss_mask)
        assert qwen.decode(tokens[mask.astype(bool)].tolist()).endswith(row["answer"] + "<|im_end|>")


BAD_LINES = [
    # 1: good, behind the UTF-8 byte-order mark some editors write first
    b"\xef\xbb\xbf" + json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"},
                                              {"role": "assistant", "content": "\\boxed{4}"}]}).encode(),
    b'{"messages": [{"role": "user", "content": "hi"}',  # 2: malformed JSON
    b"",  # 3: blank, skipped silently
    {"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]},  # 4
    {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "x"}]},  # 5
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},  # 6
    b'{"prompt": "caf\xe9", "response": "x"}',  # 7: Latin-1 byte, not UTF-8
    {"messages": [{"role": "user", "content": "only a question"}]},  # 8
    {"prompt": "P", "response": "R <|im_end|> injected"},  # 9
    [1, 2],  # 10
    {"text": "pretraining style"},  # 11
    {"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"},
                  {"role": "assistant", "content": "a"}]},  # 12
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},  # 13
    b'{"prompt": "a cut-off emoji \\ud83d", "response": "x"}',  # 14: valid JSON, not encodable text
    b'{"prompt": "q", "response": "x", "id": ' + b"9" * 5000 + b"}",  # 15: past Python's int digit limit
    {"messages": [{"role": "user", "content": "q"}], "answer": None},  # 16: the response is not text
    {"prompt": "What is 3+3?", "response": "It is \\boxed{6}."},
]
EXPECTED_DROPS = {2: "invalid_json", 4: "missing_role", 5: "unknown_role", 6: "empty_assistant_turn",
                  7: "invalid_utf8", 8: "no_assistant_turn", 9: "special_token_in_content", 10: "not_an_object",
                  11: "unrecognized_schema", 12: "misplaced_system", 13: "bad_message", 14: "invalid_utf8",
                  15: "invalid_json", 16: "bad_message"}


def test_bad_lines_are_counted_and_located(tmp_path, run):
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    stats, prefix = run(tmp_path, [data], workers=2, lines_per_chunk=3)
    assert stats["samples"] == 2 and stats["lines"] == len(BAD_LINES) - 1
    assert stats["dropped"] == dict(Counter(EXPECTED_DROPS.values()))
    assert stats["dropped_total"] == len(EXPECTED_DROPS)
    logged = [json.loads(line) for line in dropped_path(prefix).read_text().splitlines()]
    assert {entry["where"]: entry["reason"] for entry in logged} == {
        f"{data}:{line}": reason for line, reason in EXPECTED_DROPS.items()}
    assert stats["drop_examples"]["unknown_role"] == [f"{data}:5: message 0 has role 'tool'; expected one of "
                                                      f"('system', 'user', 'assistant')"]


def test_strict_mode_stops_at_the_first_bad_line_and_writes_nothing(tmp_path, run):
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(DataError, match=rf"^{data}:2: invalid_json: "):
        run(tmp_path, [data], strict=True, workers=2, lines_per_chunk=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_max_length_truncate_and_drop_are_counted(tmp_path, real_records, run):
    long_prompt = {"prompt": "word " * 400, "response": "short"}
    data = write_jsonl(tmp_path / "train.jsonl", real_records + [long_prompt])
    full, _ = run(tmp_path, [data], name="full")
    limit = 256
    samples = SFTIndexedDataset(str(tmp_path / "full"))
    longer = int((samples.lengths > limit).sum())
    # Samples whose first trained token lies beyond the limit (the long prompt, and one long MATH question).
    no_loss_left = sum(1 for i in range(len(samples)) if np.flatnonzero(samples[i][1])[0] >= limit)
    assert no_loss_left == 2
    truncated, prefix = run(tmp_path, [data], name="truncated", max_length=limit, overflow="truncate")
    assert truncated["truncated"] == longer - no_loss_left
    assert truncated["dropped"] == {"no_loss_after_truncation": no_loss_left}
    assert max(len(SFTIndexedDataset(prefix)[i][0]) for i in range(truncated["samples"])) == limit
    dropped, _ = run(tmp_path, [data], name="dropped", max_length=limit, overflow="drop")
    assert dropped["dropped"] == {"too_long": longer} and dropped["truncated"] == 0
    assert dropped["samples"] == full["samples"] - longer
    with pytest.raises(ValueError, match="overflow must be one of"):
        PreprocessConfig(inputs=[], output_prefix="x", tokenizer=QWEN, overflow="wrap")


def test_a_sample_of_exactly_max_length_is_kept_whole(tmp_path, real_records, run):
    data = write_jsonl(tmp_path / "train.jsonl", real_records)
    full, prefix = run(tmp_path, [data], name="full")
    lengths = SFTIndexedDataset(prefix).lengths
    longest = int(lengths.max())
    for overflow in ("drop", "truncate"):
        at_limit, kept = run(tmp_path, [data], name=f"at_{overflow}", max_length=longest, overflow=overflow)
        assert (at_limit["samples"], at_limit["truncated"], at_limit["dropped"]) == (full["samples"], 0, {})
        assert (SFTIndexedDataset(kept).lengths == lengths).all()
    below, _ = run(tmp_path, [data], name="below", max_length=longest - 1, overflow="drop")
    assert below["dropped"] == {"too_long": int((lengths == longest).sum())}


def test_workers_and_chunking_do_not_change_the_output(tmp_path, real_records, run):
    data = write_jsonl(tmp_path / "train.jsonl", real_records * 3)
    run(tmp_path, [data], name="one", workers=1, lines_per_chunk=1000)
    run(tmp_path, [data], name="two", workers=2, lines_per_chunk=7)
    for suffix in (".bin", ".idx", LOSS_MASK_SUFFIX + ".bin", LOSS_MASK_SUFFIX + ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def conversation(prompt, response):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def test_repetition_catches_short_loops():
    """Windows overlap, so a 20-word sequence can occur 3 times in as few as 22 words (one word repeated)."""
    from acemath_mcore.data.curation import RepeatedText
    from acemath_mcore.data.jsonl import Conversation

    def check(response):
        return RepeatedText(20, 3).check(Conversation("x:1", [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": response}]))

    assert check(" ".join(["again"] * 22)) == "a 20-word sequence occurs 3 times"
    assert check(" ".join(["again"] * 21)) is None
    assert check(" ".join(["one two three four five"] * 6)) is not None  # 30 words: a 5-word loop
    assert check(" ".join(f"w{i}" for i in range(80))) is None


@pytest.mark.parametrize("spec", ["repetition=20", "repetition=0:3", "repetition=5:1", "repetition=a:b"])
def test_a_bad_repetition_spec_is_refused_by_name(spec):
    from acemath_mcore.data.preprocess import build_curation_step

    with pytest.raises(ValueError, match=f"curation step '{spec}': use repetition=NGRAM:COUNT with NGRAM >= 1"):
        build_curation_step(spec, None)
    assert build_curation_step("repetition=5:2", None).spec == "repetition=5:2"


def test_curation_steps_report_their_counts(tmp_path, run):
    math_problem = json.loads(shared_path("data/eval/math/test.jsonl").read_text().splitlines()[17])["problem"]
    loop = " ".join(["we add one to both sides and simplify the result once more"] * 8)
    data = write_jsonl(tmp_path / "train.jsonl", [
        conversation("Add 1 and 1.", "1 + 1 = \\boxed{2}"),
        conversation("ADD 1 AND 1.  ", "It is \\boxed{2}"),  # duplicate prompt (lower-cased, stripped)
        conversation("Long one", "word " * 150 + "\\boxed{1}"),  # over max-words
        conversation("Loop", loop + " \\boxed{3}"),  # repetition
        conversation("No box", "The answer is 3."),  # no boxed answer
        conversation(math_problem, "\\boxed{1}"),  # contaminated
        conversation("Fine", "\\boxed{5}"),
    ])
    stats, prefix = run(tmp_path, [data], dedup_prompts=True, benchmark_dir=str(shared_path("data/eval")),
                        curate=["max-words=100", "repetition", "boxed", "decontaminate=math"], workers=2)
    assert stats["curation"] == [
        {"step": "max-words=100", "seen": 7, "dropped": 1},
        {"step": "repetition=20:3", "seen": 6, "dropped": 1},
        {"step": "boxed", "seen": 5, "dropped": 1},
        {"step": "decontaminate=math", "seen": 4, "dropped": 1},
        {"step": "dedup", "seen": 3, "dropped": 1},
    ]
    assert stats["samples"] == 2
    logged = {json.loads(line)["where"]: json.loads(line) for line in dropped_path(prefix).read_text().splitlines()}
    assert logged[f"{data}:2"]["reason"] == "duplicate_prompt"
    assert logged[f"{data}:6"]["reason"] == "contaminated" and "math" in logged[f"{data}:6"]["detail"]
    with pytest.raises(ValueError, match="unknown curation step"):
        run(tmp_path, [data], name="bad", curate=["shiny"])


def test_cross_check_keeps_only_agreeing_answers(tmp_path, run):
    data = write_jsonl(tmp_path / "train.jsonl", [
        conversation("Q1", "so \\boxed{\\frac{1}{2}}"),
        conversation("Q2", "so \\boxed{3}"),
        conversation("Q3", "so \\boxed{7}"),
    ])
    other = write_jsonl(tmp_path / "model_b.jsonl", [
        {"prompt": "q1", "response": "the answer is \\boxed{0.5}"},  # same answer, other form; prompt case differs
        {"prompt": "Q2", "response": "\\boxed{4}"},
    ])
    stats, prefix = run(tmp_path, [data], cross_check=[other])
    assert stats["samples"] == 1
    assert stats["dropped"] == {"cross_check_disagree": 2}
    assert stats["curation"] == [{"step": f"cross-check={other}", "seen": 3, "dropped": 2}]
    details = [json.loads(line)["detail"] for line in dropped_path(prefix).read_text().splitlines()]
    assert details == [f"{other} answers '4', the sample '3'", f"prompt missing from {other}"]


def test_cross_check_reads_acemath_instruct_rows(tmp_path, run):
    data = write_jsonl(tmp_path / "train.jsonl", [conversation("Q1", "so \\boxed{2}"), conversation("Q2", "\\boxed{5}")])
    other = write_jsonl(tmp_path / "model_b.jsonl", [
        {"messages": [{"role": "user", "content": "Q1"}], "answer": "It is \\boxed{2}."},  # 'answer' is the response
        {"messages": [{"role": "user", "content": "Q2"}], "answer": "\\boxed{6}"},
    ])
    stats, _ = run(tmp_path, [data], cross_check=[other])
    assert stats["samples"] == 1 and stats["dropped"] == {"cross_check_disagree": 1}


def test_cli_sft_and_strict_exit_code(tmp_path, real_records, capsys):
    cli_main = load_cli()
    data = write_jsonl(tmp_path / "train.jsonl", real_records[:5] + [b"not json"])
    assert cli_main(["sft", "--input", data, "--output", str(tmp_path / "cli"), "--tokenizer", QWEN,
                     "--system-prompt", "math", "--max-length", "512", "--no-progress", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 5 and summary["dropped"] == {"invalid_json": 1}
    assert cli_main(["sft", "--input", data, "--output", str(tmp_path / "strict"), "--tokenizer", QWEN,
                     "--strict", "--no-progress"]) == 1
    assert f"{data}:6: invalid_json" in capsys.readouterr().err


def test_sentencepiece_plain_data_uses_uint16(tmp_path, real_records):
    config = PreprocessConfig(inputs=[write_jsonl(tmp_path / "t.jsonl", real_records[:3])],
                              output_prefix=str(tmp_path / "sp"), template="plain", workers=1, progress=False,
                              tokenizer=str(shared_path("tokenizers/llama2_sp/tokenizer.model")))
    stats = preprocess_sft(config)
    tokens = IndexedDataset(str(tmp_path / "sp"))
    assert tokens.index.dtype == np.uint16 and stats["samples"] == 3
    assert tokens[0][0] == 1 and tokens[0][-1] == 2  # <s> ... </s>


def test_progress_off_a_terminal_is_lines_with_the_time_left(capsys, monkeypatch):
    """On a Slurm log (stderr not a terminal) no tqdm bar: a line per interval, here 1 of 4 MiB after 2 s: 6 s left."""
    from acemath_mcore.data import preprocess

    clock = {"now": 100.0}
    monkeypatch.setattr(preprocess.time, "monotonic", lambda: clock["now"])
    progress = preprocess._Progress(4 * 2**20, enabled=True, interval=1.0)
    clock["now"] = 102.0
    progress.update(2**20, 5000)
    progress.close()
    assert capsys.readouterr().err == "preprocess: 1/4 MiB read, 5,000 tokens, 2,500 tokens/s, 6 s left\n"
