"""Final-answer extraction and equivalence for math benchmarks.

Best-of-n numbers and benchmark accuracies are only as good as the decision "is this answer the gold one?", so this
module follows the Qwen2.5-Math evaluation toolkit (the grader behind the AceMath paper's numbers) closely enough to
reproduce its correctness labels, with two deliberate differences:

* LaTeX is turned into sympy by a small parser of our own (`latex_to_sympy`), because sympy's own parser needs an
  exactly pinned antlr runtime and is slow; the subset covers what final answers use (fractions, roots, powers,
  trig/log functions, pi, infinity, implicit multiplication, equations).
* every sympy comparison runs in a forked worker process that is killed when it overruns its timeout.  Sympy can
  spend minutes inside C-level big-integer arithmetic (``9^{9^{9^9}}``) where no signal handler ever runs, so a
  killable process is the only timeout that always holds.  Cheap decisions (string and plain-number equality) never
  reach the worker, which keeps grading thousands of answers fast.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import threading
import time
from typing import NamedTuple

import sympy

DEFAULT_TIMEOUT_S = 3.0
RELATIVE_TOLERANCE = 1e-4
CHOICE_LETTERS = "ABCD"

# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_PHRASE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?", re.IGNORECASE)
_NUMBER_IN_TEXT = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_INLINE_MATH = re.compile(r"\$\$?(.+?)\$\$?|\\\((.+?)\\\)")


def matching_brace_end(text: str, open_index: int) -> int | None:
    """Index of the brace closing the one at `open_index`, or None when the text ends first (a truncated answer)."""
    depth = 0
    for index in range(open_index, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    return None


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (nested braces kept), or of a brace-less ``\\boxed 5``."""
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    position = matches[-1].end()
    while position < len(text) and text[position] == " ":
        position += 1
    if position < len(text) and text[position] == "{":
        end = matching_brace_end(text, position)
        return None if end is None else text[position + 1 : end]
    bare = re.match(r"[^\s$]+", text[position:])
    return bare.group(0) if bare else None


