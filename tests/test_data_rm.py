"""Reward-model data: grouping, score-sorted selection on real scored responses, tokenized groups ending at the
score token, and batches that never split a group."""

import itertools
import json

import numpy as np
import pytest
import torch

from shared_data import shared_path

from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
from acemath_mcore.data.jsonl import DataError
from acemath_mcore.data.rm_data import (
    PackedRMDataset,
    RMGroup,
    RMGroupDataset,
    RMGroupSample,
    RMPreprocessConfig,
    build_rm_dataset,
    collate_rm_packed,
    collate_rm_padded,
    encode_rm_group,
    iter_rm_groups,
    preprocess_rm,
    rm_dataloader,
    score_sorted_selection,
    uniform_label_reason,
)
from acemath_mcore.data.tokenizers import load_tokenizer

QWEN = str(shared_path("tokenizers/qwen2"))
MATH_COT = str(shared_path("data/rm/math_cot_100.jsonl"))


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN)


def raw_label_counts() -> list[tuple[int, int]]:
    """(correct, total) per problem, counted straight from the shared file's ``score`` lists."""
    with open(MATH_COT, encoding="utf-8") as handle:
        return [(sum(map(bool, json.loads(line)["score"])), len(json.loads(line)["score"])) for line in handle]


@pytest.fixture(scope="module")
def real_groups():
    return list(iter_rm_groups([MATH_COT], report=pytest.fail))


@pytest.fixture(scope="module")
def rm_prefix(tmp_path_factory, qwen):
    prefix = str(tmp_path_factory.mktemp("rm") / "math_cot")
    stats = preprocess_rm(RMPreprocessConfig(inputs=[MATH_COT], output_prefix=prefix, tokenizer=QWEN,
                                             num_responses=4), qwen)
    return prefix, stats


def build_rm_dataloader(prefix, pad_id, global_batch_size, micro_batch_size, packed_tokens=None, seq_length=None,
                        **loader_options):
    """What the trainer builds from a config: the dataset of one prefix, then its loader."""
    return rm_dataloader(build_rm_dataset(prefix, packed_tokens, seq_length), pad_id, global_batch_size,
                         micro_batch_size, seq_length, **loader_options)


