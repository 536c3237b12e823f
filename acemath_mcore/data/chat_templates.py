"""Chat templates rendered piece by piece, and their encoding into (input_ids, loss_mask).

A template turns messages into a list of `Piece`s: literal text or one special token, each flagged whether
the model is trained to produce it. Loss is on assistant content and the end-of-turn token that closes it
(``<|im_end|>``, ``<|eot_id|>`` or eos) — every assistant turn of a conversation, never system/user text nor
role headers.

Encoding keeps the ids exactly those of tokenizing the whole rendered text at once: the text between two
special tokens is tokenized as one run (tokenizers split on special tokens first, so runs are independent),
and the loss flag of a token comes from the bytes it covers. A token that straddles a header/content boundary
(``"\\n"`` of ``<|im_start|>assistant\\n`` merged with a leading ``"\\n"`` of the answer) is a loss token: the
model has to emit it to produce the answer.
"""

from __future__ import annotations

import itertools
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from acemath_mcore.data.jsonl import DataError, Reason
from acemath_mcore.data.tokenizers import QWEN_IM_END, QWEN_IM_START, Tokenizer

logger = logging.getLogger(__name__)

# The system prompt the AceMath / Qwen2.5-Math instruct models are evaluated with.
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# The one AceMath-RM's model card renders (problem, response) pairs with for scoring.
ACEMATH_RM_SYSTEM_PROMPT = "Please reason step by step, and check your final answer within \\boxed{}."
SYSTEM_PROMPT_PRESETS = {"math": MATH_SYSTEM_PROMPT, "acemath_rm": ACEMATH_RM_SYSTEM_PROMPT}


NO_SYSTEM_PROMPT = "none"  # --system-prompt none: no system turn, whatever the checkpoint records


def resolve_system_prompt(value: Optional[str]) -> Optional[str]:
    """A preset's text (``math``, ``acemath_rm``), ``none`` for no system turn, or ``value`` itself as a literal
    prompt. A single word that names no preset is most likely a mistyped one: it is used as given, with a warning."""
    if value == NO_SYSTEM_PROMPT:
        return None
    if value is not None and value not in SYSTEM_PROMPT_PRESETS and re.fullmatch(r"[\w-]+", value):
        logger.warning("system prompt %r is not a preset (%s; %s for no system turn): it is used as the literal system "
                       "turn", value, ", ".join(SYSTEM_PROMPT_PRESETS), NO_SYSTEM_PROMPT)
    return SYSTEM_PROMPT_PRESETS.get(value, value)


@dataclass(frozen=True)
class PromptFormat:
    """How a model's training data was rendered: the chat template, and the system turn given to conversations
    without one. A model (a reward model above all) scores best what reads like its training data, so the save
    dir records its data's format and scoring and evaluation default to it."""

    template: str
    system_prompt: Optional[str] = None


def choose_prompt_format(recorded: Optional[PromptFormat], template: Optional[str], system_prompt: Optional[str],
                         where: str, with_system_prompt: bool = True) -> PromptFormat:
    """The command line's template and system prompt (None: not given), else the ones ``recorded`` for the
    checkpoint at ``where``, else chatml without a system turn. A choice that differs from the recorded format is
    allowed but logged as a warning naming both. ``with_system_prompt=False``: only the template matters (generation
    puts the benchmark's instruction where its protocol says)."""
    chosen = PromptFormat(
        template if template is not None else recorded.template if recorded else "chatml",
        None if not with_system_prompt
        else resolve_system_prompt(system_prompt) if system_prompt is not None
        else recorded.system_prompt if recorded else None)
    names = ("template", "system_prompt") if with_system_prompt else ("template",)
    if recorded is None:
        given = {"template": template, "system_prompt": system_prompt}
        defaulted = [name for name in names if given[name] is None]
        if defaulted:  # e.g. a converted Hugging Face model: nothing says how it was trained to read prompts
            logger.warning("%s records no prompt format (prompt_format.json): rendering with %s by default; pass "
                           "%s as the model was trained", where, _describe_format(chosen, names),
                           " and ".join("--" + name.replace("_", "-") for name in defaulted))
        else:
            logger.info("rendering prompts for %s with %s", where, _describe_format(chosen, names))
        return chosen
    differs = [name for name in names if getattr(chosen, name) != getattr(recorded, name)]
    if not differs:
        logger.info("rendering prompts for %s in its recorded format: %s", where, _describe_format(chosen, names))
    else:
        logger.warning(
            "%s was trained on data rendered with %s; rendering with %s instead (a model reads its own training "
            "format best)", where, _describe_format(recorded, differs), _describe_format(chosen, differs))
    return chosen


