"""The reward model: megatron's GPT trunk with a scalar head in place of the LM head.

AceMath-RM (like Hugging Face's ``*ForSequenceClassification`` with one label) maps the final-normed hidden state
of a response's last token to one number. :class:`RewardGPTModel` is a :class:`GPTModel` built with the same
arguments (so trunk weights and checkpoint keys are the LM's); on the last pipeline stage it drops the output
layer and returns per-token scores ``[b, s]`` from :class:`ScalarHead`. The task then reads each response's
score at its last token (:func:`response_scores`), in padded or packed rows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from acemath_mcore.models.builder import build_model_chunk
from acemath_mcore.models.families import REWARD_HEAD_WEIGHT
from acemath_mcore.runtime import device as device_lib


class ScalarHead(MegatronModule):
    """hidden ``[s, b, h]`` -> score per token ``[b, s]``: one fp32 row vector, no bias (HF's ``score``).

    The weight is replicated across tensor-parallel ranks and stays fp32 in bf16 runs (scores of long responses
    differ by small margins). It starts like HF's classification head, normal with the model's init std, drawn
    from a fixed-seed generator so every rank holds the same replica (a zero head would give the trunk no
    gradient to start from).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(1, config.hidden_size, generator=generator, dtype=torch.float32) * config.init_method_std
        self.weight = torch.nn.Parameter(weight.to(device_lib.current_device()))
        # With sequence parallelism each TP rank sees a slice of the sequence, so the weight's gradient is partial:
        # finalize_model_grads all-reduces parameters flagged like this over TP (as for layer norms).
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scores = F.linear(hidden_states.float(), self.weight).squeeze(-1)
        if self.config.sequence_parallel:
            # Gather only the scores (s x b floats, not the hidden states). Every TP rank then computes the same
            # loss, so the backward keeps this rank's slice of the gradient instead of summing over ranks.
            scores = gather_from_sequence_parallel_region(scores, tensor_parallel_output_grad=False)
        return scores.transpose(0, 1).contiguous()

    def _apply(self, fn, *args, **kwargs):
        # Float16Module casts its whole module to bf16; the head stays fp32 (device moves still apply).
        super()._apply(fn, *args, **kwargs)
        self.weight.data = self.weight.data.float()
        return self


class RewardGPTModel(GPTModel):
    """GPTModel whose last pipeline stage returns per-token reward scores ``[b, s]`` instead of logits.

    Built with ``post_process`` as usual, so the decoder keeps its final norm; the output layer is then removed
    and ``post_process`` cleared, which makes GPTModel return final-normed hidden states (what an intermediate
    pipeline stage returns) for :class:`ScalarHead`. Nothing is tied to the embedding, so no embedding gradients
    travel between the first and last stage.
    """

    # A weights-only load from an SFT checkpoint (which has no head) keeps the freshly initialised head.
    optional_weight_keys = (REWARD_HEAD_WEIGHT,)

    def __init__(self, *args, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        if self.config.context_parallel_size > 1:
            raise ValueError("the reward model reads scores at token positions of the full sequence; "
                             "context parallelism is not supported")
        self.has_reward_head = self.post_process
        if self.has_reward_head:
            del self.output_layer
            self.post_process = False
            self.reward_head = ScalarHead(self.config)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        hidden_states = super().forward(*args, **kwargs)
        return self.reward_head(hidden_states) if self.has_reward_head else hidden_states


build_reward_model_chunk = functools.partial(build_model_chunk, model_class=RewardGPTModel)


def response_scores(token_scores: torch.Tensor, score_index: torch.Tensor, packed: bool) -> torch.Tensor:
    """Each response's score, read at its last real token: ``score_index`` is a position in the single packed
    row (``[1, T]``), or a column of the response's own row in padded form (``[R, S]``)."""
    score_index = score_index.to(token_scores.device)
    if packed:
        return token_scores[0, score_index]
    return token_scores[torch.arange(len(score_index), device=token_scores.device), score_index]