def _after_answer_phrase(text: str) -> str | None:
    """What follows the last "the answer is" / "final answer is" on its line; math inside $...$ wins over prose."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n")[0].strip()
    math_part = _INLINE_MATH.search(rest)
    if math_part:
        rest = math_part.group(1) or math_part.group(2)
    else:
        rest = re.split(r"\.(?:\s|$)", rest)[0]
    return rest.strip() or None


def extract_choice(text: str) -> str:
    """The multiple-choice letter a response commits to, or "" when it names none.

    The boxed content or the answer phrase is trusted first (its first letter is the choice, e.g. ``\\boxed{B. 42}``);
    only without those is the whole text searched, and then just for letters written as choices ("(C)", "C.",
    "Answer: C") so that an article like "A frameshift ..." is not taken for a choice.
    """
    committed = last_boxed_content(text)
    if committed is None:
        committed = _after_answer_phrase(text)
    if committed is not None:
        letter = re.search(rf"(?<![A-Za-z])([{CHOICE_LETTERS}])(?![A-Za-z])", committed)
        if letter:
            return letter.group(1)
        bare = re.sub(r"\\text|[^A-Za-z]", "", committed)
        if len(bare) == 1 and bare.upper() in CHOICE_LETTERS:  # \boxed{b}: a lone lower-case letter, as the toolkit
            return bare.upper()
    letter = f"([{CHOICE_LETTERS}])"
    written_as_choice = re.findall(rf"\({letter}\)|(?<![A-Za-z]){letter}[.):](?:\s|$)|(?i:answer):?\s*{letter}\b", text)
    if not written_as_choice:
        return ""
    return next(group for group in written_as_choice[-1] if group)


def extract_answer(text: str, benchmark: str = "math") -> str:
    """The normalised final answer of a model response (see `normalize_answer`); "" when none can be found.

    Order as in the Qwen2.5-Math toolkit: last boxed answer, then "the answer is ...", then the last number.
    For ``mmlu_stem`` the result is a choice letter.
    """
    if benchmark == "mmlu_stem":
        return extract_choice(text)
    answer = last_boxed_content(text)
    if answer is None:
        answer = _after_answer_phrase(text)
    if answer is None:
        numbers = _NUMBER_IN_TEXT.findall(text)
        answer = numbers[-1] if numbers else ""
    return normalize_answer(answer)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation (in the spirit of the toolkit's strip_string; idempotent, so normalised answers can be re-graded)
# ----------------------------------------------------------------------------------------------------------------

_UNIT_WORDS = (
    "units?|square units?|sq units?|cubic units?|degrees?|cents?|dollars?|percent|"
    "(?:square |sq |cubic )?(?:cm|mm|km|m|meters?|metres?|centimeters?|millimeters?|kilometers?|inches|inch|in|"
    "feet|foot|ft|yards?|yd|miles?|mi)|mph|km/h|hours?|hrs?|h|minutes?|mins?|seconds?|secs?|s|days?|weeks?|"
    "months?|years?|kg|grams?|g|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|L|gallons?|people|students|ways|"
    "times|marbles|cookies|apples|eggs|pages|points|books|cups"
)
_TRAILING_UNIT_WORD = re.compile(rf"^(.*?(?:[\d}})]|\\pi))\s+(?:{_UNIT_WORDS})(?:\^\{{?[23]\}}?|²|³)?\.?$")
# A trailing unit in text groups, compound ones too (``\mathrm{mi} / \mathrm{hr}``, ``\mathrm{N}-\mathrm{m}``,
# ``\mathrm{m} \cdot \mathrm{s}^{-2}``); never a lone ``\mathrm{i}`` or ``\mathrm{e}``, which are numbers.
_TEXT_UNIT = r"\\(?:text|mbox|mathrm|textnormal)\s*\{(?!\s*[ie]\s*\})(?=[^{}]*[A-Za-z])[^{}]*\}(?:\^\{?-?[123]\}?)?"
_TRAILING_TEXT_GROUP = re.compile(rf"^(.+?)\s*{_TEXT_UNIT}(?:\s*(?:/|-|\\cdot)?\s*{_TEXT_UNIT})*$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textnormal|mbox|mathrm|mathbf|mathit|operatorname)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_WORD_NUMBERS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_SHORT_VARIABLE = r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?|\d)?'?|[A-Za-z]\([A-Za-z]\)"


def _wrap_single_char_arguments(text: str, command: str, arity: int) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}`` and ``\\sqrt2`` -> ``\\sqrt{2}``, so equal answers are equal strings."""
    pieces = text.split(command)
    rebuilt = pieces[0]
    for piece in pieces[1:]:
        arguments = []
        rest = piece
        for _ in range(arity):
            if rest.startswith("{"):
                end = matching_brace_end(rest, 0)
                if end is None:
                    break
                arguments.append(rest[: end + 1])
                rest = rest[end + 1 :]
            elif rest and (rest[0].isalnum()):
                arguments.append("{" + rest[0] + "}")
                rest = rest[1:]
            else:
                break
        if len(arguments) == arity and (command != "\\sqrt" or not piece.startswith("[")):
            rebuilt += command + "".join(arguments) + rest
        else:
            rebuilt += command + piece
    return rebuilt


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on `separator` outside any (), [], {} nesting; intervals like ``[1,2)`` count as one nesting level."""
    parts, depth, start, index = [], 0, 0, 0
    while index < len(text):
        char = text[index]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(separator, index):
            parts.append(text[start:index])
            index += len(separator)
            start = index
            continue
        index += 1
    parts.append(text[start:])
    return parts


def _named_value(text: str) -> tuple[str, str] | None:
    """``x=3`` -> ``("x", "3")``, ``f(x)=2x`` -> ``("f(x)", "2x")``; None when ``text`` names no single value."""
    sides = text.split("=")
    if len(sides) == 2 and re.fullmatch(_SHORT_VARIABLE, sides[0].strip()) and sides[1].strip():
        return sides[0].strip(), sides[1].strip()
    return None


def _strip_variable_names(text: str) -> str:
    """``x=3`` -> ``3`` and ``x=2,x=-6`` -> ``2,-6``: values named by one variable are those values (the toolkit
    does the same for one). Names of several variables stay (``a=1,b=2``): without them a list of values is read
    unordered, and ``a=2,b=1`` would then equal it."""
    parts = split_top_level(text, ",")
    named = [_named_value(part) for part in parts]
    if len({entry[0] for entry in named if entry}) > 1:
        return text
    return ",".join(entry[1] if entry else part for part, entry in zip(parts, named))


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer: delimiters, spacing, units, degrees and LaTeX spelling variants removed.

    Equal strings after this are equal answers; the converse needs `is_equal`.  A percent sign survives as a trailing
    "%" because ``50%`` must still match both ``50`` and ``0.5``.
    """
    text = str(answer).replace("\n", " ").replace("\r", " ").strip()
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"\\[()\[\]]", "", text)
    text = text.replace("\\displaystyle", "").replace("\\!", "").replace("{,}", ",")
    text = re.sub(r"(?<!\\)\\[,;: ]|\\q?quad|~", " ", text)
    text = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", text)
    text = re.sub(r"\\[dtc]frac", r"\\frac", text)
    text = text.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    text = re.sub(r"(?<!\\)\\([{}])", r"\1", text.replace("bmatrix", "pmatrix"))
    text = re.sub(r"\\begin\{array\}\{[^}]*\}", r"\\begin{pmatrix}", text).replace("\\end{array}", "\\end{pmatrix}")
    text = _DEGREE.sub("", text)
    has_percent = "%" in text or re.search(r"\d\s*percent$", text) is not None
    text = re.sub(r"\\?%|\s*percent$", "", text).strip().rstrip(".").strip()
    for _ in range(3):
        without_unit = _TRAILING_UNIT_WORD.sub(r"\1", _TRAILING_TEXT_GROUP.sub(r"\1", text)).strip()
        if without_unit == text:
            break
        text = without_unit
    while _TEXT_WRAPPER.search(text):
        text = _TEXT_WRAPPER.sub(r"\1", text)
    text = re.sub(r"^[A-Za-z]\s*\\in\s*", "", text)
    text = re.sub(r",?\s+(?:and|or)\s+", ",", text)
    text = text.replace("\\emptyset", "{}").replace("\\varnothing", "{}").replace("\\mathbb{R}", "(-\\infty,\\infty)")
    text = re.sub(r"\binfinity\b", "\\\\infty", text)
    text = _WORD_NUMBERS.get(text.strip().lower(), text)
    # Whitespace carries no meaning except between a command and a following letter (``\pi r``).
    text = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", text)
    text = re.sub(r"\^(\d+)(?=\s)", r"^{\1}", text)  # "2^3 3^2": the space ends the exponent (an unbraced run is one)
    text = re.sub(r"\s+", "", text).replace("\x00", " ")
    if "=" in text:
        text = _strip_variable_names(text)
    text = _wrap_single_char_arguments(text, "\\frac", 2)
    text = _wrap_single_char_arguments(text, "\\sqrt", 1)
    text = re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", text)
    text = re.sub(r"(^|[^\w.])\.(\d)", r"\g<1>0.\2", text)  # .5 -> 0.5 first, so .50 ends as 0.5 too
    # Trailing decimal zeros go (10.0 -> 10, 2.50 -> 2.5: one maj@k vote), on a whole decimal number only: not in a
    # version or address (1.20.3), nor before a repeating part (0.10\overline{6} is not 0.1\overline{6}).
    whole_number_end = r"(?![\d.]|\\overline|\\dot|\()"
    text = re.sub(r"(?<![\d.])(\d+)\.0+" + whole_number_end, r"\1", text)
    text = re.sub(r"(?<![\d.])(\d+\.\d*?[1-9])0+" + whole_number_end, r"\1", text)
    text = re.sub(r"([_^])\{(\w)\}(?!\d)", r"\1\2", text)  # 2^{3}3 keeps its braces: 2^33 would be one exponent
    text = re.sub(r"^\(([A-Z])\)$", r"\1", text)
    if text.startswith("{") and text.endswith("}") and matching_brace_end(text, 0) == len(text) - 1:
        if "," not in text and len(text) > 2:
            text = text[1:-1]
    text = text.rstrip(".")
    return text + "%" if has_percent and text else text


