"""Tokenizers behind one interface: Hugging Face, SentencePiece and Llama-3 tiktoken.

The chat-template encoder (``chat_templates.py``) needs two things a plain ``encode`` does not give: the
ids of special tokens by name, and for every token of a text run the number of UTF-8 bytes of that run it
covers, so loss-mask spans (known in bytes from the renderer) can be mapped onto tokens exactly while the
run itself is tokenized in one piece (which is what makes our ids equal the ids of the whole rendered text).
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"

# Llama-3's pre-tokenizer split (meta-llama/llama3 tokenizer.py); digits are grouped up to three.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens() -> list[str]:
    """Llama-3's 256 special-token names in id order (128000 onwards)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL_TOKENS - 5)]
    return named + reserved


class Tokenizer(ABC):
    """What the data pipeline needs from any tokenizer."""

    name: str
    vocab_size: int  # number of ids the embedding must hold (max id + 1)
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    # Strings that the tokenizer turns into special ids when they appear in text; message content holding one
    # would re-tokenize differently from what we rendered, so samples containing them are rejected.
    text_special_tokens: tuple[str, ...]

    @abstractmethod
    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a (special) token given by its exact string, None when the vocabulary lacks it."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of an id (for special tokens: their exact text)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a whole text; special-token strings in it become their ids where the tokenizer does so."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens included)."""

    @abstractmethod
    def encode_runs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode texts free of special tokens: (ids of all texts concatenated, number of ids per text, UTF-8
        bytes of the text each id covers), int64 arrays. The byte counts of one text sum to its UTF-8 length."""

    def normalize(self, text: str) -> str:
        """The text as the tokenizer's own normalizer would see it; identity unless overridden."""
        return text

    @property
    def pad_or_eos_id(self) -> int:
        """Id used to fill padding; which id does not matter (loss mask 0) but it must be a valid embedding row."""
        if self.pad_id is not None:
            return self.pad_id
        return self.eos_id if self.eos_id is not None else 0

    @property
    def im_start_id(self) -> Optional[int]:
        return self.token_to_id(QWEN_IM_START)

    @property
    def im_end_id(self) -> Optional[int]:
        return self.token_to_id(QWEN_IM_END)

    def describe(self) -> dict:
        """Identity and special ids, for stats files and logs."""
        return {
            "name": self.name,
            "class": type(self).__name__,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "im_start_id": self.im_start_id,
            "im_end_id": self.im_end_id,
        }


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail before training when the tokenizer can emit ids the model's (padded) embedding has no row for."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model's padded vocabulary has "
            f"only {model_vocab_size} rows; use the tokenizer the checkpoint was trained with or a larger "
            f"padded vocab size"
        )


def _utf8_lengths_of_chars(text: str) -> np.ndarray:
    """UTF-8 byte length of every character of text (1-4), vectorised."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)


def _flatten_runs(runs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated, ids per run) as int64 arrays."""
    counts = np.fromiter(map(len, runs), dtype=np.int64, count=len(runs))
    flat = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64, count=int(counts.sum()))
    return flat, counts


def _byte_length_table(ranks: dict[bytes, int], vocab_size: int) -> np.ndarray:
    table = np.zeros(vocab_size, dtype=np.int64)  # special tokens never occur inside runs: 0 bytes
    for token_bytes, rank in ranks.items():
        table[rank] = len(token_bytes)
    return table


def _encode_runs_tiktoken(encoding, byte_table: np.ndarray, texts: Sequence[str]):
    flat, counts = _flatten_runs([encoding.encode_ordinary(text) for text in texts])
    return flat, counts, byte_table[flat]


def _byte_level_translation() -> dict[int, str]:
    """str.translate table turning GPT-2 byte-level spelling (one character per byte) into latin-1 characters
    whose code is the byte; any other character below U+0200 becomes unencodable, so ``.encode("latin-1")``
    either yields the token's bytes or raises."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {code: "\u1000" for code in range(0x200)}
    table.update({b: chr(b) for b in printable})
    table.update({256 + i: chr(b) for i, b in enumerate(others)})
    return table


def _tiktoken_twin(backend, name: str, vocab_size: int):
    """The backend's byte-level BPE as (tiktoken Encoding, token byte-length table) when tiktoken tokenizes
    identically, else None.

    tiktoken merges by the rank of the merged token; HF merges by merge-list order. The two agree on
    vocabularies that are tiktoken ranks written out as merges (Qwen2's, Llama-3's): ranks grow along the merge
    list, which is checked, and the twin must reproduce the backend on probe texts. tiktoken is 2-3x faster,
    which is what gets preprocessing past 1M tokens/s on two cores.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(backend.to_str())
    model, pre_tokenizer = spec["model"], spec.get("pre_tokenizer") or {}
    steps = pre_tokenizer.get("pretokenizers", [])
    if (model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or model.get("byte_fallback")
            or spec.get("normalizer") not in (None, {"type": "NFC"}) or len(steps) != 2):
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in split.get("pattern", {}) or byte_level.get("type") != "ByteLevel"
            or byte_level.get("use_regex") or byte_level.get("add_prefix_space")):
        return None
    table = _byte_level_translation()
    try:
        ranks = {token.translate(table).encode("latin-1"): index for token, index in model["vocab"].items()}
        pairs = [tuple(part.translate(table).encode("latin-1") for part in (m if isinstance(m, list) else m.split(" ")))
                 for m in model["merges"]]
        merged = [ranks[left + right] for left, right in pairs]
    except (UnicodeEncodeError, KeyError, ValueError):  # not spelled in the byte-level alphabet
        return None
    if np.any(np.diff(np.asarray(merged)) <= 0):
        return None
    specials = {token.content: index for index, token in backend.get_added_tokens_decoder().items()}
    encoding = tiktoken.Encoding(name=name, pat_str=split["pattern"]["Regex"], mergeable_ranks=ranks,
                                 special_tokens=specials)
    # The rank order is necessary, not sufficient (tiktoken would also join two pieces that no merge names), so
    # a vocabulary that is not tiktoken's own must also reproduce the backend on the probe texts.
    for probe in _TWIN_PROBES:
        if encoding.encode_ordinary(probe) != backend.encode(probe, add_special_tokens=False).ids:
            return None
    return encoding, _byte_length_table(ranks, vocab_size)


