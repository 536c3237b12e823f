"""Check a conversion numerically: the HF model (transformers) and the megatron checkpoint (megatron-core, loaded
by the trainer's ``load_weights``) run the same prompts and their next-token logits are compared.

Reported per run: the largest absolute logit difference, the smallest cosine similarity between the two logit
vectors of one position, and the fraction of positions whose argmax (greedy next token) agrees.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from acemath_mcore.convert.hf_files import read_hf_config
from acemath_mcore.convert.megatron_files import find_model_description, holds_reward_head
from acemath_mcore.models.arch import ModelArch
from acemath_mcore.models.families import family_for_hf_config
from acemath_mcore.runtime.distributed import ParallelConfig
from acemath_mcore.runtime.local_workers import run_local_workers
from acemath_mcore.training.checkpoint_dirs import resolve_checkpoint_dir

DEFAULT_PROMPTS = (
    "Once upon a time",
    "Question: What is 12 * 7 + 5? Answer:",
    "The derivative of x^3 with respect to x is",
)
# (max |logit difference|, min cosine, min greedy agreement) that a correct conversion stays within.
DEFAULT_THRESHOLDS = {"fp32": (1e-3, 0.99999, 0.99), "bf16": (1.0, 0.999, 0.95)}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    min_cosine: float
    greedy_agreement: float
    positions: int

    def failures(self, max_abs_diff: float, min_cosine: float, min_agreement: float) -> List[str]:
        """Human-readable reasons this comparison fails the thresholds (empty: it passes)."""
        reasons = []
        if not self.max_abs_diff <= max_abs_diff:  # NaN fails too
            reasons.append(f"max |dlogits| {self.max_abs_diff:.3g} > {max_abs_diff:.3g}")
        if not self.min_cosine >= min_cosine:
            reasons.append(f"min cosine {self.min_cosine:.7f} < {min_cosine}")
        if not self.greedy_agreement >= min_agreement:
            reasons.append(f"greedy agreement {self.greedy_agreement:.4f} < {min_agreement}")
        return reasons


def compare_logits(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> Comparison:
    """Compare per-prompt ``[seq, vocab]`` logits position by position."""
    ref = torch.cat([r.float().reshape(-1, r.shape[-1]) for r in reference])
    cand = torch.cat([c.float().reshape(-1, c.shape[-1]) for c in candidate])
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    cosine = torch.nn.functional.cosine_similarity(ref.double(), cand.double(), dim=-1)
    return Comparison(max_abs_diff=(ref - cand).abs().max().item(), min_cosine=cosine.min().item(),
                      greedy_agreement=(ref.argmax(-1) == cand.argmax(-1)).float().mean().item(),
                      positions=ref.shape[0])


def encode_prompts(texts: Sequence[str], tokenizer_path: str | Path) -> List[List[int]]:
    """Token ids of each text, with the tokenizer's BOS in front when it has one."""
    from acemath_mcore.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text)
        if tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id] + ids
        prompts.append(ids)
    return prompts


def random_prompts(vocab_size: int, count: int = 4, length: int = 32, seed: int = 0) -> List[List[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


def megatron_arch(checkpoint: Path, hf_config: Dict) -> ModelArch:
    """The recorded architecture when the converter wrote one, else the HF config's; they must agree."""
    hf_arch = family_for_hf_config(hf_config).arch_from_hf(hf_config)
    recorded, _, _ = find_model_description(checkpoint)
    if recorded is not None and recorded != hf_arch:
        raise ValueError(f"the megatron checkpoint holds {recorded}, but the HF config describes {hf_arch}")
    return hf_arch


def hf_outputs(hf_dir: str | Path, prompts: List[List[int]], dtype: str = "fp32",
               reward: bool = False) -> List[torch.Tensor]:
    """Per-prompt ``[seq, vocab]`` logits, or for a reward model one ``[1, prompts]`` row of scores."""
    import transformers

    auto_class = transformers.AutoModelForSequenceClassification if reward else transformers.AutoModelForCausalLM
    model = auto_class.from_pretrained(str(hf_dir), dtype=_TORCH_DTYPES[dtype], use_safetensors=True,
                                       trust_remote_code=False, local_files_only=True).eval()
    with torch.no_grad():
        outputs = [model(torch.tensor([prompt])).logits[0].float() for prompt in prompts]
    return [torch.cat(outputs)[None]] if reward else outputs


def megatron_outputs(checkpoint: str | Path, arch: ModelArch, prompts: List[List[int]], dtype: str = "fp32",
                     tensor_parallel: int = 1, reward: bool = False) -> List[torch.Tensor]:
    """Same as :func:`hf_outputs`, from the checkpoint loaded by ``tensor_parallel`` CPU processes."""
    return run_local_workers(_megatron_outputs_worker, tensor_parallel, str(checkpoint), arch, prompts,
                             dtype == "bf16", reward)[0]


def _megatron_outputs_worker(rank, world_size, checkpoint, arch, prompts, bf16, reward):
    from acemath_mcore.convert.megatron_model import last_token_scores, load_for_inference, vocab_logits
    from acemath_mcore.runtime import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    try:
        model = load_for_inference(checkpoint, arch, bf16=bf16, reward=reward)
        if reward:
            outputs = [torch.cat([last_token_scores(model, torch.tensor([prompt])) for prompt in prompts])[None]]
        else:
            outputs = [vocab_logits(model, arch, torch.tensor([prompt]))[0] for prompt in prompts]
        return outputs if rank == 0 else None
    finally:
        destroy_distributed()


def verify_conversion(hf_dir: str | Path, megatron_dir: str | Path, prompts: Optional[List[List[int]]] = None,
                      dtype: str = "fp32", tensor_parallel: int = 1) -> Comparison:
    """Run both models on ``prompts`` (default: random ids) and compare their logits. For a reward model the
    prompts' scores form one row: cosine and "greedy agreement" then say whether both pick the same best prompt."""
    checkpoint = resolve_checkpoint_dir(megatron_dir)
    hf_config = read_hf_config(Path(hf_dir))
    arch = megatron_arch(checkpoint, hf_config)
    reward = holds_reward_head(checkpoint)
    prompts = prompts or random_prompts(arch.vocab_size)
    for number, prompt in enumerate(prompts, 1):
        if not prompt:
            raise ValueError(f"prompt {number} is empty")
        bad = [token for token in prompt if not 0 <= token < arch.vocab_size]
        if bad:
            raise ValueError(f"prompt {number} holds token ids outside the model's vocabulary of {arch.vocab_size}: "
                             f"{bad[:5]}")
    # Megatron first, in worker processes that exit before the HF model is loaded: never both in memory.
    candidate = megatron_outputs(checkpoint, arch, prompts, dtype, tensor_parallel, reward)
    reference = hf_outputs(hf_dir, prompts, dtype, reward)
    return compare_logits(reference, candidate)