def _describe_format(prompt_format: PromptFormat, names: Sequence[str]) -> str:
    def system_turn(text: Optional[str]) -> str:
        return "no system prompt" if text is None else f"system prompt {text if len(text) <= 60 else text[:57] + '...'!r}"

    return ", ".join(f"template {prompt_format.template!r}" if name == "template"
                     else system_turn(prompt_format.system_prompt) for name in names)


@dataclass(frozen=True)
class Piece:
    text: str
    loss: bool = False
    special: bool = False  # text is the exact string of one special token


def rendered_text(pieces: Sequence[Piece]) -> str:
    return "".join(piece.text for piece in pieces)


class ChatTemplate(ABC):
    name: str

    def __init__(self, system_prompt: Optional[str] = None):
        # Used when a conversation brings no system message of its own; None renders no system turn.
        self.system_prompt = system_prompt

    @property
    @abstractmethod
    def special_tokens(self) -> tuple[str, ...]:
        """Special-token strings the template emits; the tokenizer must have each one."""

    @property
    @abstractmethod
    def end_of_turn(self) -> str:
        """The special token that closes an assistant turn: where generation stops."""

    @abstractmethod
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Piece]:
        """Pieces of a validated conversation; ``add_generation_prompt`` appends an open assistant header."""

    @abstractmethod
    def _jinja_turns(self) -> str:
        """The Jinja statements that render ``system`` (None: no system turn) and ``turns`` as :meth:`render`."""

    def jinja(self) -> str:
        """This template as a Hugging Face chat template (Jinja): ``apply_chat_template`` then renders the text
        :meth:`render` does, so an exported model is prompted as it was trained (vLLM's server reads it too)."""
        default = "none" if self.system_prompt is None else _jinja_literal(self.system_prompt)
        return ("{%- if messages and messages[0]['role'] == 'system' -%}"
                "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
                f"{{%- else -%}}{{%- set system = {default} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
                + self._jinja_turns())

    def _split_system(self, messages: Sequence[dict]) -> tuple[Optional[str], Sequence[dict]]:
        if messages and messages[0]["role"] == "system":
            return messages[0]["content"], messages[1:]
        return self.system_prompt, messages


def _jinja_literal(text: str) -> str:
    """A single-quoted Jinja string literal of ``text`` (Jinja undoes Python's escapes; ASCII only inside)."""
    escaped = []
    for char in text:
        if char in "\\'":
            escaped.append("\\" + char)
        elif 0x20 <= ord(char) < 0x7F:
            escaped.append(char)
        else:
            escaped.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
    return "'" + "".join(escaped) + "'"


