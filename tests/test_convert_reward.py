"""Importing a Hugging Face reward model (``*ForSequenceClassification``, one label: how AceMath-RM is published).

Two inputs: the real pretrained stories260K trunk under a seeded scalar head (Llama, tied embeddings), converted
at TP=2 by the command-line tool, and a tiny random Qwen2 (q/k/v biases, untied) converted at PP=2. transformers'
own classifier is the reference: verify.py's scores at another layout, launch/score.py's packed scoring of
rendered conversations, the first loss of an RM training stage started from the import, and the export back to
HF, bit for bit. Evaluation refuses the reward model, as a megatron checkpoint and as an HF directory.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared_data import shared_path
from test_families import tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
STORIES = shared_path("models/stories260K_hf")
CANDIDATES = [
    {"prompt": "Once upon a time, there was a little girl named Lily.",
     "responses": ["She liked to play in the park with her dog.", "The sun was big and the cat ran away.",
                   "Lily"]},
    {"prompt": "Tom had a red ball.", "responses": ["He gave it to his friend Sue, and they played all day."]},
]


def seeded_head(model) -> None:
    """A score head of useful scale (transformers initialises it near zero), the same on every run."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * 0.5)


def stories_reward_model(directory: Path) -> Path:
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(STORIES, num_labels=1,
                                                                            dtype=torch.float32)
    seeded_head(model)
    model.save_pretrained(directory)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(STORIES / name, directory / name)
    return directory


def qwen2_reward_model(directory: Path) -> Path:
    import transformers

    language_model, _ = tiny_hf_model("qwen2-untied")
    config = copy.deepcopy(language_model.config)
    config.num_labels = 1
    model = transformers.Qwen2ForSequenceClassification(config)
    model.model.load_state_dict(language_model.model.state_dict())
    seeded_head(model)
    model.save_pretrained(directory)
    return directory


