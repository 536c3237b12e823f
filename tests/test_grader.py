"""Grader: extraction, normalisation, equivalence, timeouts, and agreement with the Qwen2.5-Math reference labels."""

import json
import time

import pytest

from shared_data import shared_path

from acemath_mcore.eval.grader import extract_answer, extract_choice, is_equal, last_boxed_content, normalize_answer



@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{\sqrt{2}}} done", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1} then \boxed{\{1, 2\}}.", "{1,2}"),
        (r"\fbox{42}", "42"),
        (r"the value is \boxed 7$ here", "7"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("So the answer is 12.", "12"),
        ("Thus the answer is: 3,250 apples.", "3,250"),
        ("We get 5 and then 17 apples", "17"),
        (r"truncated \boxed{12", "12"),
        ("no answer at all", ""),
        (r"\boxed{x = 3}", "3"),
        (r"\boxed{50\%}", "50%"),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{5\text{ cm}^2}", "5"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text, "math") == expected


def test_last_boxed_keeps_nested_braces():
    matrix = r"\begin{pmatrix} 1 \\ {2} \end{pmatrix}"
    assert last_boxed_content(rf"\boxed{{{matrix}}} and more") == matrix
    assert last_boxed_content("no box") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The answer is $\boxed{(B)}$", "B"),
        (r"\boxed{\text{C}}", "C"),
        (r"\boxed{D. 42 N}", "D"),
        ("A frameshift is a shift ... Answer: D", "D"),
        ("A is wrong because of X, so (B) is right", "B"),
        ("The answer is C.", "C"),
        ("I am not sure.", ""),
        (r"\boxed{b}", "B"),  # a lone lower-case letter, upper-cased as the toolkit does
        (r"\boxed{\text{(c)}}", "C"),
        (r"\boxed{a car}", ""),  # a word is not a choice
    ],
)
def test_extract_choice_letters(text, expected):
    assert extract_choice(text) == expected
    assert extract_answer(text, "mmlu_stem") == expected


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac12", r"\frac{1}{2}"),
        (r"\cfrac{25}{16}", "1.5625"),
        ("1/2", r"\tfrac{1}{2}"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"\frac{\sqrt{2}}{2}", "0.7071"),
        (r"\frac{1}{3}", "0.3333"),
        (r"2\frac{1}{3}", r"\frac{7}{3}"),
        (r"\sqrt{12}", r"2\sqrt{3}"),
        (r"\sqrt[3]{8}", "2"),
        (r"\pi", "3.14159"),
        (r"2\pi", r"\pi \cdot 2"),
        ("50\\%", "0.5"),
        ("50%", "50"),
        (r"10\%", "0.1"),
        ("900,000,000", "900000000"),
        (r"10{,}000", "10000"),
        (r"\$32,\!348", "32348"),
        ("27.0", "27"),
        (r"[2, 5)", r"\left[2,5\right)"),
        (r"(-\infty, -3) \cup (3, \infty)", r"(3,\infty)\cup(-\infty,-3)"),
        (r"\{1, 2, 3\}", r"\{3,2,1\}"),
        ("1, 2", "2,1"),
        (r"\left( \frac{4}{3}, -\frac{1}{3} \right)", r"(\frac43,-\frac13)"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{bmatrix}1\\2\end{bmatrix}"),
        (r"\begin{pmatrix} 1/2 & 0 \\ 0 & 1 \end{pmatrix}", r"\begin{pmatrix} 0.5 & 0 \\ 0 & 1 \end{pmatrix}"),
        (r"\begin{pmatrix} 1/2 \\ 2 \end{pmatrix}", r"\left(\frac{1}{2}, 2\right)"),
        ("x=3", "3"),
        ("k = 15", "15"),
        ("y = 2x + 3", "2x+3"),
        ("x^2+y^2=1", "y^2+x^2=1"),
        ("2x+2y=2", "x+y=1"),
        (r"x \in [-2,7]", "[-2,7]"),
        (r"5\text{ cm}^2", "5"),
        ("10 inches", "10"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", r"30"),
        ("x^2+2x+1", "(x+1)^2"),
        ("3+4i", "4i+3"),
        (r"\sin^2 x + \cos^2 x", "1"),
        (r"\log_2 8", "3"),
        (r"\binom{5}{2}", "10"),
        (r"\text{(C)}", "C"),
        (r"\text{Devon}", "Devon"),
        (r"\text{A,C,F}", "A, C, F"),
        (r"\emptyset", r"\{\}"),
        ("two", "2"),
        (r"4.5\times10^{33}", "4.5e33"),  # Minerva's scientific-notation golds, written in LaTeX by the model
        ("6.67e-11", r"6.67 \times 10^{-11}"),
        (r"-\frac{1}{3}", "-1./3"),  # Minerva's trailing-dot golds
        ("-0.333333", "-1./3"),
        ("-1/3", "-1./3"),  # through the LaTeX parser as well
        (r"2^{14}", "16384"),
        (r"1-\sqrt{19}, 1+\sqrt{19}", r"1 \pm \sqrt{19}"),  # a \pm gold is both values (43 golds in the sets)
        (r"\{1+\sqrt5,1-\sqrt5,-2\}", r"\{1\pm\sqrt5,-2\}"),
        ("3, -3", r"\pm 3"),
    ],
)
def test_equivalent_answers(pred, gold):
    assert is_equal(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("0.5", "50"),  # no percent sign on either side: a hundredfold difference is a different answer
        ("9999", "10000"),  # an integer gold needs the exact integer, tolerance or not
        (r"2^{14}", "16385"),  # ... also when the prediction is an expression (the symbolic path)
        (r"10^{4}", "10001"),
        (r"1+\sqrt{19}", r"1 \pm \sqrt{19}"),  # one of the two values is not the answer
        (".e2", "100"),  # an exponent without a mantissa is not a number (and must not raise)
        (r"3\pmod{7}", "3, -3"),  # \pmod is not \pm
        (r"\frac{69999}{7}", "10000"),
        ("0.333", r"\frac13"),
        (r"\frac{3}{8}", r"\frac{5}{16}"),
        (r"1\frac{1}{10}", r"1\frac{1}{9}"),
        (r"\sqrt{34}+3\sqrt{10}", "28"),
        (r"\frac{1}{2005!}", r"\frac{1}{2004!}"),
        ("[2, 5)", "(2,5)"),
        ("(1,2)", "(2,1)"),
        ("(1,2)", "1,2"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 5 \end{pmatrix}"),
        (r"-\infty", r"\infty"),
        ("odd", "even"),
        ("AB", "BA"),
        ("x^2+1", "x^2+2"),
        ("5", ""),
        ("", ""),
        (None, "1"),
    ],
)
def test_different_answers(pred, gold):
    assert not is_equal(pred, gold)


