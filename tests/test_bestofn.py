"""Best-of-n metrics: the dataset README's reference numbers, hand-computed cases, and the CLI end to end."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared_data import shared_path

from acemath_mcore.eval.bestofn import (
    Record,
    RecordError,
    evaluate,
    format_table,
    NO_ANSWER,
    group_answers,
    k_ladder,
    main,
    metrics_at_k,
    read_records,
)
from acemath_mcore.eval.grader import is_equal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def math_cot_100() -> Path:
    return shared_path("data/rm/math_cot_100.jsonl")


def test_reference_numbers_with_the_datasets_own_labels(math_cot_100):
    """rm@8 / maj@8 / pass@8 published with math_cot_100.jsonl (its pred_score, score, and pred strings)."""
    metrics = metrics_at_k(read_records(math_cot_100), k=8)
    assert metrics == {"rm@8": 94.0, "maj@8": 93.0, "pass@8": 96.0}


def test_our_grader_labels_and_equivalence_groups_stay_within_one_point(math_cot_100):
    records = read_records(math_cot_100, regrade=True, group_by_equivalence=True)
    metrics = metrics_at_k(records, k=8)
    for name, reference in {"rm@8": 94.0, "maj@8": 93.0, "pass@8": 96.0}.items():
        assert abs(metrics[name] - reference) <= 1.0, (name, metrics[name])


# Two hand-made problems with n = 4 candidates.
#   A: correct F T T F, rm 0.5 0.9 0.9 0.1 (tie between #1 and #2), answers 1 2 2 1 (2-2 vote tie).
#   B: every candidate wrong.
PROBLEM_A = Record(correct=(False, True, True, False), rm_scores=(0.5, 0.9, 0.9, 0.1), answer_groups=(0, 1, 1, 0))
PROBLEM_B = Record(correct=(False,) * 4, rm_scores=(0.3, 0.2, 0.1, 0.0), answer_groups=(0, 1, 2, 3))


def test_hand_computed_k_equals_n_with_tie_breaks():
    # A: rm picks #1 (first of the tied maxima) -> correct; maj: groups {1: #0,#3} and {2: #1,#2} tie 2-2, the group
    # whose first member comes first is answer 1 -> wrong; pass -> correct.  B: all wrong.
    assert metrics_at_k([PROBLEM_A, PROBLEM_B], k=4) == {"rm@4": 50.0, "maj@4": 0.0, "pass@4": 50.0}


def test_hand_computed_k_equals_two_matches_the_exact_expectation():
    # A's six ordered pairs:            rm   maj  pass
    #   (#0,#1) ans 1,2 tie -> #0       T    F    T
    #   (#0,#2) ans 1,2 tie -> #0       T    F    T
    #   (#0,#3) both answer 1, rm #0    F    F    F
    #   (#1,#2) both answer 2, rm #1    T    T    T
    #   (#1,#3) ans 2,1 tie -> #1       T    T    T
    #   (#2,#3) ans 2,1 tie -> #2       T    T    T
    # so A scores 5/6, 3/6, 5/6 and B scores 0: expectations 41.67, 25.00, 41.67.
    metrics = metrics_at_k([PROBLEM_A, PROBLEM_B], k=2, seeds=3000)
    expected = {"rm@2": 250 / 6, "maj@2": 25.0, "pass@2": 250 / 6}
    for name, value in expected.items():
        assert abs(metrics[name] - value) < 1.5, (name, metrics[name], value)
    assert metrics_at_k([PROBLEM_A, PROBLEM_B], k=2, seeds=50) == metrics_at_k([PROBLEM_A, PROBLEM_B], k=2, seeds=50)


def test_every_subset_keeps_original_order_for_tie_breaks():
    """Enumerating all 2-subsets by hand equals the sampler's long-run average, so draws are kept in file order."""
    record = Record(correct=(True, False, False), rm_scores=(1.0, 1.0, 1.0), answer_groups=(0, 1, 2))
    # All scores and votes tie, so both rules pick the earliest drawn candidate: correct only when #0 is drawn.
    exact = 100.0 * sum(0 in pair for pair in itertools.combinations(range(3), 2)) / 3
    metrics = metrics_at_k([record], k=2, seeds=3000)
    assert abs(metrics["rm@2"] - exact) < 2.0 and abs(metrics["maj@2"] - exact) < 2.0