# ----------------------------------------------------------------------------------------------------------------
# Numbers (decided in-process: no sympy, no timeout needed)
# ----------------------------------------------------------------------------------------------------------------

_PLAIN_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d*)?(?:[eE][-+]?\d+)?"  # "1." too (Minerva's -1./3)


def _plain_number(text: str) -> float | None:
    if not re.fullmatch(_PLAIN_NUMBER, text) or not re.match(r"[-+]?\.?\d", text):  # a digit before any exponent
        return None
    return float(text.replace(",", ""))


class _Number(NamedTuple):
    value: float
    has_percent: bool
    integer: int | None  # exact value of an integer literal, so that large integers compare exactly


def _integer_literal(text: str) -> int | None:
    if not re.fullmatch(r"[-+]?[\d,]+", text):
        return None
    try:
        return int(text.replace(",", ""))
    except ValueError:  # beyond Python's int-from-string digit limit
        return None


def _as_number(text: str) -> _Number | None:
    """Plain numbers, ``a/b``, ``\\frac{a}{b}`` and mixed numbers as a `_Number`; None for anything else."""
    has_percent = text.endswith("%")
    body = text[:-1] if has_percent else text
    value = _plain_number(body)
    if value is not None:
        return _Number(value, has_percent, _integer_literal(body))
    fraction = re.fullmatch(r"(-?)(\d*)\\frac\{([\d.]+)\}\{([\d.]+)\}|(-?[\d.]+)/([\d.]+)", body)
    if not fraction:
        return None
    sign, whole, numerator, denominator, slash_numerator, slash_denominator = fraction.groups()
    if slash_numerator is not None:
        numerator, denominator, sign, whole = slash_numerator, slash_denominator, "", ""
    top, bottom = _plain_number(numerator), _plain_number(denominator)
    if top is None or bottom is None or bottom == 0:
        return None
    value = (float(whole) if whole else 0.0) + top / bottom
    return _Number(-value if sign else value, has_percent, None)


