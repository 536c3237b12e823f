"""Tokenizers on the real files in ../shared: expected ids, special ids, vocab checks, and the fast run encoders
agreeing with the reference encoders on real math text."""

import json
import shutil
import unicodedata

import numpy as np
import pytest
import sentencepiece

from shared_data import shared_path

from acemath_mcore.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    check_vocab_fits,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(shared_path("tokenizers/qwen2"))


@pytest.fixture(scope="module")
def real_texts():
    """Real benchmark questions and model solutions: LaTeX, unicode, long chains of thought."""
    texts = []
    for path in sorted(shared_path("data/eval").glob("*/test.jsonl")):
        for line in path.read_text().splitlines()[:150]:
            record = json.loads(line)
            texts.append(record.get("question") or record.get("problem"))
    for line in shared_path("data/rm/math_cot_100.jsonl").read_text().splitlines()[:40]:
        texts.extend(json.loads(line)["code"])
    return texts


def test_qwen2_ids_and_special_tokens(qwen):
    assert isinstance(qwen, HFTokenizer) and qwen.runs_backend == "tiktoken"
    assert qwen.encode("Hello <|im_start|>user\n1+1=?<|im_end|>") == [
        9707, 220, 151644, 872, 198, 16, 10, 16, 19884, 151645]
    assert qwen.vocab_size == 151_646  # 151,643 ranks + 3 added tokens
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (None, 151645, 151643)
    assert (qwen.im_start_id, qwen.im_end_id) == (151644, 151645)
    assert set(qwen.text_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_qwen2_tiktoken_runs_equal_tokenizers_runs(qwen, real_texts):
    reference = HFTokenizer.from_path(shared_path("tokenizers/qwen2"), use_tiktoken=False)
    assert reference.runs_backend == "tokenizers"
    # encode_runs takes normalised text (the conversation encoder normalises every piece first).
    extra = ["e\u0301t\u00e9 \u2211 x\n\n  y", "", "   ", "12345"]
    texts = [qwen.normalize(t) for t in real_texts + extra]
    fast, slow = qwen.encode_runs(texts), reference.encode_runs(texts)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])
    for _, counts, byte_counts in (fast, slow):
        per_text = np.add.reduceat(byte_counts, np.concatenate(([0], np.cumsum(counts)[:-1])))
        per_text[counts == 0] = 0
        assert per_text.tolist() == [len(t.encode("utf-8")) for t in texts]
    assert fast[0].size > 200_000
    # And each run equals the backend's own whole-text encoding.
    offsets = np.concatenate(([0], np.cumsum(fast[1])))
    for index in range(0, len(texts), 97):
        assert fast[0][offsets[index]:offsets[index + 1]].tolist() == qwen.encode(texts[index])


def test_qwen2_nfc_normalisation(qwen):
    decomposed = "e\u0301"
    assert qwen.normalize(decomposed) == unicodedata.normalize("NFC", decomposed) == "\u00e9"
    assert qwen.encode(decomposed) == qwen.encode("\u00e9")


def test_tokenizer_json_file(tmp_path, qwen):
    qwen._backend.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(shared_path("tokenizers/qwen2/tokenizer_config.json"), tmp_path / "tokenizer_config.json")
    for path in (tmp_path / "tokenizer.json", tmp_path):
        loaded = load_tokenizer(path)
        assert isinstance(loaded, HFTokenizer) and loaded.runs_backend == "tiktoken"
        assert loaded.vocab_size == qwen.vocab_size
        assert (loaded.eos_id, loaded.pad_id) == (151645, 151643)
        assert loaded.encode("Hello <|im_start|>user\n1+1=?<|im_end|>") == qwen.encode("Hello <|im_start|>user\n1+1=?<|im_end|>")


def test_the_tiktoken_twin_is_refused_where_it_would_tokenize_differently(tmp_path, qwen):
    """Qwen2's spec with the byte-level step adding a prefix space: tiktoken cannot do that, so the runs must come
    from the backend and equal its own encoding ("Hello world" gets a leading-space token there)."""
    spec = json.loads(qwen._backend.to_str())
    spec["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shifted = HFTokenizer.from_path(tmp_path / "tokenizer.json")
    assert shifted.runs_backend == "tokenizers"
    ids = shifted.encode("Hello world")
    assert ids != qwen.encode("Hello world")
    assert shifted.encode_runs(["Hello world"])[0].tolist() == ids


def test_llama2_sentencepiece(real_texts):
    path = shared_path("tokenizers/llama2_sp/tokenizer.model")
    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.encode("Hello world! 1+1=?") == [15043, 3186, 29991, 29871, 29896, 29974, 29896, 29922, 29973]
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (32000, 1, 2, None)
    assert tokenizer.token_to_id("</s>") == 2 and tokenizer.token_to_id("<|im_start|>") is None
    assert tokenizer.pad_or_eos_id == 2
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
    texts = real_texts[::20] + ["h\u00e9llo w\u00f6rld \u2211\n\n  x"]
    flat, counts, byte_counts = tokenizer.encode_runs(texts)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    for index, text in enumerate(texts):
        assert flat[offsets[index]:offsets[index + 1]].tolist() == reference.encode(text)
        assert byte_counts[offsets[index]:offsets[index + 1]].sum() == len(text.encode("utf-8"))


def test_llama3_tiktoken_special_tokens_and_pattern(real_texts):
    tokenizer = load_tokenizer(shared_path("tokenizers/llama3_tiktoken/tokenizer.model"))
    assert isinstance(tokenizer, TiktokenTokenizer)
    assert tokenizer.vocab_size == 128_256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (128000, 128001, None)
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|reserved_special_token_4|>": 128008,
                "<|eot_id|>": 128009, "<|reserved_special_token_5|>": 128010, "<|reserved_special_token_250|>": 128255}
    assert {name: tokenizer.token_to_id(name) for name in expected} == expected
    assert len(tokenizer.text_special_tokens) == 256
    # Llama-3's pattern groups digits by three (Qwen2's splits every digit).
    assert tokenizer.encode("<|begin_of_text|>Hello world 12345") == [128000, 9906, 1917, 220, 4513, 1774]
    flat, counts, byte_counts = tokenizer.encode_runs(real_texts[:50])
    assert byte_counts.sum() == sum(len(t.encode("utf-8")) for t in real_texts[:50])
    assert flat[:counts[0]].tolist() == tokenizer.encode(real_texts[0])
    assert flat.max() < 128_000  # runs never produce special ids


def test_check_vocab_fits(qwen):
    check_vocab_fits(qwen, 151_936)  # Qwen2 checkpoints pad the embedding to 151,936 rows
    check_vocab_fits(qwen, 151_646)
    with pytest.raises(ValueError, match=r"151646 ids .* only 32000 rows"):
        check_vocab_fits(qwen, 32_000)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    config = tmp_path / "config.json"  # a model's config.json passed as --tokenizer by mistake
    config.write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(ValueError, match=rf"tokenizer path {config} is not a Hugging Face tokenizer.json \("):
        load_tokenizer(config)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x00\x01not a sentencepiece model")
    with pytest.raises(ValueError, match=rf"tokenizer path {weights} is not a SentencePiece model \("):
        load_tokenizer(weights)