def rm_row(qid, prompt, response, label, system="Please reason step by step."):
    return {"qid": qid, "label": label, "message": [{"role": "system", "content": system},
                                                    {"role": "user", "content": prompt},
                                                    {"role": "assistant", "content": response}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_acemath_rm_rows_group_by_contiguous_qid(tmp_path):
    data = write_jsonl(tmp_path / "rm.jsonl", [
        rm_row(1, "1+1?", "2", 1), rm_row(1, "1+1?", "3", 0), rm_row(1, "1+1?", "11", 0),
        rm_row(2, "2+2?", "4", 1), rm_row(2, "2+2?", "4.0", 1),
        rm_row(3, "3+3?", "6", "yes"),  # line 6: bad label
        rm_row(3, "3+3?", "6", 1), rm_row(3, "3+3!", "7", 0),  # line 8: prompt differs within the qid
        {"prompt": "5+5?", "responses": ["10", "9"], "labels": [1, 0], "scores": [0.5, 0.1]},
        rm_row(1, "1+1?", "2", 1),  # line 10: qid 1 again after its group ended
        rm_row(4, "4+4?", "8", 1), rm_row(5, "5+5?", "10", "yes"),  # line 12: bad, but qid 5 still ends qid 4
        rm_row(4, "4+4?", "9", 0),  # line 13: out of order, not merged into line 11's group
    ])
    errors = []
    groups = list(iter_rm_groups([data], errors.append))
    assert [(g.where, g.responses, g.labels) for g in groups] == [
        (f"{data}:1", ["2", "3", "11"], [1, 0, 0]),
        (f"{data}:4", ["4", "4.0"], [1, 1]),
        (f"{data}:9", ["10", "9"], [1, 0]),
        (f"{data}:7", ["6"], [1]),
        (f"{data}:11", ["8"], [1]),
    ]
    assert groups[0].prompt == [{"role": "system", "content": "Please reason step by step."},
                                {"role": "user", "content": "1+1?"}]
    assert groups[2].scores == [0.5, 0.1]
    assert [(e.where, e.reason) for e in errors] == [(f"{data}:6", "bad_label"), (f"{data}:8", "prompt_mismatch"),
                                                     (f"{data}:10", "qid_not_contiguous"), (f"{data}:12", "bad_label"),
                                                     (f"{data}:13", "qid_not_contiguous")]
    assert f"qid 4 already ended at {data}:12" in str(errors[-1])
    def strict(error):
        raise error

    with pytest.raises(DataError, match=rf"{data}:6: bad_label"):
        list(iter_rm_groups([data], report=strict))


def test_malformed_rm_rows_are_counted_not_fatal(tmp_path, qwen):
    """Every one of these once stopped a run with a bare exception (or, for the special token, tokenized into a
    forged turn on one tokenizer backend); each must be a drop naming its line, the good group kept."""
    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template

    good = {"prompt": "5+5?", "responses": ["10", "9"], "labels": [1, 0]}
    data = write_jsonl(tmp_path / "rm.jsonl", [
        rm_row(None, "1+1?", "2", 1),  # line 1: null qid
        rm_row([1], "1+1?", "2", 1),  # line 2: unhashable qid
        {"question": "2+2?", "code": ["4", "5"], "score": [True, False], "pred_score": [[0.9], []]},  # 3
        {"prompt": "3+3?", "responses": ["6", "6<|im_end|>\n<|im_start|>user\nhi"], "labels": [1, 0]},  # 4
        rm_row(7, "4+4?", "8<|im_end|>", 1),  # line 5
        good,
    ])
    errors = []
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen))
    groups = list(iter_rm_groups([data], errors.append, encoder))
    assert [(e.where, e.reason) for e in errors] == [
        (f"{data}:1", "bad_qid"), (f"{data}:2", "bad_qid"), (f"{data}:3", "bad_score"),
        (f"{data}:4", "special_token_in_content"), (f"{data}:5", "special_token_in_content")]
    # In a one-line group the bad candidate goes, not its group (here leaving groups of one, dropped later as
    # all_correct by preprocessing).
    assert [(g.where, g.responses) for g in groups] == [(f"{data}:3", ["4"]), (f"{data}:4", ["6"]),
                                                        (f"{data}:6", ["10", "9"])]


def test_bad_candidates_of_a_one_line_group_are_dropped_one_by_one(tmp_path, qwen):
    """Each bad response is a counted drop naming its index; the group keeps the rest with their labels and scores
    aligned. A bad prompt still drops the whole line."""
    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template

    data = write_jsonl(tmp_path / "rm.jsonl", [
        {"prompt": "5+5?", "responses": ["10", "  ", 9, "9", "11", "<|im_start|>", "12"],
         "labels": [1, 0, 0, "no", 0, 0, 0], "scores": [0.5, 0.4, 0.3, 0.2, "high", 0.0, -0.1]},
        {"prompt": "<|im_end|>", "responses": ["1", "2"], "labels": [1, 0]},
        {"question": "2+2?", "code": ["", "4"], "score": [False, True]},
    ])
    errors = []
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen))
    groups = list(iter_rm_groups([data], errors.append, encoder))
    assert [(g.where, g.responses, g.labels, g.scores) for g in groups] == [
        (f"{data}:1", ["10", "12"], [1, 0], [0.5, -0.1]), (f"{data}:3", ["4"], [1], None)]
    assert [(e.where, e.reason, e.detail.split(":")[0]) for e in errors] == [
        (f"{data}:1", "empty_assistant_turn", "response 1"), (f"{data}:1", "bad_message", "response 2"),
        (f"{data}:1", "bad_label", "response 3"), (f"{data}:1", "bad_score", "response 4"),
        (f"{data}:1", "special_token_in_content", "response 5"),
        (f"{data}:2", "special_token_in_content", "content contains '<|im_end|>'"),
        (f"{data}:3", "empty_assistant_turn", "response 0")]
    stats = preprocess_rm(RMPreprocessConfig(inputs=[data], output_prefix=str(tmp_path / "rm"), tokenizer=QWEN), qwen)
    assert (stats["groups"], stats["responses"], stats["dropped_total"]) == (1, 2, 8)  # 7 candidates + 1 all_correct
    assert stats["dropped"]["all_correct"] == 1 and stats["dropped"]["empty_assistant_turn"] == 2


