"""Generation throughput: our KV-cached batched Megatron loop vs transformers ``generate`` on the same prompts.

    python benchmarks/generation_speed.py [--hf ../shared/models/stories260K_hf] [--prompts 64] [--new-tokens 128]
    # a real model's shapes with random weights, bf16, ours only; 'auto' = launch/evaluate.py --batch-size auto
    python benchmarks/generation_speed.py --model qwen2.5-7b --prompts 512 --new-tokens 512 --batch-sizes 32,auto

Converts the HF model to a megatron checkpoint in a temp dir, then times greedy generation of ``--new-tokens``
tokens (no stop token) for ``--prompts`` story openings at a few batch sizes, on CUDA when present. With
``--model`` the prompts are random tokens of ``--prompt-lengths`` (uniform), like the benchmarks' chat prompts,
and each run also reports its batches and peak memory. Prints one JSON line per run; results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing
OPENINGS = ["Once upon a time", "Lily had a big red ball", "The dog ran to the", "Tom and Sue went to the park and",
            "One day, a little bird", "The sun was hot, so"]


def _megatron_worker(rank, world_size, source, prompts, new_tokens, batch_sizes):
    """``source``: a checkpoint dir (its weights, fp32) or a preset name (random weights, bf16)."""
    from acemath_mcore.convert.megatron_files import find_model_description
    from acemath_mcore.convert.megatron_model import load_for_inference
    from acemath_mcore.eval.backends import megatron_generator
    from acemath_mcore.eval.generation import SamplingParams
    from acemath_mcore.models import ModelOptions, build_model, get_preset
    from acemath_mcore.runtime import ParallelConfig, init_distributed, peak_memory_bytes, synchronize

    init_distributed(ParallelConfig())
    if Path(source).is_dir():
        arch = find_model_description(Path(source))[0]
        model = load_for_inference(source, arch)
    else:
        arch = get_preset(source)
        model = build_model(arch, ParallelConfig(), ModelOptions(spec="native", bf16=True))[0].eval()
    device = next(model.parameters()).device
    never = [arch.padded_vocab_size]  # no stop token: every row decodes new_tokens
    rows = []
    for batch_size in batch_sizes:
        generator = megatron_generator(model, arch, never, batch_size if batch_size == "auto" else int(batch_size))
        generator.generate(prompts[:8], SamplingParams(max_new_tokens=8))  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
        synchronize()
        seconds = time.perf_counter() - started
        batches = [len(b) for b in generator.batches(sorted(map(len, prompts)), new_tokens)]
        rows.append({"impl": "megatron-kv-cache", "batch": batch_size, "seconds": round(seconds, 2),
                     "tokens_per_s": round(sum(len(g.token_ids) for g in out) / seconds, 1),
                     "batches": len(batches), "largest_batch": max(batches),
                     "budget_gib": round(generator.memory_budget / 2**30, 2) if generator.memory_budget else None,
                     "peak_gib": round(peak_memory_bytes() / 2**30, 2)})
    return rows


def _run_megatron(source, prompts, new_tokens, batch_sizes):
    """On a GPU in this process; on CPU in a worker process (run_local_workers installs the CPU shim there, and
    forces the CPU path, so it cannot measure a GPU)."""
    from acemath_mcore.runtime.device import cuda_available
    from acemath_mcore.runtime.local_workers import run_local_workers

    if cuda_available():
        return _megatron_worker(0, 1, source, prompts, new_tokens, batch_sizes)
    return run_local_workers(_megatron_worker, 1, source, prompts, new_tokens, batch_sizes)[0]


def _transformers(hf_dir, prompts, new_tokens, batch_sizes):
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False).to(device).eval()
    rows = []
    for batch_size in batch_sizes:
        started, produced = time.perf_counter(), 0
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
            mask = (torch.arange(width, device=device) >= torch.tensor([width - len(p) for p in batch],
                                                                       device=device)[:, None]).long()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            produced += (out.shape[1] - width) * len(batch)
        seconds = time.perf_counter() - started
        rows.append({"impl": "transformers", "batch": batch_size, "seconds": round(seconds, 2),
                     "tokens_per_s": round(produced / seconds, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", default=str(REPO.parent / "shared" / "models" / "stories260K_hf"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma list of row counts or 'auto'")
    parser.add_argument("--model", help="a preset's shapes with random weights instead of --hf (ours only)")
    parser.add_argument("--prompt-lengths", default="100,400", help="with --model: MIN,MAX prompt tokens")
    args = parser.parse_args()
    batch_sizes = args.batch_sizes.split(",")
    if args.model:
        from acemath_mcore.models import get_preset

        vocab, random = get_preset(args.model).vocab_size, torch.Generator().manual_seed(0)
        low, high = map(int, args.prompt_lengths.split(","))
        prompts = [torch.randint(0, vocab, (int(n),), generator=random).tolist()
                   for n in torch.randint(low, high + 1, (args.prompts,), generator=random)]
        rows = _run_megatron(args.model, prompts, args.new_tokens, batch_sizes)
        for row in rows:
            print(json.dumps({"model": args.model, "prompts": args.prompts, "prompt_lengths": args.prompt_lengths,
                              "new_tokens": args.new_tokens, "device": _device_name(), **row}))
        return
    import sentencepiece

    from acemath_mcore.convert import convert_hf_to_megatron

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(Path(args.hf) / "tokenizer.model"))
    prompts = [[tokenizer.bos_id()] + tokenizer.encode(OPENINGS[i % len(OPENINGS)]) for i in range(args.prompts)]
    batch_sizes = [int(b) for b in batch_sizes]
    with tempfile.TemporaryDirectory() as scratch:
        convert_hf_to_megatron(args.hf, Path(scratch) / "megatron")
        rows = _run_megatron(str(Path(scratch) / "megatron"), prompts, args.new_tokens, batch_sizes)
    rows += _transformers(args.hf, prompts, args.new_tokens, batch_sizes)
    for row in rows:
        print(json.dumps({"model": Path(args.hf).name, "prompts": args.prompts, "new_tokens": args.new_tokens,
                          "device": _device_name(), **row}))


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