def numbers_close(a: float, b: float) -> bool:
    """Equality up to the toolkit's relative tolerance."""
    return math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE)


def _numbers_match(pred: _Number, gold: _Number) -> bool:
    """Tolerance covers rounded decimals, but an integer gold needs the exact integer: with a relative tolerance
    alone 9999 would pass for 10000.  A percent on exactly one side means the number itself or its hundredth
    (50% == 50 == 0.5)."""
    if pred.integer is not None and gold.integer is not None and pred.has_percent == gold.has_percent:
        return pred.integer == gold.integer
    same = (lambda a, b: a == b) if gold.integer is not None else numbers_close
    if pred.has_percent == gold.has_percent:
        return same(pred.value, gold.value)
    if pred.has_percent:
        return same(pred.value, gold.value) or same(pred.value / 100, gold.value)
    return same(pred.value, gold.value) or same(pred.value, gold.value / 100)


# ----------------------------------------------------------------------------------------------------------------
# LaTeX -> sympy (runs inside the worker process)
# ----------------------------------------------------------------------------------------------------------------


class LatexParseError(ValueError):
    """The text is outside the LaTeX subset we convert; the caller then relies on string equality alone."""


_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc, "cot": sympy.cot,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "ln": sympy.log, "log": sympy.log, "exp": sympy.exp,
}  # fmt: skip
_INVERSE_FUNCTIONS = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo}
_GREEK = set(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma tau "
    "upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split()
)
_FACTOR_COMMANDS = set(_FUNCTIONS) | set(_CONSTANTS) | _GREEK | {"frac", "sqrt", "binom", "lfloor", "lceil"}
_MULTIPLY_COMMANDS = {"cdot", "times", "ast"}
_MAX_INPUT_CHARS = 400


