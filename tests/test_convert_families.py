"""HF <-> megatron conversion of tiny random Qwen2 (tied / untied, qkv bias, GQA) and Llama-3 (rope scaling) models.

One pool of 2 spawned gloo workers converts every case at several layouts (TP=1, TP=2, PP=2, PP=2 x VPP=2), loads
each result at a *different* TP through the trainer's ``load_weights`` and returns the logits; it also writes a
real trainer checkpoint (with optimizer state) and a reward-model checkpoint. The parent compares with
transformers and exports everything back to HF.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acemath_mcore.runtime.distributed import ParallelConfig, release_model_parallel
from acemath_mcore.runtime.local_workers import run_local_workers
from test_families import tiny_hf_model

TOKENS = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(3))
TP1, TP2 = ParallelConfig(), ParallelConfig(tensor_parallel=2)
PP2, PP2_VPP2 = ParallelConfig(pipeline_parallel=2), ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2)
# name -> (model kind, layers, conversion layout, dtype, layout the converted checkpoint is loaded at)
CONVERSIONS = {
    "qwen2-tied-tp1": ("qwen2-tied", 2, TP1, "fp32", TP2),
    "qwen2-tied-tp2": ("qwen2-tied", 2, TP2, "fp32", TP1),
    "qwen2-untied-tp2": ("qwen2-untied", 2, TP2, "fp32", TP1),
    "qwen2-untied-pp2": ("qwen2-untied", 2, PP2, "fp32", TP2),
    "llama3-tp1": ("llama3", 2, TP1, "fp32", TP2),
    "llama3-tp2": ("llama3", 2, TP2, "fp32", TP1),
    "qwen2-deep-pp2-vpp2": ("qwen2-untied", 4, PP2_VPP2, "fp32", TP2),
    "qwen2-untied-tp2-bf16": ("qwen2-untied", 2, TP2, "bf16", None),
}


def save_tiny_hf_model(kind: str, num_layers: int, directory: Path, max_shard_size: str = "50GB"):
    """The tiny random HF model of test_families, saved as safetensors; returns the model."""
    model, _ = tiny_hf_model(kind, num_layers)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model


def read_hf_tensors(directory: Path) -> dict:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / shard))
    assert tensors.keys() == index["weight_map"].keys()
    return tensors


def read_original_tensors(directory: Path) -> dict:
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    return read_hf_tensors(directory)


def _pool(rank, world_size, root, hf_dirs):
    """Everything that needs megatron's parallel state, in one spawn."""
    from megatron.core import parallel_state

    from acemath_mcore.convert.from_hf import save_rank_shards
    from acemath_mcore.convert.hf_files import HFCheckpoint
    from acemath_mcore.convert.megatron_model import build_weightless_model, load_for_inference, vocab_logits
    from acemath_mcore.models import ModelOptions
    from acemath_mcore.models.families import REWARD_HEAD_WEIGHT
    from acemath_mcore.models.weights import load_full_weights
    from acemath_mcore.runtime import init_distributed
    from acemath_mcore.training import checkpointing
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    root = Path(root)

    def in_layout(parallel, work, *args):
        init_distributed(parallel)
        try:
            return work(*args)
        finally:
            release_model_parallel()

    def empty_dir(path: Path) -> str:  # inside a layout: the process group exists
        path.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        return str(path)

    def convert(source, out, layout, bf16):
        save_rank_shards(source, empty_dir(out), layout, bf16=bf16)

    def converted_logits(arch, checkpoint):
        return vocab_logits(load_for_inference(checkpoint, arch), arch, TOKENS)

    logits = {}
    for name, (kind, layers, layout, dtype, load_layout) in CONVERSIONS.items():
        source = HFCheckpoint(hf_dirs[(kind, layers)])
        out = root / "megatron" / name
        in_layout(layout, convert, source, out, layout, dtype == "bf16")
        if load_layout is not None:
            logits[name] = in_layout(load_layout, converted_logits, source.arch, out)

    source = HFCheckpoint(hf_dirs[("qwen2-untied", 2)])
    full = dict(source.megatron_weights())

    def save_trainer_checkpoint():
        """A real trainer checkpoint (optimizer state included) after one step at learning rate 0,
        which leaves the weights exactly as loaded."""
        engine = Engine(source.arch, TP2, ModelOptions(spec="native"),
                        OptimConfig(lr=0.0), train_steps=1)
        engine.load_full_weights(full)
        batch = {"tokens": TOKENS[:, :-1], "labels": TOKENS[:, 1:], "loss_mask": torch.ones(2, 36),
                 "position_ids": torch.arange(36).expand(2, -1)}
        engine.train_step(SFTTask(), [batch])
        checkpointing.save_checkpoint(root / "trainer", 1, engine.model, engine.optimizer, engine.scheduler,
                                      {"consumed_samples": 2})

    def save_reward_checkpoint():
        """A reward model: the same trunk plus a random scalar head."""
        from megatron.core import dist_checkpointing

        (model,) = build_weightless_model(source.arch, TP2, reward=True)
        head = torch.randn(1, source.arch.hidden_size, generator=torch.Generator().manual_seed(9))
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        load_full_weights(model, {**full, REWARD_HEAD_WEIGHT: head}, tp_rank, 2)
        dist_checkpointing.save(checkpointing.model_sharded_state_dict([model]),
                                empty_dir(root / "megatron" / "reward"))

    in_layout(TP2, save_trainer_checkpoint)
    in_layout(TP2, save_reward_checkpoint)
    return logits if rank == 0 else None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_families")
    hf_dirs, hf_models = {}, {}
    for kind, layers, *_ in CONVERSIONS.values():
        if (kind, layers) not in hf_dirs:
            directory = root / "hf" / f"{kind}-{layers}"
            # The untied Qwen2 goes into several shards with an index; the others are single files.
            hf_models[(kind, layers)] = save_tiny_hf_model(kind, layers, directory,
                                                           "60KB" if kind == "qwen2-untied" else "50GB")
            hf_dirs[(kind, layers)] = str(directory)
    logits = run_local_workers(_pool, 2, str(root), hf_dirs)[0]
    with torch.no_grad():
        reference = {key: model(TOKENS).logits for key, model in hf_models.items()}
    return root, hf_dirs, logits, reference