def test_real_scored_groups_and_uniform_label_drops(real_groups):
    assert len(real_groups) == 100 and all(len(g.responses) == 8 and len(g.scores) == 8 for g in real_groups)
    reasons = [uniform_label_reason(g) for g in real_groups]
    counts = raw_label_counts()
    expected = (sum(c == n for c, n in counts), sum(c == 0 for c, _ in counts), sum(0 < c < n for c, n in counts))
    assert (reasons.count("all_correct"), reasons.count("all_wrong"), reasons.count(None)) == expected
    assert expected == (86, 4, 10)  # the figures docs/data.md quotes


def test_score_sorted_selection_hand_checked():
    group = RMGroup("x:1", [], [f"r{i}" for i in range(8)], [1, 0, 1, 0, 0, 1, 0, 0],
                    [0.9, 0.8, 0.2, -0.5, 0.1, 0.5, -0.9, 0.3])
    chosen = score_sorted_selection(group, 4)
    # Top-2 positives by score: r0 (0.9), r5 (0.5); bottom-2 negatives: r6 (-0.9), r3 (-0.5); input order kept.
    assert chosen.responses == ["r0", "r3", "r5", "r6"] and chosen.labels == [1, 0, 1, 0]
    flipped = score_sorted_selection(group, 4, positives="bottom", negatives="top")
    assert flipped.responses == ["r1", "r2", "r5", "r7"]
    # Few positives: take them all and fill with negatives.
    lopsided = RMGroup("x:2", [], ["a", "b", "c", "d"], [1, 0, 0, 0], [0.0, 3.0, 1.0, 2.0])
    assert score_sorted_selection(lopsided, 3).responses == ["a", "c", "d"]
    # Nothing to choose from a group no larger than asked for: scores are not needed (AceMath-RM rows have none).
    unscored = RMGroup("x:3", [], ["a", "b"], [1, 0])
    assert score_sorted_selection(unscored, 2) is unscored
    with pytest.raises(ValueError, match="x:4: score-sorted selection needs reward scores"):
        score_sorted_selection(RMGroup("x:4", [], ["a", "b", "c"], [1, 0, 0]), 2)


@pytest.mark.parametrize("count", [1, 0, -1])
def test_fewer_than_two_responses_per_group_is_refused(tmp_path, count):
    """One kept candidate can never hold a correct-wrong pair: every group written would teach nothing."""
    with pytest.raises(ValueError, match=rf"num_responses={count}: a group needs at least 2 candidates"):
        RMPreprocessConfig(inputs=[], output_prefix=str(tmp_path / "rm"), tokenizer=QWEN, num_responses=count)


def test_scores_that_are_no_list_or_not_finite_are_counted_drops(tmp_path):
    data = write_jsonl(tmp_path / "rm.jsonl", [
        {"question": "1+1?", "code": ["2", "3"], "score": [True, False], "pred_score": 5},
        {"prompt": "2+2?", "responses": ["4", "5"], "labels": [1, 0], "scores": 0.5},
        {"prompt": "3+3?", "responses": ["6", "7", "8"], "labels": [1, 0, 0], "scores": [1.0, float("nan"), 0.0]},
    ])
    errors = []
    groups = list(iter_rm_groups([data], errors.append))
    assert [(e.where, e.reason) for e in errors] == [(f"{data}:1", "bad_score"), (f"{data}:2", "bad_score"),
                                                     (f"{data}:3", "bad_score")]
    assert "the reward scores are a int, not a list" in errors[0].detail and "nan" in errors[2].detail
    assert [(g.where, g.responses, g.scores) for g in groups] == [(f"{data}:3", ["6", "8"], [1.0, 0.0])]


def test_score_sorted_selection_on_real_groups(real_groups):
    for group in (g for g in real_groups if uniform_label_reason(g) is None):
        chosen = score_sorted_selection(group, 6)
        positives, negatives = sum(group.labels), len(group.labels) - sum(group.labels)
        assert sum(chosen.labels) == min(positives, max(3, 6 - negatives)) and len(chosen.labels) == 6
        for label, take_highest in ((1, True), (0, False)):
            pool = sorted((s for s, lab in zip(group.scores, group.labels) if lab == label), reverse=take_highest)
            picked = sorted((s for s, lab in zip(chosen.scores, chosen.labels) if lab == label), reverse=take_highest)
            assert picked == pool[:len(picked)]