class _LatexParser:
    """Recursive descent over the normalised answer string: relation > sum > product > unary > power > primary."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def parse(self) -> sympy.Basic:
        expression = self._relation()
        self._skip_spaces()
        if self.pos != len(self.text):
            raise LatexParseError(f"unexpected {self.text[self.pos:]!r}")
        return expression

    def _skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def _peek(self) -> str:
        self._skip_spaces()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _peek_command(self) -> str:
        """Name of the command at the cursor (``\\frac`` -> "frac"), or "" when the cursor is not on one."""
        if self._peek() != "\\":
            return ""
        match = re.match(r"[A-Za-z]+", self.text[self.pos + 1 :])
        return match.group(0) if match else ""

    def _expect(self, token: str) -> None:
        self._skip_spaces()
        if not self.text.startswith(token, self.pos):
            raise LatexParseError(f"expected {token!r} at {self.pos} in {self.text!r}")
        self.pos += len(token)

    def _relation(self) -> sympy.Basic:
        left = self._sum()
        if self._peek() == "=":
            self.pos += 1
            return sympy.Eq(left, self._sum(), evaluate=False)
        return left

    def _sum(self) -> sympy.Basic:
        expression = self._product()
        while self._peek() in ("+", "-"):
            sign = self.text[self.pos]
            self.pos += 1
            term = self._product()
            expression = expression + term if sign == "+" else expression - term
        return expression

    def _starts_factor(self) -> bool:
        char = self._peek()
        return bool(char) and (char.isalnum() or char in "({[" or self._peek_command() in _FACTOR_COMMANDS)

    def _product(self) -> sympy.Basic:
        expression = self._unary()
        while True:
            char, command = self._peek(), self._peek_command()
            if char == "*" or command in _MULTIPLY_COMMANDS:
                self.pos += 1 if char == "*" else len(command) + 1
                expression = expression * self._unary()
            elif char == "/" or command == "div":
                self.pos += 1 if char == "/" else len(command) + 1
                expression = expression / self._unary()
            elif self._starts_factor():
                expression = expression * self._power()
            else:
                return expression

    def _unary(self) -> sympy.Basic:
        if self._peek() in ("+", "-"):
            sign = self.text[self.pos]
            self.pos += 1
            operand = self._unary()
            return -operand if sign == "-" else operand
        return self._power()

    def _power(self) -> sympy.Basic:
        base = self._primary()
        while self._peek() == "!":
            self.pos += 1
            base = sympy.factorial(base)
        if self._peek() == "^":
            self.pos += 1
            return sympy.Pow(base, self._exponent())
        return base

    def _exponent(self) -> sympy.Basic:
        """After ^, unbraced digits are one number: answers write ``2^10`` for 1024 (and sympy's LaTeX parser reads
        it so), where LaTeX itself would raise to the first digit only."""
        start = self.pos
        while self._peek().isdigit():
            self.pos += 1
        if self.pos > start:
            return sympy.Integer(int(self.text[start:self.pos]))
        return self._script_argument()

    def _script_argument(self) -> sympy.Basic:
        """Argument of ^, \\frac, \\sqrt: a braced group or, as in LaTeX, a single character or command."""
        char = self._peek()
        if char == "{":
            return self._group("{", "}")
        if char == "-":
            self.pos += 1
            return -self._script_argument()
        if char.isdigit():
            self.pos += 1
            return sympy.Integer(int(char))
        if char.isalpha():
            self.pos += 1
            return self._letter(char)
        if char == "\\":
            return self._command()
        raise LatexParseError(f"missing argument at {self.pos} in {self.text!r}")

    def _group(self, opening: str, closing: str) -> sympy.Basic:
        self._expect(opening)
        expression = self._relation() if opening == "{" else self._sum()
        self._expect(closing)
        return expression

    def _primary(self) -> sympy.Basic:
        char = self._peek()
        if char.isdigit() or char == ".":
            return self._number()
        if char.isalpha():
            self.pos += 1
            return self._subscripted_symbol(char)
        if char in "([{":
            return self._group(char, {"(": ")", "[": "]", "{": "}"}[char])
        if char == "|":
            return sympy.Abs(self._group("|", "|"))
        if char == "\\":
            return self._command()
        raise LatexParseError(f"unexpected {char!r} at {self.pos} in {self.text!r}")

    def _number(self) -> sympy.Basic:
        # An exponent right after the digits is scientific notation (Minerva's golds: 4.5e33), not a product with
        # Euler's number.
        match = re.match(r"(\d*\.\d+|\d+\.?)(?:[eE]([-+]?\d+))?", self.text[self.pos :])
        if not match:
            raise LatexParseError(f"bad number at {self.pos} in {self.text!r}")
        self.pos += match.end()
        value = sympy.Rational(match.group(1))
        if match.group(2) is not None:
            return value * sympy.Integer(10) ** int(match.group(2))
        mixed = re.match(r"\\frac\{(\d+)\}\{(\d+)\}", self.text[self.pos :])
        if mixed and "." not in match.group(0):  # 2\frac{1}{3} is the mixed number 7/3, as MATH writes it
            self.pos += mixed.end()
            value += sympy.Rational(int(mixed.group(1)), int(mixed.group(2)))
        return value

    def _letter(self, name: str) -> sympy.Basic:
        """A lone e or i in a final answer is Euler's number or the imaginary unit, as in the toolkit."""
        if name == "e":
            return sympy.E
        if name == "i":
            return sympy.I
        return sympy.Symbol(name)

    def _subscripted_symbol(self, char: str) -> sympy.Basic:
        if self.text.startswith("_", self.pos):
            self.pos += 1
            if self._peek() == "{":
                end = matching_brace_end(self.text, self.pos)
                if end is None:
                    raise LatexParseError(f"unclosed subscript in {self.text!r}")
                subscript, self.pos = self.text[self.pos + 1 : end], end + 1
            else:
                subscript, self.pos = self.text[self.pos], self.pos + 1
            return sympy.Symbol(f"{char}_{subscript}")
        return self._letter(char)

    def _command(self) -> sympy.Basic:
        name = self._peek_command()
        if not name:
            raise LatexParseError(f"stray backslash in {self.text!r}")
        self.pos += len(name) + 1
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if name in _GREEK:
            return self._subscripted_symbol(name)
        if name == "frac":
            numerator = self._script_argument()
            return numerator / self._script_argument()
        if name == "binom":
            top = self._script_argument()
            return sympy.binomial(top, self._script_argument())
        if name == "sqrt":
            if self._peek() == "[":
                degree = self._group("[", "]")
                return sympy.root(self._script_argument(), degree)
            return sympy.sqrt(self._script_argument())
        if name in ("lfloor", "lceil"):
            inner = self._sum()
            self._expect("\\rfloor" if name == "lfloor" else "\\rceil")
            return sympy.floor(inner) if name == "lfloor" else sympy.ceiling(inner)
        if name in _FUNCTIONS:
            return self._function(name)
        raise LatexParseError(f"unsupported command \\{name}")

    def _function(self, name: str) -> sympy.Basic:
        """``\\sin^2 x``, ``\\sin^{-1}(x)``, ``\\log_2 8``, ``\\ln(x)``: the argument is a group or a product."""
        exponent, base = None, None
        if self._peek() == "^":
            self.pos += 1
            exponent = self._script_argument()
        if self._peek() == "_":
            self.pos += 1
            base = self._script_argument()
        if self._peek() in ("(", "{"):
            argument = self._group(self._peek(), ")" if self._peek() == "(" else "}")
        else:
            factors = [self._power()]
            while self._starts_factor() and self._peek_command() not in _FUNCTIONS:
                factors.append(self._power())
            argument = sympy.Mul(*factors)
        if exponent == -1 and name in _INVERSE_FUNCTIONS:
            return _INVERSE_FUNCTIONS[name](argument)
        value = sympy.log(argument, base) if base is not None else _FUNCTIONS[name](argument)
        return value if exponent is None else value**exponent


