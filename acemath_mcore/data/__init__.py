"""Data pipeline for AceMath SFT and reward-model training (see docs/data.md).

Modules (imported explicitly; this package imports nothing so that, e.g., loading a tokenizer does not pull in
torch and megatron):
- tokenizers: Hugging Face / SentencePiece / Llama-3 tiktoken behind one interface, ``check_vocab_fits``;
- chat_templates: ChatML, Llama-3 and plain templates → (input_ids, loss_mask);
- jsonl: reading and validating conversation JSONL with ``file:line`` locations;
- preprocess: the multiprocess JSONL → megatron IndexedDataset pipeline (``launch/preprocess.py sft``);
- indexed: the on-disk formats (tokens + loss mask; RM groups + labels);
- curation, decontamination: data-curation steps of the pipeline;
- packing: best-fit-decreasing packing and the packed / padded micro-batch contract;
- datasets: blended documents, packed / padded datasets, the resumable data-parallel sampler;
- rm_data: reward-model groups, score-sorted selection, RM batches (``launch/preprocess.py rm``).
"""