def test_index_and_shards_are_read(converted):
    _, hf_dirs, _, _ = converted
    assert len(list(Path(hf_dirs[("qwen2-untied", 2)]).glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("name", [n for n, spec in CONVERSIONS.items() if spec[4] is not None])
def test_converted_logits_match_transformers_at_another_layout(converted, name):
    _, _, logits, reference = converted
    kind, layers = CONVERSIONS[name][:2]
    error = (logits[name] - reference[(kind, layers)]).abs().max().item()
    assert error <= 1e-4, f"{name}: max |logit error| {error}"


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_export_round_trip_is_bit_identical(converted, name):
    from acemath_mcore.convert import export_megatron_to_hf

    root, hf_dirs, _, _ = converted
    kind, layers, _, dtype, _ = CONVERSIONS[name]
    out = export_megatron_to_hf(root / "megatron" / name, root / "exported" / name, hf_template=hf_dirs[(kind, layers)],
                                progress=False)
    original = read_original_tensors(Path(hf_dirs[(kind, layers)]))
    exported = read_hf_tensors(out)
    assert exported.keys() == original.keys()
    for tensor_name, tensor in original.items():
        expected = tensor.to(torch.bfloat16) if dtype == "bf16" else tensor
        assert exported[tensor_name].dtype == expected.dtype, tensor_name
        assert torch.equal(exported[tensor_name], expected), tensor_name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == ("bfloat16" if dtype == "bf16" else "float32")


def test_export_of_trainer_checkpoint_ignores_optimizer_state(converted):
    from acemath_mcore.convert import export_megatron_to_hf
    from acemath_mcore.convert.megatron_files import (
        DistCheckpointReader,
        find_prompt_format,
        write_prompt_format,
    )
    from acemath_mcore.training.checkpoint_dirs import resolve_checkpoint_dir
    from acemath_mcore.data.chat_templates import PromptFormat

    root, hf_dirs, _, _ = converted
    hf_dir = hf_dirs[("qwen2-untied", 2)]
    keys = DistCheckpointReader(resolve_checkpoint_dir(root / "trainer")).keys()
    assert any(key.startswith("optimizer.") for key in keys)
    # The trainer records its data's prompt format in the save dir; the export carries it for the HF backends.
    write_prompt_format(root / "trainer", PromptFormat("chatml", "Be brief."), ["data/sft"])
    out = export_megatron_to_hf(root / "trainer", root / "exported" / "trainer", hf_template=hf_dir, dtype="fp32",
                                max_shard_bytes=40_000, progress=False)
    assert find_prompt_format(out, with_save_dir=False) == PromptFormat("chatml", "Be brief.")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2  # bounded shards
    exported, original = read_hf_tensors(out), read_original_tensors(Path(hf_dir))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_reward_model_export_scores_match_sequence_classification(converted):
    import transformers

    from acemath_mcore.convert import export_megatron_to_hf
    from acemath_mcore.convert.verify import verify_conversion

    root, hf_dirs, _, _ = converted
    out = export_megatron_to_hf(root / "megatron" / "reward", root / "exported" / "reward",
                                hf_template=hf_dirs[("qwen2-untied", 2)], progress=False)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == ["Qwen2ForSequenceClassification"] and config.num_labels == 1
    assert "score.weight" in read_hf_tensors(out) and "lm_head.weight" not in read_hf_tensors(out)
    result = verify_conversion(out, root / "megatron" / "reward", prompts=TOKENS.tolist() + [[5, 6, 7]])
    assert result.max_abs_diff <= 1e-4 and result.greedy_agreement == 1.0, result


def test_export_errors_are_clear(converted, tmp_path):
    from acemath_mcore.convert import export_megatron_to_hf

    root, hf_dirs, _, _ = converted
    checkpoint = root / "megatron" / "llama3-tp2"
    with pytest.raises(FileNotFoundError, match="no megatron checkpoint"):
        export_megatron_to_hf(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="cannot tell which model"):
        export_megatron_to_hf(checkpoint, tmp_path / "out")
    with pytest.raises(ValueError, match="has no tensor decoder.layers.0.self_attention.linear_qkv.bias"):
        export_megatron_to_hf(checkpoint, tmp_path / "out", hf_template=hf_dirs[("qwen2-untied", 2)])
    with pytest.raises(ValueError, match="holds 2 decoder layers, the architecture has 32"):
        export_megatron_to_hf(checkpoint, tmp_path / "out", preset="llama3.1-8b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_megatron_to_hf(checkpoint, tmp_path / "full", hf_template=hf_dirs[("llama3", 2)])