class ChatMLTemplate(ChatTemplate):
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen2 / Qwen2.5 / AceMath-Instruct)."""

    name = "chatml"

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (QWEN_IM_START, QWEN_IM_END)

    @property
    def end_of_turn(self) -> str:
        return QWEN_IM_END

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Piece]:
        system, turns = self._split_system(messages)
        pieces = []
        if system is not None:
            pieces += [Piece(QWEN_IM_START, special=True), Piece(f"system\n{system}"),
                       Piece(QWEN_IM_END, special=True), Piece("\n")]
        for message in turns:
            trained = message["role"] == "assistant"
            pieces += [Piece(QWEN_IM_START, special=True), Piece(message["role"] + "\n"),
                       Piece(message["content"], loss=trained), Piece(QWEN_IM_END, loss=trained, special=True),
                       Piece("\n")]
        if add_generation_prompt:
            pieces += [Piece(QWEN_IM_START, special=True), Piece("assistant\n")]
        return pieces

    def _jinja_turns(self) -> str:
        start, end = _jinja_literal(QWEN_IM_START), _jinja_literal(QWEN_IM_END + "\n")
        return (f"{{%- if system is not none -%}}{{{{ {start} + 'system\\n' + system + {end} }}}}{{%- endif -%}}"
                "{%- for message in turns -%}"
                f"{{{{ {start} + message['role'] + '\\n' + message['content'] + {end} }}}}"
                "{%- endfor -%}"
                f"{{%- if add_generation_prompt -%}}{{{{ {start} + 'assistant\\n' }}}}{{%- endif -%}}")


class Llama3Template(ChatTemplate):
    """``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` with trimmed content,
    as Llama-3-Instruct's own template renders it."""

    name = "llama3"
    BEGIN = "<|begin_of_text|>"
    START_HEADER = "<|start_header_id|>"
    END_HEADER = "<|end_header_id|>"
    END_OF_TURN = "<|eot_id|>"

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (self.BEGIN, self.START_HEADER, self.END_HEADER, self.END_OF_TURN)

    @property
    def end_of_turn(self) -> str:
        return self.END_OF_TURN

    def _header(self, role: str) -> list[Piece]:
        return [Piece(self.START_HEADER, special=True), Piece(role), Piece(self.END_HEADER, special=True), Piece("\n\n")]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Piece]:
        system, turns = self._split_system(messages)
        pieces = [Piece(self.BEGIN, special=True)]
        if system is not None:
            pieces += self._header("system") + [Piece(system.strip()), Piece(self.END_OF_TURN, special=True)]
        for message in turns:
            trained = message["role"] == "assistant"
            pieces += self._header(message["role"]) + [
                Piece(message["content"].strip(), loss=trained),
                Piece(self.END_OF_TURN, loss=trained, special=True),
            ]
        if add_generation_prompt:
            pieces += self._header("assistant")
        return pieces

    def _jinja_turns(self) -> str:
        begin, end = _jinja_literal(self.BEGIN), _jinja_literal(self.END_OF_TURN)
        start_header, end_header = _jinja_literal(self.START_HEADER), _jinja_literal(self.END_HEADER + "\n\n")

        def header(role: str) -> str:  # role: a Jinja expression
            return f"{start_header} + {role} + {end_header}"

        system_header, message_header = header("'system'"), header("message['role']")
        assistant_header = header("'assistant'")
        return (f"{{{{ {begin} }}}}"
                f"{{%- if system is not none -%}}{{{{ {system_header} + system | trim + {end} }}}}{{%- endif -%}}"
                "{%- for message in turns -%}"
                f"{{{{ {message_header} + message['content'] | trim + {end} }}}}"
                "{%- endfor -%}"
                f"{{%- if add_generation_prompt -%}}{{{{ {assistant_header} }}}}{{%- endif -%}}")


class PlainTemplate(ChatTemplate):
    """No chat markup: ``[bos] system\\n user\\n response[eos] ...`` for base-model style prompt/response data."""

    name = "plain"

    def __init__(self, tokenizer: Tokenizer, system_prompt: Optional[str] = None, separator: str = "\n"):
        super().__init__(system_prompt)
        if tokenizer.eos_id is None:
            raise ValueError(f"the plain template ends responses with eos, but {tokenizer.name} has none")
        self.bos = None if tokenizer.bos_id is None else tokenizer.id_to_token(tokenizer.bos_id)
        self.eos = tokenizer.id_to_token(tokenizer.eos_id)
        self.separator = separator

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (self.eos,) if self.bos is None else (self.bos, self.eos)

    @property
    def end_of_turn(self) -> str:
        return self.eos

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Piece]:
        system, turns = self._split_system(messages)
        pieces = [] if self.bos is None else [Piece(self.bos, special=True)]
        if system is not None:
            pieces.append(Piece(system + self.separator))
        for message in turns:
            if message["role"] == "assistant":
                pieces += [Piece(message["content"], loss=True), Piece(self.eos, loss=True, special=True)]
            else:
                pieces.append(Piece(message["content"] + self.separator))
        return pieces  # a plain prompt needs no generation header

    def _jinja_turns(self) -> str:
        separator, eos = _jinja_literal(self.separator), _jinja_literal(self.eos)
        bos = "" if self.bos is None else f"{{{{ {_jinja_literal(self.bos)} }}}}"
        return (bos + f"{{%- if system is not none -%}}{{{{ system + {separator} }}}}{{%- endif -%}}"
                "{%- for message in turns -%}{%- if message['role'] == 'assistant' -%}"
                f"{{{{ message['content'] + {eos} }}}}{{%- else -%}}{{{{ message['content'] + {separator} }}}}"
                "{%- endif -%}{%- endfor -%}")


TEMPLATE_NAMES = ("chatml", "llama3", "plain")


def build_template(name: str, tokenizer: Tokenizer, system_prompt: Optional[str] = None) -> ChatTemplate:
    if name == "chatml":
        return ChatMLTemplate(system_prompt)
    if name == "llama3":
        return Llama3Template(system_prompt)
    if name == "plain":
        return PlainTemplate(tokenizer, system_prompt)
    raise ValueError(f"unknown chat template {name!r}; choose one of {TEMPLATE_NAMES}")


@dataclass
class EncodedConversation:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n], 1 on tokens the model is trained to produce


class ConversationEncoder:
    """Renders and tokenizes conversations in batches (one tokenizer call per batch keeps it fast)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self.tokenizer, self.template = tokenizer, template
        self._special_ids = {}
        for token in template.special_tokens:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                usable = [name for name in TEMPLATE_NAMES if all(
                    tokenizer.token_to_id(t) is not None for t in build_template(name, tokenizer).special_tokens)]
                raise ValueError(f"chat template {template.name!r} needs {token!r}, which {tokenizer.name} lacks; "
                                 f"templates this tokenizer can render: {', '.join(usable) or 'none'}")
            self._special_ids[token] = token_id
        # Cheap gate before scanning for every special token (Llama-3 has 256, all starting with "<|").
        self._special_prefixes = {token[:2] for token in tokenizer.text_special_tokens}

    def special_token_in(self, messages: Sequence[dict]) -> Optional[str]:
        """The first special-token string found in any message content (it would tokenize as a control token)."""
        for message in messages:
            content = message["content"]
            if any(prefix in content for prefix in self._special_prefixes):
                for token in self.tokenizer.text_special_tokens:
                    if token in content:
                        return token
        return None

    def check_no_special_tokens(self, messages: Sequence[dict], where: str) -> None:
        """Refuse a line whose text holds a control-token string (``<|im_end|>``): it would end the turn early and
        forge the next one on one tokenizer backend and stay plain text on another."""
        token = self.special_token_in(messages)
        if token is not None:
            raise DataError(where, Reason.SPECIAL_TOKEN_IN_CONTENT, f"content contains {token!r}")

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated response: the template's end of turn and the tokenizer's eos."""
        ids = {self._special_ids[self.template.end_of_turn]}
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return sorted(ids)

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return rendered_text(self.template.render(messages, add_generation_prompt))

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> EncodedConversation:
        return self.encode_batch([messages], add_generation_prompt)[0]

    def encode_batch(
        self, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool = False
    ) -> list[EncodedConversation]:
        if not conversations:
            return []
        # 1. Render every conversation into "items": a text run (text between special tokens, tokenized later)
        #    or one special token; note the loss spans in bytes of all runs laid end to end.
        normalize = self.tokenizer.normalize
        runs: list[str] = []
        run_bytes: list[int] = []
        specials: list[int] = []
        special_loss: list[bool] = []
        items: list[int] = []  # in order: run r as r, special s as -1 - s
        items_per_conversation: list[int] = []
        span_starts: list[int] = []
        span_ends: list[int] = []
        position = 0  # byte position in all runs laid end to end
        for messages in conversations:
            first_item, parts, run_start = len(items), [], position
            for piece in self.template.render(messages, add_generation_prompt):
                if piece.special:
                    if parts:
                        items.append(len(runs))
                        runs.append("".join(parts))
                        run_bytes.append(position - run_start)
                        parts, run_start = [], position
                    items.append(-1 - len(specials))
                    specials.append(self._special_ids[piece.text])
                    special_loss.append(piece.loss)
                    continue
                text = normalize(piece.text)
                size = len(text.encode("utf-8"))
                if size == 0:
                    continue
                if piece.loss:
                    span_starts.append(position)
                    span_ends.append(position + size)
                parts.append(text)
                position += size
            if parts:
                items.append(len(runs))
                runs.append("".join(parts))
                run_bytes.append(position - run_start)
            items_per_conversation.append(len(items) - first_item)

        # 2. Tokenize all runs at once; a token is a loss token when its bytes overlap a loss span.
        run_tokens, run_counts, token_bytes = self.tokenizer.encode_runs(runs)
        token_ends = np.cumsum(token_bytes)
        token_starts = token_ends - token_bytes
        run_offsets = np.concatenate(([0], np.cumsum(run_counts)))
        if not np.array_equal(np.diff(np.concatenate(([0], token_ends))[run_offsets]), run_bytes):
            raise ValueError(f"{self.tokenizer.name}: token byte counts do not add up to the text; its normalizer "
                             f"rewrites text in a way the loss-mask mapping cannot follow")
        run_loss = np.zeros(len(run_tokens), dtype=bool)
        if span_starts:
            starts, ends = np.asarray(span_starts), np.asarray(span_ends)
            # Spans are sorted and disjoint: the one a token can overlap is the first that ends after it starts.
            candidate = np.minimum(np.searchsorted(ends, token_starts, side="right"), len(ends) - 1)
            run_loss = (starts[candidate] < token_ends) & (ends[candidate] > token_starts)

        # 3. Lay the items out: gather from [run tokens..., special tokens...] by index ranges, then split.
        all_ids = np.concatenate((run_tokens, np.asarray(specials, dtype=np.int64))).astype(np.int32)
        all_loss = np.concatenate((run_loss, np.asarray(special_loss, dtype=bool))).astype(np.uint8)
        codes = np.asarray(items, dtype=np.int64)
        is_run = codes >= 0
        run_index = np.where(is_run, codes, len(run_counts))  # specials point past the last run: length 0 there
        range_starts = np.where(is_run, run_offsets[run_index], len(run_tokens) - 1 - codes)
        range_lengths = np.where(is_run, np.append(run_counts, 0)[run_index], 1)
        gather = np.repeat(range_starts - (np.cumsum(range_lengths) - range_lengths), range_lengths)
        gather += np.arange(len(gather))
        item_offsets = np.concatenate(([0], np.cumsum(items_per_conversation, dtype=np.int64)))
        token_offsets = np.concatenate(([0], np.cumsum(range_lengths)))[item_offsets]
        ids, loss = all_ids[gather], all_loss[gather]
        return [EncodedConversation(ids[a:b], loss[a:b]) for a, b in itertools.pairwise(token_offsets)]
