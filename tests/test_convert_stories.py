"""A really trained model (llama2.c stories260K in HF format) through the command-line tools and back.

HF -> megatron at TP=1 (``convert_from_hf.py``) and at TP=2 x PP=2 (library; 5 layers split 3 + 2); both
checkpoints are loaded by the trainer's ``load_weights`` at TP=2 and generate greedily exactly what
transformers' ``generate`` does; both export back to bit-identical HF tensors; ``verify.py`` passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acemath_mcore.runtime.local_workers import run_local_workers
from shared_data import shared_path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"
NEW_TOKENS = 60


def stories_dir() -> Path:
    return shared_path("models/stories260K_hf")


def greedy_generate(model, arch, prompt, max_new_tokens):
    """Greedy continuation, re-running the whole sequence each step: no KV cache to be wrong."""
    import torch

    from acemath_mcore.convert.megatron_model import vocab_logits

    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens.append(int(vocab_logits(model, arch, torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def _generate(rank, world_size, checkpoints, prompt):
    from acemath_mcore.convert.megatron_files import find_model_description
    from acemath_mcore.convert.megatron_model import load_for_inference
    from acemath_mcore.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    generated = {}
    for checkpoint in checkpoints:
        arch = find_model_description(Path(checkpoint))[0]
        generated[checkpoint] = greedy_generate(load_for_inference(checkpoint, arch), arch, prompt, NEW_TOKENS)
    return generated


def run_tool(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "checkpoints_tools" / script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    import sentencepiece

    from acemath_mcore.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("stories")
    tool = run_tool("convert_from_hf.py", "--hf", stories_dir(), "--out", root / "tp1", "--tp", 1)
    assert tool.returncode == 0, tool.stderr[-3000:]
    convert_hf_to_megatron(stories_dir(), root / "tp2pp2", tensor_parallel=2, pipeline_parallel=2)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(stories_dir() / "tokenizer.model"))
    prompt = [tokenizer.bos_id()] + tokenizer.encode(PROMPT)
    checkpoints = [str(root / "tp1"), str(root / "tp2pp2")]
    generated = run_local_workers(_generate, 2, checkpoints, prompt)[0]
    return root, prompt, generated


def test_megatron_greedy_generation_equals_transformers_generate(stories):
    import transformers

    _, prompt, generated = stories
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir(), dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):]
    assert len(expected) == NEW_TOKENS
    for checkpoint, tokens in generated.items():
        assert tokens == expected.tolist(), checkpoint


@pytest.mark.parametrize("layout", ["tp1", "tp2pp2"])
def test_round_trip_to_hf_is_bit_identical(stories, layout):
    import transformers

    from acemath_mcore.convert import export_megatron_to_hf

    root, _, _ = stories
    out = root / f"hf-{layout}"
    if layout == "tp1":
        tool = run_tool("convert_to_hf.py", "--megatron", root / layout, "--out", out, "--no-progress")
        assert tool.returncode == 0, tool.stderr[-3000:]
    else:
        export_megatron_to_hf(root / layout, out, hf_template=stories_dir(), progress=False)
    original = load_file(stories_dir() / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    exported = {}
    for shard in set(index["weight_map"].values()):
        exported.update(load_file(out / shard))
    assert exported.keys() == original.keys()  # tied: no lm_head.weight, like the original
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    assert (out / "tokenizer.model").read_bytes() == (stories_dir() / "tokenizer.model").read_bytes()
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.tie_word_embeddings and config.num_key_value_heads == 4 and config.vocab_size == 512


def test_verify_tool_passes(stories):
    root, _, _ = stories
    tool = run_tool("verify.py", "--hf", stories_dir(), "--megatron", root / "tp2pp2", "--prompt", PROMPT,
                    "--token-ids", "1,2,3,4,5", "--tp", 2)
    assert tool.returncode == 0, tool.stdout + tool.stderr[-3000:]
    report = json.loads(tool.stdout[tool.stdout.index("{"):])
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["greedy_agreement"] == 1.0
    assert report["positions"] == 5 + 5  # BOS + 4 prompt tokens, and the 5 ids
    # Bad input ends with one error line, before any model runs.
    outside = run_tool("verify.py", "--hf", stories_dir(), "--megatron", root / "tp2pp2", "--token-ids", "1,600,2")
    assert outside.returncode == 2
    assert "verify.py: error: prompt 1 holds token ids outside the model's vocabulary of 512: [600]" in outside.stderr
    words = run_tool("verify.py", "--hf", stories_dir(), "--megatron", root / "tp2pp2", "--token-ids", "1,two")
    assert words.returncode == 2 and "--token-ids takes comma-separated integers, got ['1,two']" in words.stderr
    taken = run_tool("convert_from_hf.py", "--hf", stories_dir(), "--out", root / "tp1")
    assert taken.returncode == 2 and "Traceback" not in taken.stderr
    assert f"convert_from_hf.py: error: {root / 'tp1'} exists and is not empty (pass overwrite=True / --overwrite " \
           "to replace it)" in taken.stderr


def test_verify_thresholds_decide_the_exit_code():
    from acemath_mcore.convert.verify import DEFAULT_THRESHOLDS, Comparison

    good = Comparison(max_abs_diff=2e-5, min_cosine=0.9999999, greedy_agreement=1.0, positions=10)
    assert good.failures(*DEFAULT_THRESHOLDS["fp32"]) == []
    bad = Comparison(max_abs_diff=float("nan"), min_cosine=0.5, greedy_agreement=0.9, positions=10)
    assert len(bad.failures(*DEFAULT_THRESHOLDS["fp32"])) == 3


def test_template_that_disagrees_with_the_recorded_architecture_is_refused(stories, tmp_path):
    from acemath_mcore.convert import export_megatron_to_hf

    root, _, _ = stories
    config = json.loads((stories_dir() / "config.json").read_text())
    (tmp_path / "template").mkdir()
    (tmp_path / "template" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    with pytest.raises(ValueError, match="--hf-template describes"):
        export_megatron_to_hf(root / "tp1", tmp_path / "out", hf_template=tmp_path / "template")