def test_metrics_without_scores_or_answers_are_left_out():
    record = Record(correct=(True, False), rm_scores=None, answer_groups=None)
    assert metrics_at_k([record], k=2) == {"pass@2": 100.0}


def test_group_answers_exact_and_by_equivalence():
    answers = ["1/2", "0.5", r"\frac{1}{2}", "2", "0.5"]
    assert group_answers(answers) == (0, 1, 2, 3, 1)
    assert group_answers(answers, is_equal) == (0, 0, 0, 1, 0)


def test_candidates_without_an_answer_do_not_vote():
    # Three cut-off responses (no answer) and one right answer: the right answer is the only vote. A draw of only
    # answerless candidates has no majority, so it counts as wrong even where the record marks one correct.
    answers = ["", "  ", "42", ""]
    assert group_answers(answers) == (NO_ANSWER, NO_ANSWER, 0, NO_ANSWER)
    record = Record(correct=(False, True, True, False), rm_scores=None, answer_groups=group_answers(answers))
    assert metrics_at_k([record], k=4)["maj@4"] == 100.0
    # k=2: 6 equally likely pairs; 3 hold candidate 2 (the vote: right), 3 do not (no vote: wrong), so 50%.
    assert abs(metrics_at_k([record], k=2, seeds=4000)["maj@2"] - 50.0) < 3.0
    assert metrics_at_k([Record(correct=(True,), rm_scores=None, answer_groups=(NO_ANSWER,))], k=1)["maj@1"] == 0.0


def test_k_ladder_and_table():
    assert k_ladder(8) == [1, 2, 4, 8]
    assert k_ladder(6) == [1, 2, 4, 6]
    metrics = evaluate([PROBLEM_A, PROBLEM_B], k_max=4, seeds=10)
    table = format_table(metrics, k_ladder(4))
    assert table.splitlines()[0] == "| k | rm@k | maj@k | pass@k |"
    assert table.splitlines()[-1] == "| 4 | 50.00 | 0.00 | 50.00 |"