@pytest.mark.parametrize("pred, expected", [
    ("C", True), ("(C)", True), ("(C) 2", True), ("C: 2", True), ("C.2", True), ("c", True), (r"\text{C}", True),
    ("B", False), ("2", False), ("", False), ("A or C", False), ("(C) or (D)", False),
])
def test_choice_letter_gold_is_matched_by_the_chosen_letter(pred, expected):
    """GaoKao-2023-En has letter golds (46 of 385): a boxed "(C) 2" chooses C; a hedge chooses nothing."""
    assert is_equal(pred, "C") is expected


@pytest.mark.parametrize("pred, gold, expected", [
    (r"(H)\ \frac{1}{2}", "H", True), ("(F) y+k=0", "F", True), ("K: (1, 2)", "K", True), ("(G) 3", "F", False),
    ("(F) or (G)", "F", False),
])
def test_act_style_choice_letters_f_to_k(pred, gold, expected):
    """GaoKao-2023-En's 9 ACT-style items use F-K; an option's text may hold letters of its own."""
    assert is_equal(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("2^10", "1024", True), ("2^10", "0", False), ("x^10", "0", False), ("3^20", "3^{20}", True),
    ("x^12+1", "2x+1", False),
    ("b=2, a=1", "a=1, b=2", True), (r"a=\frac{1}{2}, b=2", "a=0.5, b=2", True), ("a=2, b=1", "a=1, b=2", False),
    ("x=3, y=-1", "x=-1, y=3", False), ("1, 2", "a=1, b=2", False), ("x=2, x=-6", "-6, 2", True),
    (r"4.5001\times10^{33}", "4.5e33", True), (r"4.6\times10^{33}", "4.5e33", False), ("10001", "10000", False),
    ("6.608", r"6.608 \mathrm{mi} / \mathrm{hr}", True), (r"2450\pi", r"2450\pi \mathrm{N}-\mathrm{m}", True),
    ("5", r"5 \mathrm{m} \cdot \mathrm{s}^{-2}", True), (r"3+4\mathrm{i}", "3+4", False),
    (r"3+4\mathrm{i}", "3+4i", True),
    (r"2^{3}3^{2}", "72", True), ("2^3 3^2", "72", True), (r"x^{2}3", "3x^2", True), ("x^23", "x^{23}", True),
    ("100,200", "200,100", False), ("9,999", "10,000", False),
])
def test_exponents_named_values_units_and_grouped_digits(pred, gold, expected):
    """Wrong answers the grader once passed (2^10 read as 2^1 times 0; the names of several variables dropped, so
    swapped values matched; \\mathrm{i} stripped as a unit) and right ones it failed (a rounded gold in scientific
    notation held to the exact integer; compound units left half in the gold). A braced or spaced exponent still
    ends where it is written (2^{3}3^{2} is 72)."""
    assert is_equal(pred, gold) is expected