def latex_to_sympy(text: str) -> sympy.Basic:
    """Sympy expression (or ``Eq``) for a normalised answer; raises LatexParseError outside the supported subset."""
    if len(text) > _MAX_INPUT_CHARS:
        raise LatexParseError("answer too long to be a final answer")
    return _LatexParser(text).parse()


def _values_close(a: sympy.Basic, b: sympy.Basic) -> bool | None:
    """Numeric verdict for two constant expressions (``\\frac{\\sqrt2}{2}`` vs ``0.7071``); None if not evaluable.

    Evaluated with sympy floats, not Python ones, so that 1/2004! and 1/2005! do not both underflow to 0.
    """
    value_a, value_b = sympy.N(a, 30), sympy.N(b, 30)
    if not all(value.is_number and value.is_finite for value in (value_a, value_b)):
        return None
    try:
        return bool(abs(value_a - value_b) <= RELATIVE_TOLERANCE * sympy.Max(abs(value_a), abs(value_b)))
    except TypeError:  # a comparison sympy cannot decide
        return None


def _expressions_equal(a: sympy.Basic, b: sympy.Basic, exact: bool = False) -> bool:
    """``exact``: no numeric tolerance for constants (an integer gold needs the exact integer: 2^{14} is not 16385)."""
    if a == b:
        return True
    if not (a.free_symbols or b.free_symbols) and not exact:
        verdict = _values_close(a, b)
        if verdict is not None:
            return verdict
    difference = a - b
    return sympy.expand(difference) == 0 or sympy.simplify(difference) == 0


def _equations_equal(a: sympy.Eq, b: sympy.Eq) -> bool:
    """Equations are the same when one side-difference is a nonzero constant multiple of the other (2x=2 ~ x=1)."""
    difference_a, difference_b = a.lhs - a.rhs, b.lhs - b.rhs
    if _expressions_equal(difference_a, difference_b) or _expressions_equal(difference_a, -difference_b):
        return True
    ratio = sympy.simplify(difference_a / difference_b)
    return bool(ratio.is_number and ratio != 0 and ratio.is_finite)


def _approximate(gold: str) -> bool:
    """A gold written with a decimal point or in scientific notation (``4.5e33``, ``4.5\\times10^{33}``) is a
    measured or rounded value, whole or not: it gets the numeric tolerance, not the exact-integer rule."""
    return bool(re.search(r"\d\.\d|\d[eE][-+]?\d|\\times10\^", gold))


def sympy_equal(pred: str, gold: str) -> bool:
    """Symbolic equality of two normalised answers.  Unbounded in time: call only through the worker."""
    try:
        pred_expr, gold_expr = latex_to_sympy(pred), latex_to_sympy(gold)
        pred_is_equation, gold_is_equation = isinstance(pred_expr, sympy.Eq), isinstance(gold_expr, sympy.Eq)
        if pred_is_equation and gold_is_equation:
            return _equations_equal(pred_expr, gold_expr)
        if pred_is_equation or gold_is_equation:
            return False
        return _expressions_equal(pred_expr, gold_expr, exact=bool(gold_expr.is_Integer) and not _approximate(gold))
    except Exception:  # any sympy failure (ZeroDivision, RecursionError, TypeError ...) means "not shown equal"
        return False


# ----------------------------------------------------------------------------------------------------------------
# Worker process
# ----------------------------------------------------------------------------------------------------------------


def _serve_comparisons(connection, parent_end) -> None:
    parent_end.close()  # otherwise the worker never sees end-of-file when its parent dies, and lingers forever
    while True:
        try:
            pred, gold = connection.recv()
        except (EOFError, OSError):
            return
        connection.send(sympy_equal(pred, gold))