# Text the tiktoken twin must tokenize exactly as the backend before it is used: ASCII maths and code, LaTeX,
# whitespace runs, digits, accented, CJK, emoji and long runs of one character.
_TWIN_PROBES = (
    "Solve $x^2 - 5x + 6 = 0$. The roots are \\boxed{2} and \\boxed{3}.\n\n  Step 1:\tfactor (x-2)(x-3).",
    "def f(n):\n    return n * (n + 1) // 2  # 1234567890 0.001 -1e-5 3,000,000",
    "\u00dcn\u00efc\u00f6d\u00e9 na\u00efve caf\u00e9 \u2014 \u201cquotes\u201d \u2026 \u00bd \u2264 \u221e \u2211 \u221a\u03c0",
    "\u6570\u5b66\u9898\uff1a\u6c42 1+2+\u2026+100 \u7684\u548c\u3002 \ud55c\uad6d\uc5b4 \u65e5\u672c\u8a9e\u3002",
    "emoji \U0001f600\U0001f44d\U0001f3fd mixed\r\n\u00a0non-breaking\u2009thin   spaces\n\n\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!!!!!! ------------ ======== ~~~~~~",
)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``, or a directory transformers can load).

    Runs are encoded by an identical tiktoken twin when the model allows one (byte-level BPE with a split regex:
    Qwen2, Llama-3-HF), with byte counts from a table; otherwise by the backend, byte counts from its character
    offsets (any normalizer, any model).
    """

    def __init__(self, backend, name: str, bos: Optional[str], eos: Optional[str], pad: Optional[str],
                 use_tiktoken: bool = True):
        from tokenizers import normalizers

        self._backend = backend
        self.name = name
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.bos_id, self.eos_id, self.pad_id = (
            None if token is None else backend.token_to_id(token) for token in (bos, eos, pad)
        )
        self.text_special_tokens = tuple(token.content for token in backend.get_added_tokens_decoder().values())
        self._nfc = isinstance(backend.normalizer, normalizers.NFC)
        self._twin = _tiktoken_twin(backend, Path(name).name, self.vocab_size) if use_tiktoken else None

    @property
    def runs_backend(self) -> str:
        """Which encoder `encode_runs` uses: "tiktoken" or "tokenizers"."""
        return "tokenizers" if self._twin is None else "tiktoken"

    @classmethod
    def from_path(cls, path: Path, use_tiktoken: bool = True) -> "HFTokenizer":
        """Load a ``tokenizer.json`` file, or a directory through transformers (never from a hub)."""
        if path.is_file():
            from tokenizers import Tokenizer as BackendTokenizer

            config_path = path.parent / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.exists() else {}

            def token_name(key: str) -> Optional[str]:
                value = config.get(key)
                return value.get("content") if isinstance(value, dict) else value

            return cls(BackendTokenizer.from_file(str(path)), str(path), token_name("bos_token"),
                       token_name("eos_token"), token_name("pad_token"), use_tiktoken)
        from transformers import AutoTokenizer

        # AutoTokenizer, not Qwen2TokenizerFast(vocab_file=, merges_file=): the latter silently builds a
        # 3-token tokenizer on transformers 5.x (see shared/README.md).
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        return cls(hf.backend_tokenizer, str(path), hf.bos_token, hf.eos_token, hf.pad_token, use_tiktoken)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def normalize(self, text: str) -> str:
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text

    def encode_runs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._twin is not None:
            return _encode_runs_tiktoken(*self._twin, texts)
        lengths = []
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        for text, encoding in zip(texts, encodings):
            if not encoding.ids:
                continue
            char_ends = np.maximum.accumulate(np.array([end for _, end in encoding.offsets], dtype=np.int64))
            char_ends[-1] = len(text)  # trailing characters a token's offsets leave out still belong to it
            byte_ends = np.concatenate(([0], np.cumsum(_utf8_lengths_of_chars(text))))[char_ends]
            # Byte tokens of one character share its offsets: the first gets its bytes, those after it none.
            lengths.append(_spread_character_bytes(np.diff(byte_ends, prepend=0), donor_before=True))
        flat, counts = _flatten_runs([encoding.ids for encoding in encodings])
        return flat, counts, np.concatenate(lengths + [np.zeros(0, dtype=np.int64)])


def _spread_character_bytes(lengths: np.ndarray, donor_before: bool) -> np.ndarray:
    """Give each zero-width token one byte of the multi-byte character it is part of, taken from the token that
    holds the character's bytes (the nearest non-empty one before it, or after it). A token of width 0 overlaps no
    loss span, so the byte tokens of a character at the edge of a response would otherwise go untrained; loss spans
    start and end on character boundaries, so moving bytes within a character never moves a token across one."""
    empty = np.flatnonzero(lengths == 0)
    if not len(empty):
        return lengths
    lengths, was_empty = lengths.copy(), set(empty.tolist())
    order = empty if donor_before else empty[::-1]
    step = -1 if donor_before else 1
    for index in order:
        donor = index + step
        while 0 <= donor < len(lengths) and donor in was_empty:
            donor += step  # an earlier-fixed neighbour of the same character: look past it
        if 0 <= donor < len(lengths) and lengths[donor] > 1:
            lengths[donor] -= 1
            lengths[index] = 1
    return lengths


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (Llama-2). Special tokens are ids only: SentencePiece never parses them in text."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.name = str(path)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = (
            None if index < 0 else index for index in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        )
        self.text_special_tokens = ()

    def token_to_id(self, token: str) -> Optional[int]:
        index = self._sp.piece_to_id(token)
        return index if self._sp.id_to_piece(index) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def _encode_proto(self, texts: list[str]):
        try:
            return self._sp.encode(texts, return_type="proto")
        except (TypeError, ValueError):  # sentencepiece < 0.2.1 spells it out_type="immutable_proto"
            return self._sp.encode(texts, out_type="immutable_proto")

    def encode_runs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        runs, lengths = [], []
        for text, proto in zip(texts, self._encode_proto(list(texts))):
            runs.append([piece.id for piece in proto.pieces])
            byte_ends = np.array([piece.end for piece in proto.pieces], dtype=np.int64)
            if len(byte_ends):
                byte_ends[-1] = len(text.encode("utf-8"))
            # Byte-fallback pieces of one character: the last ends at its end, those before it are empty.
            lengths.append(_spread_character_bytes(np.diff(byte_ends, prepend=0), donor_before=False))
        flat, counts = _flatten_runs(runs)
        return flat, counts, np.concatenate(lengths + [np.zeros(0, dtype=np.int64)])


class TiktokenTokenizer(Tokenizer):
    """Llama-3's tiktoken BPE file (128,000 ranks) plus its 256 special tokens."""

    def __init__(self, path: Path):
        import tiktoken
        import tiktoken.load

        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
        specials = {token: len(ranks) + i for i, token in enumerate(llama3_special_tokens())}
        self._encoding = tiktoken.Encoding(
            name=path.stem, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self._specials = specials
        self.name = str(path)
        self.vocab_size = len(ranks) + len(specials)
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        self.pad_id = None
        self.text_special_tokens = tuple(specials)
        self._byte_table = _byte_length_table(ranks, self.vocab_size)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._specials.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self._encoding.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))

    def encode_runs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _encode_runs_tiktoken(self._encoding, self._byte_table, texts)


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\r?\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a local path, picking the implementation from what the path holds.

    - a directory with ``tokenizer.json`` or ``vocab.json``+``merges.txt``: Hugging Face (via transformers);
    - a ``*.json`` file: a Hugging Face ``tokenizer.json``;
    - a ``.model`` file (or a directory holding only ``tokenizer.model``): tiktoken when its first line is a
      base64 token and a rank, SentencePiece otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
            return HFTokenizer.from_path(path)
        if (path / "tokenizer.model").exists():
            path = path / "tokenizer.model"
        else:
            raise ValueError(f"{path} holds no tokenizer.json, vocab.json+merges.txt or tokenizer.model")
    if path.suffix == ".json":
        loader = HFTokenizer.from_path
    else:
        with open(path, "rb") as handle:
            first_line = handle.readline(256)
        loader = TiktokenTokenizer if _TIKTOKEN_LINE.match(first_line) else SentencePieceTokenizer
    try:
        return loader(path)
    except ImportError:
        raise
    except Exception as error:  # the tokenizers and sentencepiece libraries raise bare Exception / RuntimeError
        raise ValueError(f"tokenizer path {path} is not a {_FILE_KINDS[loader]} ({error})") from None


_FILE_KINDS = {HFTokenizer.from_path: "Hugging Face tokenizer.json", TiktokenTokenizer: "tiktoken rank file",
               SentencePieceTokenizer: "SentencePiece model"}
