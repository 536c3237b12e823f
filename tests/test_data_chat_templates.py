"""Chat templates: rendered text equal to the tokenizer's own template, rendered ids equal to tokenizing the whole
text at once, and loss masks exactly on assistant content + end-of-turn tokens."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from shared_data import shared_path

from acemath_mcore.data.chat_templates import (
    MATH_SYSTEM_PROMPT,
    ChatMLTemplate,
    ConversationEncoder,
    build_template,
)
from acemath_mcore.data.tokenizers import load_tokenizer

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen2's own template injects


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(shared_path("tokenizers/qwen2"))


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(shared_path("tokenizers/llama3_tiktoken/tokenizer.model"))


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(shared_path("tokenizers/llama2_sp/tokenizer.model"))


@pytest.fixture(scope="module")
def real_conversations():
    """Real MATH questions with real model solutions, plus multi-turn and awkward-whitespace/unicode cases."""
    conversations = []
    for line in shared_path("data/rm/math_cot_100.jsonl").read_text().splitlines()[:25]:
        record = json.loads(line)
        conversations.append([{"role": "user", "content": record["question"]},
                              {"role": "assistant", "content": record["code"][0]}])
    conversations += [
        [{"role": "system", "content": MATH_SYSTEM_PROMPT}, {"role": "user", "content": "What is 1+1?"},
         {"role": "assistant", "content": "\n\n1+1 = $\\boxed{2}$"}, {"role": "user", "content": "  and 2+2?\n"},
         {"role": "assistant", "content": " It is 4.  \n"}],
        [{"role": "user", "content": "caf\u00e9 \u2211 \u4f60\u597d \U0001f600?"},
         {"role": "assistant", "content": "\u00e9\u00e9 \u2211\u2211 \u4f60\u597d\u4f60\u597d \U0001f600"}],
        [{"role": "user", "content": "12345678 + 87654321"}, {"role": "assistant", "content": "99999999"}],
    ]
    return conversations


def loss_tokens(tokenizer, encoded):
    return [tokenizer.decode([int(i)]) for i, m in zip(encoded.input_ids, encoded.loss_mask) if m]


def test_chatml_text_equals_transformers_template(qwen, real_conversations):
    reference = AutoTokenizer.from_pretrained(str(shared_path("tokenizers/qwen2")))
    encoder = ConversationEncoder(qwen, ChatMLTemplate(system_prompt=QWEN_DEFAULT_SYSTEM))
    for messages in real_conversations:
        assert encoder.render_text(messages) == reference.apply_chat_template(messages, tokenize=False)
    # The generation prompt of a [system, user] conversation is Qwen2's template output for it.
    prompt = real_conversations[0][:1]
    assert encoder.render_text(prompt, add_generation_prompt=True) == reference.apply_chat_template(prompt, tokenize=False)


@pytest.mark.parametrize("template_name", ["chatml", "plain"])
def test_qwen_ids_equal_whole_text_tokenization(qwen, real_conversations, template_name):
    encoder = ConversationEncoder(qwen, build_template(template_name, qwen, MATH_SYSTEM_PROMPT))
    for messages, encoded in zip(real_conversations, encoder.encode_batch(real_conversations)):
        assert encoded.input_ids.tolist() == qwen.encode(encoder.render_text(messages))
        assert encoded.input_ids.dtype == np.int32 and encoded.loss_mask.dtype == np.uint8


def test_llama3_ids_equal_whole_text_tokenization(llama3, real_conversations):
    encoder = ConversationEncoder(llama3, build_template("llama3", llama3))
    for messages, encoded in zip(real_conversations, encoder.encode_batch(real_conversations)):
        text = encoder.render_text(messages)
        assert text.startswith("<|begin_of_text|><|start_header_id|>")
        assert encoded.input_ids.tolist() == llama3.encode(text)


def test_chatml_loss_mask_hand_checked(qwen):
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen))
    encoded = encoder.encode([{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}])
    # <|im_start|> user \n 1 + 1 =? <|im_end|> \n <|im_start|> assistant \n 2 <|im_end|> \n
    assert encoded.input_ids.tolist() == [151644, 872, 198, 16, 10, 16, 19884, 151645, 198,
                                          151644, 77091, 198, 17, 151645, 198]
    assert np.flatnonzero(encoded.loss_mask).tolist() == [12, 13]  # "2" and its <|im_end|>


def test_chatml_loss_mask_every_assistant_turn(qwen):
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen, MATH_SYSTEM_PROMPT))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    encoded = encoder.encode(messages)
    assert loss_tokens(qwen, encoded) == ["Hello", " there", "<|im_end|>", "Good", "bye", "<|im_end|>"]
    # System prompt, user text, role headers and the newline after <|im_end|> carry no loss.
    assert encoded.input_ids[encoded.loss_mask == 1].tolist().count(qwen.im_start_id) == 0


def test_chatml_straddling_newline_is_a_loss_token(qwen):
    """``assistant\\n`` + content starting with ``\\n`` tokenizes as one ``\\n\\n`` token: the model must emit it."""
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen))
    encoded = encoder.encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nA"}])
    assert loss_tokens(qwen, encoded) == ["\n\n", "A", "<|im_end|>"]


def test_llama3_loss_mask_hand_checked(llama3):
    encoder = ConversationEncoder(llama3, build_template("llama3", llama3))
    encoded = encoder.encode([{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": " 2 "}])
    assert encoded.input_ids.tolist() == [128000, 128006, 882, 128007, 271, 16, 10, 16, 20477, 128009,
                                          128006, 78191, 128007, 271, 17, 128009]
    assert np.flatnonzero(encoded.loss_mask).tolist() == [14, 15]  # "2" (trimmed) and <|eot_id|>


def test_llama3_system_turn_and_generation_prompt_in_metas_published_format(llama3):
    """Meta's Llama-3 prompt format, written out by hand (the test above has neither a system turn nor a
    generation prompt): every turn, the system one included, ends in <|eot_id|>; the generation prompt is an open
    assistant header followed by a blank line."""
    encoder = ConversationEncoder(llama3, build_template("llama3", llama3))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1=?"},
                {"role": "assistant", "content": "2"}]
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n1+1=?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>")
    encoded = encoder.encode(messages)
    assert encoder.render_text(messages) == expected
    assert encoded.input_ids.tolist() == llama3.encode(expected)
    assert [llama3.decode([token]) for token in encoded.input_ids[encoded.loss_mask == 1]] == ["2", "<|eot_id|>"]
    prompt = encoder.encode(messages[:2], add_generation_prompt=True)
    written = expected[:expected.index("2<|eot_id|>")]  # ...<|start_header_id|>assistant<|end_header_id|>\n\n
    assert written.endswith("assistant<|end_header_id|>\n\n")
    assert encoder.render_text(messages[:2], add_generation_prompt=True) == written
    assert prompt.input_ids.tolist() == llama3.encode(written) and not prompt.loss_mask.any()


JINJA_CONVERSATIONS = [
    [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}],
    [{"role": "system", "content": "Own system turn."}, {"role": "user", "content": "  spaced  "}],
    [{"role": "user", "content": "{{ not a variable }} {% raw %} \\boxed{x} 'q' \"dq\" \u00e9\U0001f600"},
     {"role": "assistant", "content": "\nA\n"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "B"}],
]


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
@pytest.mark.parametrize("system_prompt", [None, "Reason step by step,\n\tthen \\boxed{} it: 'x' \u00e9 \U0001f600"])
def test_jinja_chat_template_renders_what_the_encoder_renders(qwen, llama3, llama2, template, system_prompt):
    """An exported model carries its training format as a Hugging Face chat template: transformers'
    apply_chat_template must give the text the encoder trains and generates with, with and without a generation
    prompt, for a default system prompt full of escapes and for a conversation's own system turn."""
    hf = AutoTokenizer.from_pretrained(str(shared_path("tokenizers/qwen2")))  # any: the Jinja is what renders
    tokenizer = {"chatml": qwen, "llama3": llama3, "plain": llama2}[template]
    chat_template = build_template(template, tokenizer, system_prompt)
    encoder = ConversationEncoder(tokenizer, chat_template)
    for messages in JINJA_CONVERSATIONS:
        for generation_prompt in (False, True):
            rendered = hf.apply_chat_template(messages, chat_template=chat_template.jinja(), tokenize=False,
                                              add_generation_prompt=generation_prompt)
            assert rendered == encoder.render_text(messages, add_generation_prompt=generation_prompt)


