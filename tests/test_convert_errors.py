"""Wrong inputs to HF -> megatron conversion fail before any worker process starts, saying what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from test_convert_families import save_tiny_hf_model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_errors")
    save_tiny_hf_model("qwen2-untied", 2, root / "sharded", max_shard_size="60KB")
    save_tiny_hf_model("llama3", 2, root / "single")
    return root


def copy_of(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def convert(hf_dir: Path, out: Path, **kwargs):
    from acemath_mcore.convert import convert_hf_to_megatron

    return convert_hf_to_megatron(hf_dir, out, **kwargs)


def test_unknown_architecture(tiny_dirs, tmp_path):
    hf_dir = copy_of(tiny_dirs / "single", tmp_path / "hf")
    edit_config(hf_dir, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match="unsupported architecture.*MistralForCausalLM"):
        convert(hf_dir, tmp_path / "out")


def test_classifier_with_several_labels_is_refused(tiny_dirs, tmp_path):
    hf_dir = copy_of(tiny_dirs / "single", tmp_path / "hf")
    # transformers gives a classifier two labels when config.json names none
    edit_config(hf_dir, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="a LlamaForSequenceClassification with 2 labels; only one-label"):
        convert(hf_dir, tmp_path / "out")
    edit_config(hf_dir, id2label={"0": "A", "1": "B", "2": "C"})
    with pytest.raises(ValueError, match="with 3 labels"):
        convert(hf_dir, tmp_path / "out")


def test_missing_shard(tiny_dirs, tmp_path):
    hf_dir = copy_of(tiny_dirs / "sharded", tmp_path / "hf")
    victim = sorted(hf_dir.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard\\(s\\) that are not in .*{victim.name}"):
        convert(hf_dir, tmp_path / "out")


def test_missing_tensor(tiny_dirs, tmp_path):
    hf_dir = copy_of(tiny_dirs / "single", tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight missing"):
        convert(hf_dir, tmp_path / "out")


def test_a_layer_tensor_the_mapping_would_drop_is_an_error(tiny_dirs, tmp_path):
    import torch

    hf_dir = copy_of(tiny_dirs / "single", tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # recomputed: may be left behind
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor\(s\) model.layers.0.self_attn.o_proj.bias have no place in "
                                         r"a llama model"):
        convert(hf_dir, tmp_path / "out")


def test_no_safetensors(tiny_dirs, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(tiny_dirs / "single" / "config.json", hf_dir)
    (hf_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors checkpoints are read"):
        convert(hf_dir, tmp_path / "out")


def test_vocab_mismatch(tiny_dirs, tmp_path):
    hf_dir = copy_of(tiny_dirs / "single", tmp_path / "hf")
    edit_config(hf_dir, vocab_size=320)
    with pytest.raises(ValueError, match="vocabulary mismatch: model.embed_tokens.weight has 300 rows but config.json "
                                         "says vocab_size=320"):
        convert(hf_dir, tmp_path / "out")


def test_layouts_that_do_not_fit(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide num_attention_heads=4"):
        convert(tiny_dirs / "single", tmp_path / "out", tensor_parallel=3)
    with pytest.raises(ValueError, match="pipeline_parallel=3 exceeds num_layers=2"):
        convert(tiny_dirs / "single", tmp_path / "out", pipeline_parallel=3)
    with pytest.raises(ValueError, match="virtual pipeline 2 needs"):
        convert(tiny_dirs / "single", tmp_path / "out", pipeline_parallel=2, virtual_pipeline_parallel=2)
    # PP 0 once ran no process and reported an empty checkpoint as written; TP 0 divided by zero.
    for sizes in ({"pipeline_parallel": 0}, {"tensor_parallel": -1}, {"tensor_parallel": 0},
                  {"virtual_pipeline_parallel": 0}):
        (name, value), = sizes.items()
        with pytest.raises(ValueError, match=f"^{name}={value}: must be at least 1$"):
            convert(tiny_dirs / "single", tmp_path / "out", **sizes)
    assert not (tmp_path / "out").exists()


def test_fp16_weights_need_an_explicit_dtype_and_outputs_are_not_overwritten(tiny_dirs, tmp_path):
    hf_dir = copy_of(tiny_dirs / "single", tmp_path / "hf")
    save_file({k: v.half() for k, v in load_file(hf_dir / "model.safetensors").items()}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="stores fp16 weights; choose"):
        convert(hf_dir, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tiny_dirs / "single", tmp_path / "taken")
    assert (tmp_path / "taken" / "file").read_text() == "keep me"


def test_weight_lookups_read_each_hf_tensor_once(tiny_dirs):
    """load_full_weights asks ``name in weights`` before reading each tensor: answering must not read the file."""
    from acemath_mcore.convert.hf_files import HFCheckpoint

    checkpoint = HFCheckpoint(tiny_dirs / "single")
    reads = []
    read = checkpoint.tensor
    checkpoint.tensor = lambda name: reads.append(name) or read(name)
    weights = checkpoint.megatron_weights()
    names = list(weights)
    assert all(name in weights for name in names) and "no.such.tensor" not in weights
    assert reads == []
    for name in names:
        weights[name]
    assert sorted(reads) == sorted(set(reads))  # no HF tensor read twice across all megatron tensors