def test_record_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"score": [True, False], "pred_score": [[0.1], [0.2]], "pred": ["1", "2"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "pred_score": [0.1]}) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:2:pred_score: expected 2 entries"):
        read_records(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(RecordError, match=rf"{path}:2: malformed JSON"):
        read_records(path)
    path.write_text(json.dumps({**good, "pred_score": ["high", 0.2]}) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:1:pred_score: expected a finite number"):
        read_records(path)
    path.write_text(json.dumps({**good, "pred_score": [[float("nan")], [0.2]]}) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:1:pred_score: expected a finite number or \[number\], got nan"):
        read_records(path)
    path.write_text(json.dumps(good) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:1:score: k=4 but the record has only 2 candidates"):
        metrics_at_k(read_records(path), k=4)


def test_cli_end_to_end_writes_json_and_png(math_cot_100, tmp_path):
    out_json, out_png = tmp_path / "metrics" / "bestofn.json", tmp_path / "plots" / "bestofn.png"  # new folders
    command = [sys.executable, str(REPO / "launch" / "bestofn.py"), "--input", str(math_cot_100), "--k", "8",
               "--seeds", "20", "--json", str(out_json), "--plot", str(out_png), "--table"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "| 8 | 94.00 | 93.00 | 96.00 |" in result.stdout
    assert "k=8:" in result.stderr  # progress goes to stderr
    summary = json.loads(out_json.read_text())
    assert (summary["rm@8"], summary["maj@8"], summary["pass@8"]) == (94.0, 93.0, 96.0)
    assert {f"{metric}@{k}" for metric in ("rm", "maj", "pass") for k in (1, 2, 4, 8)} <= set(summary)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_k_defaults_to_the_candidates_count(math_cot_100, tmp_path, capsys):
    """bestofn.sh on CANDIDATES made elsewhere passes no --k: the table still goes up to the n sampled (it
    stopped at k=1)."""
    assert main(["--input", str(math_cot_100), "--seeds", "20", "--table"]) == 0
    out, err = capsys.readouterr()
    assert "| 8 | 94.00 | 93.00 | 96.00 |" in out and "k up to 8, the fewest candidates of a record" in err


def test_cli_reports_bad_input_with_location(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"score": [True, "yes"]}) + "\n")
    assert main(["--input", str(path), "--k", "2"]) == 2
    assert f"{path}:1:score: expected booleans" in capsys.readouterr().err


def test_cli_refuses_an_unknown_benchmark(capsys):
    from acemath_mcore.eval.bestofn import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--input", "x.jsonl", "--k", "8", "--regrade", "--benchmark", "mathh"])
    assert "argument --benchmark: invalid choice: 'mathh'" in capsys.readouterr().err
    assert build_parser().parse_args(["--input", "x.jsonl", "--k", "8", "--benchmark", "mmlu_stem"]).benchmark == \
        "mmlu_stem"


@pytest.mark.parametrize("args, message", [
    (["--input", "x.jsonl", "--k", "8", "--regrade", "--benchmarks", "gsm8k"],
     "--benchmarks goes with --summarize DIR (the regrading rules of --input's benchmark are --benchmark NAME)"),
    (["--input", "x.jsonl", "--k", "8", "--if-complete"], "--if-complete goes with --summarize DIR"),
    (["--summarize", "out", "--benchmarks", "math", "--k", "8", "--benchmark", "gsm8k"],
     "--k, --benchmark score an --input file; --summarize only tabulates"),
])
def test_cli_refuses_an_option_of_the_other_mode(args, message, capsys):
    """Scoring a file and tabulating finished results take different options; one given to the wrong mode used to
    be ignored (a --benchmarks typo regraded with the MATH rules)."""
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_summarize_tabulates_benchmarks_at_k_equal_n_and_waits_for_missing_ones(math_cot_100, tmp_path, capsys):
    """The Slurm best-of-n array writes one <benchmark>.bestofn.json per task; --summarize lays them side by side
    (pass@1, and maj / rm / pass over all n candidates) with their mean, once every named benchmark is there."""
    half = tmp_path / "half.jsonl"
    half.write_text("".join(math_cot_100.read_text().splitlines(keepends=True)[:50]))
    expected_half = evaluate(read_records(half), 8, seeds=5)
    arguments = ["--summarize", str(tmp_path), "--benchmarks", "math,gsm8k"]
    assert main(["--input", str(math_cot_100), "--k", "8", "--seeds", "5", "--json", str(tmp_path / "math.bestofn.json")]) == 0
    assert main([*arguments, "--if-complete"]) == 0
    assert f"no table yet: no best-of-n results for gsm8k in {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "bestofn.md").exists()
    assert main(arguments) == 2 and "gsm8k.bestofn.json is missing" in capsys.readouterr().err

    assert main(["--input", str(half), "--k", "8", "--seeds", "5", "--json", str(tmp_path / "gsm8k.bestofn.json")]) == 0
    capsys.readouterr()
    assert main([*arguments, "--if-complete"]) == 0
    table = capsys.readouterr().out
    assert table == (tmp_path / "bestofn.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| benchmark | problems | n | pass@1 | maj@n | rm@n | pass@n |"
    full = json.loads((tmp_path / "math.bestofn.json").read_text())
    assert lines[2] == f"| math | 100 | 8 | {full['pass@1']:.2f} | 93.00 | 94.00 | 96.00 |"
    assert lines[3] == (f"| gsm8k | 50 | 8 | {expected_half['pass@1']:.2f} | {expected_half['maj@8']:.2f} | "
                        f"{expected_half['rm@8']:.2f} | {expected_half['pass@8']:.2f} |")
    summary = json.loads((tmp_path / "bestofn.json").read_text())
    assert summary["average"]["rm@n"] == pytest.approx((94.0 + expected_half["rm@8"]) / 2)
    assert lines[4].startswith(f"| **average** | | | **{summary['average']['pass@1']:.2f}** |")