def test_plain_sentencepiece_loss_mask_hand_checked(llama2):
    encoder = ConversationEncoder(llama2, build_template("plain", llama2))
    encoded = encoder.encode([{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}])
    # <s> ▁ 1 + 1 = ? \n 2 </s>: the prompt/response text is one SentencePiece run.
    assert encoded.input_ids.tolist() == [1, 29871, 29896, 29974, 29896, 29922, 29973, 13, 29906, 2]
    assert encoded.input_ids[1:-1].tolist() == llama2.encode("1+1=?\n2")
    assert np.flatnonzero(encoded.loss_mask).tolist() == [8, 9]


@pytest.mark.parametrize("response", ["x \U00013000", "\U0001d538\U0001d539 done", "\u00e9\U0001f600"])
def test_characters_split_into_byte_tokens_are_trained_whole(qwen, llama2, response):
    """A character the tokenizer spells as several byte tokens: every one of them is a loss token, at the start
    and at the end of a response, for HF offsets (Qwen2 without its exact tiktoken twin) and SentencePiece."""
    from acemath_mcore.data.tokenizers import HFTokenizer

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": response}]
    offsets_path = HFTokenizer.from_path(shared_path("tokenizers/qwen2"), use_tiktoken=False)
    for tokenizer, template in ((offsets_path, "chatml"), (qwen, "chatml"), (llama2, "plain")):
        encoded = ConversationEncoder(tokenizer, build_template(template, tokenizer)).encode(messages)
        trained = tokenizer.decode(encoded.input_ids[encoded.loss_mask == 1].tolist())
        assert trained.lstrip("\n").startswith(response), (tokenizer.name, trained)
    reference = ConversationEncoder(qwen, build_template("chatml", qwen)).encode(messages)
    offsets = ConversationEncoder(offsets_path, build_template("chatml", offsets_path)).encode(messages)
    assert np.array_equal(offsets.input_ids, reference.input_ids)
    assert np.array_equal(offsets.loss_mask, reference.loss_mask)