def run_tool(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from acemath_mcore.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("reward_import")
    stories = stories_reward_model(root / "stories_hf")
    qwen2 = qwen2_reward_model(root / "qwen2_hf")
    # Recorded with the weights: how the model reads prompts (here the plain template, no system turn).
    tool = run_tool("checkpoints_tools/convert_from_hf.py", "--hf", stories, "--out", root / "stories_mc", "--tp", 2,
                    "--template", "plain")
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert "llama reward model" in tool.stderr
    assert f"wrote {root / 'stories_mc'}: a reward model; score with launch/score.py" in tool.stdout
    convert_hf_to_megatron(qwen2, root / "qwen2_mc", pipeline_parallel=2)
    return root


@pytest.mark.parametrize("name, tensor_parallel", [("stories", 1), ("qwen2", 2)])
def test_imported_scores_equal_transformers_at_another_layout(imported, name, tensor_parallel):
    from acemath_mcore.convert.verify import verify_conversion

    prompts = [[1, 200, 22, 87, 9, 251, 5], [1, 17], list(range(3, 60))]
    result = verify_conversion(imported / f"{name}_hf", imported / f"{name}_mc", prompts=prompts,
                               tensor_parallel=tensor_parallel)
    assert result.max_abs_diff <= 1e-5 and result.greedy_agreement == 1.0, result


def test_score_tool_on_the_imported_model_gives_transformers_scores(imported):
    """launch/score.py packs several rendered conversations into one row; each score must be the one the HF
    classifier gives that conversation alone."""
    import transformers

    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
    from acemath_mcore.data.tokenizers import load_tokenizer

    candidates, scored = imported / "candidates.jsonl", imported / "scored.jsonl"
    candidates.write_text("".join(json.dumps(record) + "\n" for record in CANDIDATES))
    tool = run_tool("launch/score.py", "--checkpoint", imported / "stories_mc", "--input", candidates,
                    "--output", scored, "--tokens-per-row", 256, "--no-progress")
    assert tool.returncode == 0, tool.stdout[-3000:] + tool.stderr[-3000:]
    assert "in its recorded format: template 'plain', no system prompt" in tool.stdout  # no --template needed
    records = [json.loads(line) for line in scored.read_text().splitlines()]

    model = transformers.AutoModelForSequenceClassification.from_pretrained(imported / "stories_hf",
                                                                            dtype=torch.float32).eval()
    tokenizer = load_tokenizer(imported / "stories_hf")
    encoder = ConversationEncoder(tokenizer, build_template("plain", tokenizer))
    scores, expected = [], []
    for record in records:
        for response, score in zip(record["responses"], record["pred_score"], strict=True):
            ids = encoder.encode([{"role": "user", "content": record["prompt"]},
                                  {"role": "assistant", "content": response}]).input_ids
            with torch.no_grad():
                expected.append(model(torch.tensor([ids.tolist()])).logits[0, 0].item())
            scores.append(score)
    assert len(scores) == 4
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 0.1  # the responses are told apart, so the comparison means something
    # A pipeline split megatron's build would refuse on every rank with a bare assertion is refused up front.
    tool = run_tool("launch/score.py", "--checkpoint", imported / "stories_mc", "--input", candidates,
                    "--output", imported / "unused.jsonl", "--pipeline-parallel", 2)
    assert tool.returncode == 2 and "--pipeline-parallel 2 does not divide the model's num_layers=5" in tool.stderr


def test_export_gives_back_the_imported_model_bit_for_bit(imported):
    from acemath_mcore.convert import export_megatron_to_hf

    out = export_megatron_to_hf(imported / "qwen2_mc", imported / "qwen2_exported", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    original = load_file(imported / "qwen2_hf" / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    exported = {}
    for shard in sorted(set(index["weight_map"].values())):
        exported.update(load_file(out / shard))
    assert exported.keys() == original.keys() and "score.weight" in exported
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_export_carries_the_recorded_prompt_format_as_the_chat_template(imported):
    """The import recorded the plain template: the export's tokenizer renders conversations with it through
    transformers' apply_chat_template (what vLLM's server and HF users call), as the encoder does."""
    import transformers

    from acemath_mcore.convert import export_megatron_to_hf
    from acemath_mcore.convert.megatron_files import ASSETS_DIR
    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
    from acemath_mcore.data.tokenizers import load_tokenizer

    out = export_megatron_to_hf(imported / "stories_mc", imported / "stories_exported", progress=False)
    jinja = (out / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == jinja
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoder = ConversationEncoder(load_tokenizer(out), build_template("plain", load_tokenizer(out)))
    for record in CANDIDATES:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["responses"][0]}]
        assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == encoder.render_text(messages)
    # Without tokenizer files the plain format has no bos / eos to write: the export still succeeds, without it.
    bare = shutil.copytree(imported / "stories_mc", imported / "stories_mc_bare")
    shutil.rmtree(bare / ASSETS_DIR)
    out = export_megatron_to_hf(bare, imported / "stories_exported_bare", progress=False)
    assert (out / "prompt_format.json").is_file() and not (out / "chat_template.jinja").exists()


def test_head_tensors_that_would_be_dropped_are_refused(imported, tmp_path):
    from acemath_mcore.convert import convert_hf_to_megatron

    hf_dir = shutil.copytree(imported / "qwen2_hf", tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["score.bias"] = torch.zeros(1)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor\(s\) score.bias have no place in a qwen2 model"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    del tensors["score.bias"], tensors["score.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="score.weight missing"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")


def _first_training_loss(rank, world_size, checkpoint, prefix, root):
    from acemath_mcore.recipes import apply_overrides, get_recipe
    from acemath_mcore.training.reward import train_reward_model

    model_config = Path(checkpoint).parent / "stories_hf" / "config.json"  # the HF RM's own config.json
    config = apply_overrides(get_recipe("tiny_rm"), [
        f"model={model_config}", f"data.prefixes=[{prefix}]", "data.seq_length=480",
        f"checkpoint.init_from={checkpoint}", f"checkpoint.save_dir={root}/rm", f"logging.output_dir={root}/runs",
        "train_steps=1", "global_batch_size=1",  # one packed bin holds both groups
    ])
    return train_reward_model(config)["first_loss"]


def test_rm_training_continues_from_the_imported_head(imported, tmp_path):
    """init_from an imported RM keeps its score head (a fresh head would give another loss): the first step's
    listwise Bradley-Terry loss, computed at the initial weights, is the one transformers' scores give."""
    import transformers

    from acemath_mcore.data.chat_templates import ConversationEncoder, build_template
    from acemath_mcore.data.rm_data import RMGroup, RMPreprocessConfig, encode_rm_group, preprocess_rm
    from acemath_mcore.data.tokenizers import load_tokenizer
    from distributed_helpers import run_workers

    groups = [("Lily had a red ball.", ["She played with it all day.", "The ball was blue.", "Lily ran home."],
               [1, 0, 1]),
              ("Tom saw a big dog.", ["The dog was happy.", "Tom was a cat.", "It barked at him.", "No."],
               [1, 0, 1, 0])]
    data = tmp_path / "groups.jsonl"
    data.write_text("".join(json.dumps({"prompt": prompt, "responses": responses, "labels": labels}) + "\n"
                            for prompt, responses, labels in groups))
    stats = preprocess_rm(RMPreprocessConfig(inputs=[str(data)], output_prefix=str(tmp_path / "rm"),
                                             tokenizer=str(imported / "stories_hf"), template="plain"))
    assert stats["groups"] == 2
    (first_loss,) = run_workers(_first_training_loss, 1, str(imported / "stories_mc"), str(tmp_path / "rm"),
                                str(tmp_path))

    model = transformers.AutoModelForSequenceClassification.from_pretrained(imported / "stories_hf",
                                                                            dtype=torch.float64).eval()
    tokenizer = load_tokenizer(imported / "stories_hf")
    encoder = ConversationEncoder(tokenizer, build_template("plain", tokenizer))
    expected = 0.0
    for prompt, responses, labels in groups:
        group = RMGroup("test", [{"role": "user", "content": prompt}], responses, labels)
        with torch.no_grad():
            scores = [model(torch.tensor([sequence.tolist()])).logits[0, 0].item()
                      for sequence in encode_rm_group(encoder, group)]
        pairs = [(p, q) for p in range(len(labels)) for q in range(len(labels)) if labels[p] and not labels[q]]
        expected += -sum(math.log(1 / (1 + math.exp(scores[q] - scores[p]))) for p, q in pairs) / len(pairs)
    assert first_loss == pytest.approx(expected / len(groups), abs=1e-5)


def test_evaluation_refuses_a_reward_model(imported, tmp_path):
    """With tied embeddings an RM's trunk would load into a language model and generate: refused by name."""
    done = run_tool("launch/evaluate.py", "--checkpoint", imported / "stories_mc", "--template", "plain",
                    "--benchmarks", "gsm8k", "--limit", 1, "--max-new-tokens", 4, "--output-dir", tmp_path,
                    "--data-dir", shared_path("data/eval"))
    assert done.returncode != 0
    assert "is a reward model (a scalar head, no LM head): it scores responses (launch/score.py)" in \
        done.stdout + done.stderr
    # ... and so does the transformers backend, given the HF reward model itself
    done = run_tool("launch/evaluate.py", "--backend", "hf", "--checkpoint", imported / "stories_hf", "--template",
                    "plain", "--benchmarks", "gsm8k", "--limit", 1, "--max-new-tokens", 4, "--output-dir", tmp_path,
                    "--data-dir", shared_path("data/eval"))
    assert done.returncode != 0
    assert "is a reward model (*ForSequenceClassification): it scores responses" in done.stderr


def test_a_system_prompt_is_recorded_only_with_its_template(tmp_path):
    done = run_tool("checkpoints_tools/convert_from_hf.py", "--hf", STORIES, "--out", tmp_path / "out",
                    "--system-prompt", "acemath_rm")
    assert done.returncode == 2 and "--system-prompt is recorded with a --template; give both" in done.stderr
    assert not (tmp_path / "out").exists()