def _best_subset_by_search(scores, labels, size, positives, negatives):
    """Reference by exhaustive search over every subset of ``size`` candidates: the most balanced one (the smaller
    |positives - negatives|, then fewer positives: the odd one out is a negative), then the one whose positives
    have the best scores from their end (highest for "top"), then likewise its negatives. Distinct scores."""
    import itertools

    def preference(subset):
        chosen_positive = sorted((scores[i] for i in subset if labels[i]), reverse=positives == "top")
        chosen_negative = sorted((scores[i] for i in subset if not labels[i]), reverse=negatives == "top")
        sign_positive = -1 if positives == "top" else 1
        sign_negative = -1 if negatives == "top" else 1
        balance = abs(len(chosen_positive) - len(chosen_negative))
        return (balance, len(chosen_positive), [sign_positive * x for x in chosen_positive],
                [sign_negative * x for x in chosen_negative])

    return list(min(itertools.combinations(range(len(scores)), size), key=preference))


@pytest.mark.parametrize("positives, negatives", [("top", "bottom"), ("bottom", "top"), ("top", "top")])
def test_score_sorted_selection_is_the_best_subset_an_exhaustive_search_finds(positives, negatives):
    from acemath_mcore.data.rm_data import RMGroup

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(3, 10))
        size = int(rng.integers(2, n))
        labels = [int(x) for x in rng.integers(0, 2, size=n)]
        if len(set(labels)) < 2:
            labels[0] = 1 - labels[0]
        scores = [float(x) for x in rng.permutation(n)]  # distinct
        group = RMGroup(f"g{trial}", [{"role": "user", "content": "q"}], [f"r{i}" for i in range(n)], labels, scores)
        chosen = score_sorted_selection(group, size, positives, negatives)
        expected = _best_subset_by_search(scores, labels, size, positives, negatives)
        assert chosen.responses == [f"r{i}" for i in expected], (trial, scores, labels, size)


def ends_at_the_score_token(sequence, qwen) -> bool:
    """chatml: ``<|im_end|>`` then the newline that HF's template puts after it, the last token."""
    return sequence[-2] == qwen.im_end_id and list(sequence[-1:]) == qwen.encode("\n")


def test_rm_sequences_are_the_ids_hugging_face_scores(qwen, real_groups):
    """The score token is the one an exported ``*ForSequenceClassification`` reads: the last of
    ``apply_chat_template(..., add_generation_prompt=False)`` (the AceMath-RM model card's usage), checked against
    transformers rendering the tokenizer's own chat template."""
    import transformers
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(QWEN)
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen))
    group = real_groups[0]
    group.prompt = [{"role": "system", "content": "Please reason step by step."}] + group.prompt[-1:]
    sequences = encode_rm_group(encoder, group)
    assert len(sequences) == 8 and all(ends_at_the_score_token(s, qwen) for s in sequences)
    for response, sequence in zip(group.responses[:3], sequences):
        text = hf_tokenizer.apply_chat_template(group.prompt + [{"role": "assistant", "content": response}],
                                                tokenize=False, add_generation_prompt=False)
        assert sequence.tolist() == hf_tokenizer.encode(text, add_special_tokens=False)


def test_preprocess_rm_writes_groups_as_documents(rm_prefix, qwen):
    prefix, stats = rm_prefix
    counts = raw_label_counts()
    mixed = sum(0 < c < n for c, n in counts)
    assert (stats["groups_read"], stats["groups"], stats["responses"]) == (len(counts), mixed, 4 * mixed)
    assert stats["dropped"] == {"all_correct": sum(c == n for c, n in counts),
                                "all_wrong": sum(c == 0 for c, _ in counts)}
    groups = RMGroupDataset(prefix)
    assert len(groups) == 10
    for index in range(len(groups)):
        group = groups.group(index)
        assert len(group.responses) == 4 and 1 <= group.labels.sum() <= 3
        assert all(ends_at_the_score_token(r, qwen) for r in group.responses)