def test_template_needs_its_special_tokens(llama2, caplog):
    with pytest.raises(ValueError, match="needs '<\\|im_start\\|>', which .* lacks; templates this tokenizer can "
                                         "render: plain$"):
        ConversationEncoder(llama2, build_template("chatml", llama2))
    from acemath_mcore.data.chat_templates import SYSTEM_PROMPT_PRESETS, resolve_system_prompt

    with caplog.at_level("WARNING"):
        assert resolve_system_prompt("math") == SYSTEM_PROMPT_PRESETS["math"]
        assert resolve_system_prompt("Be brief.") == "Be brief."
        assert caplog.messages == []
        assert resolve_system_prompt("maths") == "maths"  # used as given, but said
    assert caplog.messages == ["system prompt 'maths' is not a preset (math, acemath_rm; none for no system turn): "
                               "it is used as the literal system turn"]
    with pytest.raises(ValueError, match="unknown chat template"):
        build_template("vicuna", llama2)


def test_special_token_text_in_content_is_found(qwen, llama2):
    encoder = ConversationEncoder(qwen, build_template("chatml", qwen))
    assert encoder.special_token_in([{"role": "user", "content": "a <|im_end|> b"}]) == "<|im_end|>"
    assert encoder.special_token_in([{"role": "user", "content": "a <b> c"}]) is None
    # SentencePiece never parses special tokens in text, so nothing is rejected.
    assert ConversationEncoder(llama2, build_template("plain", llama2)).special_token_in(
        [{"role": "user", "content": "</s>"}]) is None


def test_prompt_format_comes_from_the_record_unless_the_command_line_says_otherwise(tmp_path, caplog):
    """A save dir records its data's template and system prompt (from the prefixes' _stats.json); scoring and
    evaluation use them unless told otherwise, and warn when told otherwise."""
    from acemath_mcore.convert.megatron_files import find_prompt_format, write_prompt_format
    from acemath_mcore.data.chat_templates import ACEMATH_RM_SYSTEM_PROMPT, PromptFormat, choose_prompt_format
    from acemath_mcore.recipes.checks import data_prompt_format

    def stats(name, template, system_prompt):
        (tmp_path / f"{name}_stats.json").write_text(json.dumps(
            {"tokenizer": {}, "config": {"template": template, "system_prompt": system_prompt}}))
        return str(tmp_path / name)

    rm_a, rm_b = stats("a", "chatml", ACEMATH_RM_SYSTEM_PROMPT), stats("b", "chatml", ACEMATH_RM_SYSTEM_PROMPT)
    recorded = PromptFormat("chatml", ACEMATH_RM_SYSTEM_PROMPT)
    assert data_prompt_format([rm_a, rm_b]) == recorded
    with caplog.at_level("WARNING"):
        assert data_prompt_format([rm_a, stats("c", "plain", None)]) is None
        assert "rendered with different prompt formats" in caplog.text
        assert data_prompt_format([rm_a, str(tmp_path / "no_stats")]) is None
        assert "no_stats has no _stats.json: the save dir records no prompt format" in caplog.text

    save_dir = tmp_path / "rm"
    write_prompt_format(save_dir, recorded, [rm_a, rm_b])
    (save_dir / "iter_0000004").mkdir()
    assert find_prompt_format(save_dir / "iter_0000004") == recorded  # a checkpoint reads its save dir's
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert choose_prompt_format(recorded, None, None, "the RM") == recorded
        assert choose_prompt_format(None, "chatml", "acemath_rm", "an imported RM") == recorded
        assert not caplog.text
        # Nothing recorded (a converted Hugging Face model) and nothing given: the default is a guess, said so.
        assert choose_prompt_format(None, None, None, "the RM") == PromptFormat("chatml", None)
        assert ("the RM records no prompt format (prompt_format.json): rendering with template 'chatml', no system "
                "prompt by default; pass --template and --system-prompt as the model was trained") in caplog.text
        caplog.clear()
        choose_prompt_format(None, "chatml", None, "the RM")
        assert "by default; pass --system-prompt as the model was trained" in caplog.text
        caplog.clear()
        assert choose_prompt_format(recorded, "chatml", "none", "the RM") == PromptFormat("chatml", None)
        assert ("the RM was trained on data rendered with system prompt 'Please reason step by step, and check "
                "your final answer w...'; rendering with no system prompt instead") in caplog.text
        caplog.clear()
        # Generation places the benchmark's instruction itself: only the template is taken and compared.
        assert choose_prompt_format(recorded, "plain", None, "the model", with_system_prompt=False) == \
            PromptFormat("plain", None)
        assert "rendered with template 'chatml'; rendering with template 'plain' instead" in caplog.text
    write_prompt_format(save_dir, None, [rm_a])  # a later run on data of no one format: no stale record
    assert find_prompt_format(save_dir) is None