@pytest.mark.parametrize("answer, expected", [
    ("2.50", "2.5"), ("3.250", "3.25"), ("10.0", "10"), ("0.5000", "0.5"), ("1.05", "1.05"), ("1.050", "1.05"),
    ("\\frac{1.50}{2}", "\\frac{1.5}{2}"), ("(0.10,2.0)", "(0.1,2)"), ("100", "100"), ("2.05", "2.05"),
    (".50", "0.5"), ("-.50", "-0.5"), ("0.50", "0.5"),
    # not a decimal number ending in zeros: left as written
    ("1.20.3", "1.20.3"), ("192.168.10.10", "192.168.10.10"), ("0.10\\overline{6}", "0.10\\overline{6}"),
    ("0.0\\overline{3}", "0.0\\overline{3}"), ("0.10(6)", "0.10(6)"), ("0.10\\dot{6}", "0.10\\dot{6}"),
])
def test_trailing_decimal_zeros_go_so_equal_numbers_are_one_vote(answer, expected):
    """maj@k groups answers by their normalised text: 2.50 and 2.5 must be the same vote; a repeating decimal or a
    dotted version keeps its zeros, and normalising again changes nothing."""
    assert normalize_answer(answer) == expected
    assert normalize_answer(expected) == expected


def test_a_repeating_decimal_is_not_another_one_without_its_zero():
    assert not is_equal("0.10\\overline{6}", "0.1\\overline{6}")


def test_normalisation_is_idempotent_on_math_golds():
    """Extracted answers are already normalised; grading them again must not change them."""
    from acemath_mcore.eval.benchmarks import load_benchmark

    problems, _ = load_benchmark("math", shared_path("data/eval"))
    changed = [p.gold for p in problems if normalize_answer(normalize_answer(p.gold)) != normalize_answer(p.gold)]
    assert changed == []


def test_pathological_input_times_out_and_grader_recovers():
    # A C-level big-integer power that would run for ages: no signal interrupts it, only killing the worker does.
    # The bound is 20x the budget, loose enough for a loaded machine, finite where the power is not.
    start = time.monotonic()
    assert not is_equal(r"9^{9^{9^{9}}}", r"9^{9^{9^{9}}}+1", timeout=0.5)
    assert time.monotonic() - start < 10.0
    assert is_equal(r"\sqrt{4}+x", "x+2")  # the killed worker is replaced transparently


def test_timeout_bounds_the_whole_comparison_not_each_item():
    """A 12-tuple of endless powers: a per-item budget of 0.5 s would take 6 s before giving up, the whole
    comparison's budget gives up after 0.5 s. Independent of machine speed: no item ever finishes."""
    endless = "(" + ",".join(rf"9^{{9^{{9^{{{9 + i}}}}}}}" for i in range(12)) + ")"
    gold = "(" + ",".join(["1"] * 12) + ")"
    start = time.monotonic()
    assert not is_equal(endless, gold, timeout=0.5)
    assert time.monotonic() - start < 4.0
    identities = "(" + ",".join(rf"\sin^2 a_{{{i}}}+\cos^2 a_{{{i}}}" for i in range(12)) + ")"
    assert is_equal(identities, gold, timeout=60)  # the same shape of comparison succeeds with time to do it


def test_agreement_with_reference_labels_on_800_responses():
    """Our extraction + equivalence vs the Qwen2.5-Math labels of math_cot_100.jsonl (100 problems x 8 responses)."""
    rows = [json.loads(line) for line in shared_path("data/rm/math_cot_100.jsonl").read_text().splitlines()]
    total, disagreements = 0, []
    for row in rows:
        for response, reference_pred, reference_label in zip(row["code"], row["pred"], row["score"]):
            ours = extract_answer(response, "math")
            verdict = is_equal(ours, row["gt"])
            total += 1
            if verdict != reference_label:
                disagreements.append((row["idx"], row["gt"], ours, verdict, reference_pred, reference_label))
    for idx, gold, ours, verdict, reference_pred, reference_label in disagreements:
        print(f"disagree idx={idx} gold={gold!r}: ours {ours!r} -> {verdict}, "
              f"reference {reference_pred!r} -> {reference_label}")
    agreement = 100.0 * (total - len(disagreements)) / total
    print(f"agreement {agreement:.3f}% on {total} responses")
    assert total == 800
    assert agreement >= 99.5