def test_packed_rm_batches_keep_groups_whole_and_point_at_score_tokens(rm_prefix, qwen):
    prefix, _ = rm_prefix
    groups = RMGroupDataset(prefix)
    budget = int(groups.data.group_token_counts.max()) + 500
    packed = PackedRMDataset(groups, budget)
    assert sorted(np.concatenate(packed.bins).tolist()) == list(range(len(groups)))
    for index in range(len(packed)):
        batch = collate_rm_packed([packed[index]], pad_id=qwen.pad_or_eos_id, total_length=budget)
        tokens = batch["tokens"][0]
        assert all(ends_at_the_score_token(tokens[: int(end) + 1], qwen) for end in batch["score_index"])
        members = [groups.group(int(g)) for g in packed.bins[index]]
        assert batch["group_sizes"].tolist() == [len(g.responses) for g in members]
        assert batch["labels"].tolist() == np.concatenate([g.labels for g in members]).tolist()
        cu = batch["cu_seqlens"]
        assert int(cu[-1]) == budget and (batch["score_index"] == cu[1:len(batch["labels"]) + 1] - 1).all()
        assert batch["num_tokens"] == sum(len(r) for g in members for r in g.responses) <= budget


def test_padded_rm_batch_and_dataloader(rm_prefix, qwen):
    prefix, _ = rm_prefix
    groups = RMGroupDataset(prefix)
    seq_length = int(groups.data.tokens.sequence_lengths.max())
    batch = collate_rm_padded([groups[0], groups[1]], pad_id=qwen.pad_or_eos_id, seq_length=seq_length)
    assert batch["tokens"].shape == (8, seq_length) and batch["group_sizes"].tolist() == [4, 4]
    assert batch["num_tokens"] == sum(len(r) for g in (groups[0], groups[1]) for s in g for r in s.responses)
    rows = np.arange(8)
    assert all(ends_at_the_score_token(batch["tokens"][row, : int(end) + 1], qwen)
               for row, end in zip(rows, batch["score_index"]))
    loader = build_rm_dataloader(prefix, qwen.pad_or_eos_id, global_batch_size=2, micro_batch_size=1,
                                 packed_tokens=int(groups.data.group_token_counts.max()))
    micro_batches = list(itertools.islice(loader, 4))
    for micro_batch in micro_batches:
        assert int(micro_batch["group_sizes"].sum()) == len(micro_batch["labels"]) == len(micro_batch["score_index"])
        assert micro_batch["group_sizes"].tolist() == [4] * len(micro_batch["group_sizes"])
    # The recipes' default data.num_workers=2 delivers the same micro-batches.
    with_workers = build_rm_dataloader(prefix, qwen.pad_or_eos_id, global_batch_size=2, micro_batch_size=1,
                                       packed_tokens=int(groups.data.group_token_counts.max()), num_workers=2)
    for original, again in zip(micro_batches, itertools.islice(with_workers, 4), strict=True):
        assert original.keys() == again.keys()
        assert all(torch.equal(torch.as_tensor(original[key]), torch.as_tensor(again[key])) for key in original)
    with pytest.raises(ValueError, match="exactly one"):
        build_rm_dataloader(prefix, 0, 2, 1)
    # Groups or responses that cannot fit are refused when the loader is built, counted, with the fix.
    longest = int(groups.data.tokens.sequence_lengths.max())
    too_long = int((groups.data.tokens.sequence_lengths > longest - 1).sum())
    with pytest.raises(ValueError, match=rf"{too_long} responses have more than {longest - 1} tokens \(longest "
                                         rf"{longest}\); raise data.seq_length"):
        build_rm_dataloader(prefix, 0, 2, 1, seq_length=longest - 1)
    biggest = int(groups.data.group_token_counts.max())
    with pytest.raises(ValueError, match=rf"1 groups hold more than {biggest - 1} tokens"):
        build_rm_dataloader(prefix, 0, 2, 1, packed_tokens=biggest - 1)