class _SympyWorker:
    """One forked process answering sympy comparisons; killed and lazily restarted when a comparison overruns.

    Forked rather than spawned so that a restart costs milliseconds (sympy is already imported in the parent).
    A process forked from the owner (e.g. a data-loader worker) must not share the owner's pipe, so it starts its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = None
        self._connection = None
        self._owner_pid = None

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")
        parent_end, child_end = context.Pipe()
        self._process = context.Process(target=_serve_comparisons, args=(child_end, parent_end), daemon=True)
        try:
            self._process.start()
        except AssertionError as error:  # multiprocessing forbids children of daemonic processes
            raise RuntimeError(
                "is_equal needs a helper process for its sympy timeout; call it from a non-daemonic process"
            ) from error
        child_end.close()
        self._connection = parent_end
        self._owner_pid = os.getpid()

    def _stop(self) -> None:
        self._process.kill()
        self._process.join()
        self._connection.close()
        self._process = self._connection = None

    def equal(self, pred: str, gold: str, timeout: float) -> bool | None:
        """The worker's verdict, or None when it did not answer within `timeout` seconds (it is then killed)."""
        with self._lock:
            if self._process is None or self._owner_pid != os.getpid():
                self._start()
            try:
                self._connection.send((pred, gold))
                if self._connection.poll(timeout):
                    return self._connection.recv()
            except (EOFError, OSError):  # the worker died (e.g. out of memory): treat like a timeout
                pass
            self._stop()
            return None


_WORKER = _SympyWorker()
_SYMBOLIC_VERDICTS: dict[tuple[str, str], bool] = {}
_MAX_CACHED_VERDICTS = 200_000


def _symbolic_equal(pred: str, gold: str, deadline: float) -> bool:
    """Worker verdict within what is left of the caller's time budget; timeouts count as "not equal" but are not
    cached, so a later call with more time can still decide."""
    key = (pred, gold)
    if key in _SYMBOLIC_VERDICTS:
        return _SYMBOLIC_VERDICTS[key]
    remaining = deadline - time.monotonic()
    verdict = _WORKER.equal(pred, gold, remaining) if remaining > 0 else None
    if verdict is None:
        return False
    if len(_SYMBOLIC_VERDICTS) >= _MAX_CACHED_VERDICTS:
        _SYMBOLIC_VERDICTS.clear()
    _SYMBOLIC_VERDICTS[key] = verdict
    return verdict


# ----------------------------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------------------------

_BRACKET_PAIRS = {"(": ")]", "[": ")]", "{": "}"}


def _enclosing_brackets(text: str) -> str:
    """The bracket pair wrapping all of `text` ("()", "[)", "{}" ...) or "" when it is not wrapped as a whole."""
    if len(text) < 2 or text[0] not in _BRACKET_PAIRS or text[-1] not in _BRACKET_PAIRS[text[0]]:
        return ""
    depth = 0
    for index, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0 and index < len(text) - 1:
            return ""
    return text[0] + text[-1]


def _as_sequence(text: str) -> tuple[str, list[str]] | None:
    """(bracket pair, items) for tuples, intervals, sets and bare comma lists; None for a single value."""
    brackets = _enclosing_brackets(text)
    inner = text[1:-1] if brackets else text
    items = split_top_level(inner, ",")
    if len(items) < 2 and brackets != "{}":
        return None
    return brackets, items


_PLUS_MINUS = re.compile(r"\\pm(?![A-Za-z])")  # not \pmod, \pmb


def _expand_plus_minus(text: str) -> str:
    """``a \\pm b`` stands for the two values a+b and a-b: in a bare list or a set, an item with one top-level
    ``\\pm`` becomes both, so an answer that writes out both roots matches (tuples and intervals keep their arity)."""
    if not _PLUS_MINUS.search(text):
        return text
    brackets = _enclosing_brackets(text)
    if brackets not in ("", "{}"):
        return text
    items = []
    for item in split_top_level(text[1:-1] if brackets else text, ","):
        halves = split_top_level(item, "\\pm")
        if len(halves) != 2 or not halves[1] or halves[1][0].isalpha():  # none, several, or \pmod / \pmb
            items.append(item)
            continue
        first, second = halves
        items += [f"{first}+({second})" if first else second, f"{first}-({second})"]
    joined = ",".join(items)
    return "{" + joined + "}" if brackets else joined


def _matrix_rows(text: str) -> list[list[str]] | None:
    match = re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", text)
    if not match:
        return None
    rows = [row for row in match.group(1).split("\\\\") if row]
    return [row.split("&") for row in rows]


