"""Generation throughput: our KV-cached batched Megatron loop vs transformers ``generate`` on the same prompts.

    python benchmarks/generation_speed.py [--hf ../shared/models/stories260K_hf] [--prompts 64] [--new-tokens 128]

Converts the HF model to a megatron checkpoint in a temp dir, then times greedy generation of ``--new-tokens``
tokens (no stop token) for ``--prompts`` story openings at a few batch sizes, on CUDA when present. Prints one
JSON line per run; results go to docs/benchmarks.md.
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


def _megatron_worker(rank, world_size, checkpoint, prompts, new_tokens, batch_sizes):
    from acemath_mcore.convert.megatron_files import find_model_description
    from acemath_mcore.convert.megatron_model import load_for_inference
    from acemath_mcore.eval.generation import MegatronGenerator, SamplingParams
    from acemath_mcore.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    arch = find_model_description(Path(checkpoint))[0]
    model = load_for_inference(checkpoint, arch)
    rows = []
    for batch_size in batch_sizes:
        generator = MegatronGenerator(model, arch, stop_ids=[-1], max_batch_size=batch_size)
        generator.generate(prompts[:batch_size], SamplingParams(max_new_tokens=8))  # warm-up
        started = time.perf_counter()
        out = generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
        seconds = time.perf_counter() - started
        rows.append({"impl": "megatron-kv-cache", "batch": batch_size, "seconds": round(seconds, 2),
                     "tokens_per_s": round(sum(len(g.token_ids) for g in out) / seconds, 1)})
    return rows


def _transformers(hf_dir, prompts, new_tokens, batch_sizes):
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
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
    parser.add_argument("--batch-sizes", default="1,16,64")
    args = parser.parse_args()
    import sentencepiece

    from acemath_mcore.convert import convert_hf_to_megatron
    from acemath_mcore.runtime.local_workers import run_local_workers

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(Path(args.hf) / "tokenizer.model"))
    prompts = [[tokenizer.bos_id()] + tokenizer.encode(OPENINGS[i % len(OPENINGS)]) for i in range(args.prompts)]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        convert_hf_to_megatron(args.hf, Path(scratch) / "megatron")
        rows = run_local_workers(_megatron_worker, 1, str(Path(scratch) / "megatron"), prompts, args.new_tokens,
                                 batch_sizes)[0]
    rows += _transformers(args.hf, prompts, args.new_tokens, batch_sizes)
    for row in rows:
        print(json.dumps({"model": Path(args.hf).name, "prompts": args.prompts, "new_tokens": args.new_tokens,
                          "device": "cuda" if torch.cuda.is_available() else "cpu", **row}))


if __name__ == "__main__":
    main()