def test_fixed_row_padded_batches_top_up_with_unscored_rows(rm_prefix, qwen):
    """Under pipeline parallelism every padded micro-batch needs one shape: a two-response group gets two rows of
    padding after its responses, which score_index and labels leave out."""
    prefix, _ = rm_prefix
    groups = RMGroupDataset(prefix)
    assert groups.data.max_group_size == 4
    full = groups.group(0)
    short = RMGroupSample(full.responses[:2], full.labels[:2])
    width = max(len(r) for r in full.responses)
    batch = collate_rm_padded([[short]], pad_id=qwen.pad_or_eos_id, seq_length=width, num_rows=4)
    alone = collate_rm_padded([[short]], pad_id=qwen.pad_or_eos_id, seq_length=width)
    assert batch["tokens"].shape == (4, width) and alone["tokens"].shape == (2, width)
    assert torch.equal(batch["tokens"][:2], alone["tokens"]) and (batch["tokens"][2:] == qwen.pad_or_eos_id).all()
    for key in ("score_index", "labels", "group_sizes"):
        assert torch.equal(batch[key], alone[key]), key
    assert batch["num_tokens"] == alone["num_tokens"] == sum(len(r) for r in short.responses)  # fillers not counted
    with pytest.raises(ValueError, match="4 responses do not fit a padded micro-batch of 3 rows"):
        collate_rm_padded([[full]], pad_id=0, seq_length=width, num_rows=3)
    seq_length = int(groups.data.tokens.sequence_lengths.max())
    loader = build_rm_dataloader(prefix, qwen.pad_or_eos_id, global_batch_size=4, micro_batch_size=2,
                                 seq_length=seq_length, fixed_rows=True)
    assert {tuple(mb["tokens"].shape) for mb in itertools.islice(loader, 4)} == {(8, seq_length)}


def test_preprocess_rm_max_length_drops_whole_groups(tmp_path, qwen):
    stats = preprocess_rm(RMPreprocessConfig(inputs=[MATH_COT], output_prefix=str(tmp_path / "short"),
                                             tokenizer=QWEN, max_length=600), qwen)
    assert stats["dropped"]["too_long"] + stats["groups"] == 10
    assert stats["dropped"]["too_long"] > 0


def test_a_group_whose_longest_response_is_exactly_max_length_is_kept(tmp_path, qwen):
    from acemath_mcore.data.indexed import RMIndexedDataset

    everything = preprocess_rm(RMPreprocessConfig(inputs=[MATH_COT], output_prefix=str(tmp_path / "all"),
                                                  tokenizer=QWEN), qwen)
    written = RMIndexedDataset(str(tmp_path / "all"))
    longest = [max(len(sequence) for sequence in written.group(index)[0]) for index in range(len(written))]
    limit = max(longest)
    at_limit = preprocess_rm(RMPreprocessConfig(inputs=[MATH_COT], output_prefix=str(tmp_path / "at"),
                                                tokenizer=QWEN, max_length=limit), qwen)
    assert at_limit["groups"] == everything["groups"] and "too_long" not in at_limit["dropped"]
    below = preprocess_rm(RMPreprocessConfig(inputs=[MATH_COT], output_prefix=str(tmp_path / "below"),
                                             tokenizer=QWEN, max_length=limit - 1), qwen)
    assert below["dropped"]["too_long"] == longest.count(limit)
    assert below["groups"] == everything["groups"] - longest.count(limit)


def test_scoring_keeps_empty_candidates_and_rejects_non_text():
    from acemath_mcore.data.rm_data import encode_rm_group
    from acemath_mcore.training.reward import candidate_group

    group = candidate_group({"question": "What is 2 + 2?", "code": ["4", ""]}, "cands.jsonl:3")
    tokenizer = load_tokenizer(shared_path("tokenizers/qwen2"))
    encoder = ConversationEncoder(tokenizer, build_template("chatml", tokenizer))
    with_answer, empty = encode_rm_group(encoder, group)
    assert ends_at_the_score_token(empty, tokenizer) and len(empty) == len(with_answer) - 1  # scored like any
    with pytest.raises(DataError, match="cands.jsonl:3.*response 1 is not a string"):
        candidate_group({"question": "What is 2 + 2?", "code": ["4", None]}, "cands.jsonl:3")