def _match_unordered(pred_items: list[str], gold_items: list[str], deadline: float) -> bool:
    if len(pred_items) != len(gold_items):
        return False
    unmatched = list(gold_items)
    for pred_item in pred_items:
        match = next((gold for gold in unmatched if _equal_normalized(pred_item, gold, deadline)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def _match_ordered(pred_items: list[str], gold_items: list[str], deadline: float) -> bool:
    return len(pred_items) == len(gold_items) and all(
        _equal_normalized(pred, gold, deadline) for pred, gold in zip(pred_items, gold_items)
    )


def _structures_equal(pred: str, gold: str, deadline: float) -> bool | None:
    """Verdict for matrices, unions, tuples, intervals, sets and lists; None when neither side is a structure."""
    pred_matrix, gold_matrix = _matrix_rows(pred), _matrix_rows(gold)
    if pred_matrix or gold_matrix:
        if pred_matrix and gold_matrix:
            return len(pred_matrix) == len(gold_matrix) and all(
                _match_ordered(p, g, deadline) for p, g in zip(pred_matrix, gold_matrix)
            )
        # A one-row or one-column matrix equals the tuple of its entries: (1,2) for a column vector is common.
        matrix = pred_matrix or gold_matrix
        sequence = _as_sequence(gold if pred_matrix else pred)
        if min(len(matrix), len(matrix[0])) != 1 or sequence is None or sequence[0] != "()":
            return False
        entries = [entry for row in matrix for entry in row]
        if pred_matrix:
            return _match_ordered(entries, sequence[1], deadline)
        return _match_ordered(sequence[1], entries, deadline)
    pred_union, gold_union = split_top_level(pred, "\\cup"), split_top_level(gold, "\\cup")
    if len(pred_union) > 1 or len(gold_union) > 1:
        return _match_unordered(pred_union, gold_union, deadline)
    pred_sequence, gold_sequence = _as_sequence(pred), _as_sequence(gold)
    if pred_sequence is None and gold_sequence is None:
        return None
    if pred_sequence is None or gold_sequence is None:
        return False
    (pred_brackets, pred_items), (gold_brackets, gold_items) = pred_sequence, gold_sequence
    unordered = {"", "{}"}
    if pred_brackets in unordered and gold_brackets in unordered:
        return _match_unordered(pred_items, gold_items, deadline)
    return pred_brackets == gold_brackets and _match_ordered(pred_items, gold_items, deadline)


def _equal_normalized(pred: str, gold: str, deadline: float) -> bool:
    pred, gold = pred.strip(), gold.strip()
    if pred == gold:
        return bool(pred)
    if not pred or not gold:
        return False
    pred_number, gold_number = _as_number(pred), _as_number(gold)
    if pred_number is not None and gold_number is not None:
        return _numbers_match(pred_number, gold_number)
    pred_named, gold_named = _named_value(pred), _named_value(gold)
    if pred_named and gold_named:  # an item of a list naming several variables: the same name, an equal value
        return pred_named[0] == gold_named[0] and _equal_normalized(pred_named[1], gold_named[1], deadline)
    pred, gold = _expand_plus_minus(pred), _expand_plus_minus(gold)
    structure_verdict = _structures_equal(pred, gold, deadline)
    if structure_verdict is not None:
        return structure_verdict
    if re.fullmatch(r"[A-Za-z]{2,}", pred) or re.fullmatch(r"[A-Za-z]{2,}", gold):
        return pred.lower() == gold.lower()  # words ("odd", "Devon") are not products of letters
    return _symbolic_equal(pred.rstrip("%"), gold.rstrip("%"), deadline)


def is_equal(pred: str | None, gold: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether a predicted final answer matches the gold one: string, numeric (rel. tol. 1e-4, percentages),
    structural (tuples, intervals, sets, matrices) and finally symbolic equality under a `timeout` in seconds.

    An empty gold matches nothing.  A comparison that runs out of time counts as not equal.
    """
    if pred is None or gold is None:
        return False
    deadline = time.monotonic() + timeout
    pred, gold = normalize_answer(pred), normalize_answer(gold).strip()
    if re.fullmatch(r"[A-K]", gold):
        # A choice letter as gold (GaoKao-2023-En's multiple-choice items, A-E and the ACT-style F-K): a leading
        # "(H)", "H:" or "h" chooses; otherwise the prediction's standalone letters decide, so "(C) 2", "C: 2" and
        # "c" all choose C, as in the Qwen2.5-Math evaluation; unlike it, a hedge naming two letters ("A or C")
        # chooses nothing. The leading mark comes first because an option's text may hold letters ("(F) y+k=0").
        marked = re.match(r"\(([A-Ka-k])\)|([A-Ka-k])(?:[:.)]|$)", pred)
        if marked:
            also_marked = {letter.upper() for letter in re.findall(r"\(([A-Ka-k])\)", pred)}
            return (marked.group(1) or marked.group(2)).upper() == gold and also_marked <= {gold}
        return set(re.findall(r"\b([A-K])\b", pred.upper())) == {gold}
    return _equal_normalized(pred, gold, deadline)