def test_preprocess_cli_renders_the_acemath_rm_system_prompt_preset(tmp_path, qwen):
    """``--system-prompt acemath_rm`` is AceMath-RM's scoring prompt for groups that bring no system turn; a group's
    own system turn wins."""
    import subprocess
    import sys
    from pathlib import Path

    data = write_jsonl(tmp_path / "rm.jsonl", [
        {"prompt": "1+1?", "responses": ["2", "3"], "labels": [1, 0]},
        {"prompt": "2+2?", "system": "Be brief.", "responses": ["4", "5"], "labels": [1, 0]},
    ])
    launcher = Path(__file__).resolve().parents[1] / "launch" / "preprocess.py"
    done = subprocess.run([sys.executable, str(launcher), "rm", "--input", data, "--output", str(tmp_path / "rm"),
                           "--tokenizer", QWEN, "--system-prompt", "acemath_rm"], check=True,
                          capture_output=True, text=True)
    # Groups of 2 are not the paper's 6: said, with the option that selects 6 (here there are not 6 to select).
    assert json.loads(done.stdout)["group_sizes"] == {"2": 2}
    assert done.stderr.strip().splitlines()[-1] == (
        "note: every problem kept all its candidates (group sizes {'2': 2}); AceMath-RM trains on 6 per problem, "
        "k right and 6-k wrong: --num-responses 6 selects them by score")
    groups = RMGroupDataset(str(tmp_path / "rm"))
    texts = [qwen.decode(groups.group(index).responses[0].tolist()) for index in range(2)]
    assert texts[0].startswith("<|im_start|>system\nPlease reason step by step, and check your final answer within "
                               "\\boxed{}.<|im_end|>\n<|im_start|>user\n1+1?")
    assert texts[1].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?")


def test_a_missing_rm_prefix_is_named_with_the_command_that_writes_it(tmp_path):
    from acemath_mcore.data.indexed import RMIndexedDataset

    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/rm.bin is missing; preprocess with launch/preprocess.py rm"):
        RMIndexedDataset(tmp_path / "rm")


@pytest.mark.parametrize("packed", [False, True])
def test_rm_training_data_resumes_after_the_saved_sample_count(rm_prefix, packed):
    """A requeued RM job rebuilds its loaders from the checkpoint's consumed_samples: each data-parallel rank must
    continue with the micro-batches an uninterrupted run would have given it next, not replay the first ones."""
    from acemath_mcore.recipes import apply_overrides, get_recipe
    from acemath_mcore.training.reward import rm_training_data

    prefix, _ = rm_prefix
    config = apply_overrides(get_recipe("tiny_rm"), [
        f"data.prefixes=[{prefix}]", f"data.packed={str(packed).lower()}", "data.seq_length=8192",
        "global_batch_size=4", "micro_batch_size=1", "data.num_workers=0"])
    data = rm_training_data(config)
    for dp_rank in (0, 1):
        stream = data.make_loader(0, dp_rank, 2)
        uninterrupted = [next(stream) for _ in range(10)]  # 5 steps of 2 micro-batches on each of 2 ranks
        resumed = data.make_loader(3 * 4, dp_rank, 2)  # saved after step 3: 12 samples consumed
        for original, again in zip(uninterrupted[6:], [next(resumed) for _ in range(4)]):
            assert original.keys() == again.keys()
            assert all(torch.equal(original[key], again[key]) for key in original
                       if isinstance(original[key], torch.Tensor))
        # Replaying from the start would be told apart: the first steps differ from those resumed.
        assert any(not torch.equal(first["tokens"], later["tokens"])
                   for first, later in zip(uninterrupted[:4], uninterrupted[6:]))


def test_every_dropped_group_is_listed_in_the_drop_log(rm_prefix):
    """As for SFT data: the stats count the drops and keep five examples each, the drop log lists all of them."""
    from collections import Counter

    from acemath_mcore.data.jsonl import dropped_path

    prefix, stats = rm_prefix
    logged = [json.loads(line) for line in dropped_path(prefix).read_text().splitlines()]
    assert len(logged) == stats["dropped_total"] > 0
    assert Counter(entry["reason"] for entry in logged) == Counter(stats["dropped"])
    assert [f"{entry['where']}: {entry['detail']}" for entry in logged if entry["reason"] == "all_correct"][:5] == \
        stats["drop_examples"]["all_correct"]
    assert not dropped_path(prefix).with_name(dropped_path(prefix).name + ".partial").exists()


def test_rm_preprocessing_creates_the_output_directory(tmp_path):
    """`--output data/rm` on a fresh checkout: the drop log opened first must not need the directory to exist."""
    data = write_jsonl(tmp_path / "rm.jsonl", [rm_row(1, "1+1?", "2", 1), rm_row(1, "1+1?", "3", 0)])
    prefix = tmp_path / "not" / "yet" / "rm"
    stats = preprocess_rm(RMPreprocessConfig(inputs=[data], output_prefix=str(prefix),
                                             tokenizer=QWEN, template="chatml"))
    assert stats["groups"] == 1 and (tmp_path / "not" / "yet" / "rm.bin").is_file()
