"""Generation with the Megatron model (KV cache, batching, TP, DP) against transformers, and the sampling rules.

The model is the real stories260K (llama2.c, HF format in ../shared) converted to a megatron checkpoint. The
reference is transformers' ``generate`` on the HF weights, one prompt at a time (no padding, no batching), so
the batched, KV-cached, row-compacting loop is checked against an independent implementation. A stop token that
is frequent in this model's text (".") makes rows finish at different steps, which exercises compaction.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acemath_mcore.eval.generation import DecodeMemory, Generation, SamplingParams, memory_sized_batches, sample_next
from distributed_helpers import run_workers
from launch_scripts import launch_main
from shared_data import shared_path

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Once upon a time", "Lily had a big red ball and she liked to", "The dog", "Hi",
         "One day, Tom went to the park with his mom. They saw a big tree and", "Sue was sad because"]
NEW_TOKENS = 20


def stories_dir() -> Path:
    return shared_path("models/stories260K_hf")


def _generate_worker(rank, world_size, checkpoint, prompts, stop_id, tensor_parallel):
    from acemath_mcore.convert.megatron_files import find_model_description
    from acemath_mcore.eval.backends import MegatronBackend
    from acemath_mcore.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=tensor_parallel))
    arch = find_model_description(Path(checkpoint))[0]
    backend = MegatronBackend(checkpoint, arch, [stop_id], max_batch_size=4)
    greedy = backend.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), 0, lambda *_: None)
    sampled = [backend.generate(prompts, SamplingParams(NEW_TOKENS, temperature=1.0, top_p=0.9), seed,
                                lambda *_: None) for seed in (5, 5, 6)]
    top1 = backend.generate(prompts, SamplingParams(NEW_TOKENS, temperature=0.7, top_k=1), 9, lambda *_: None)
    return {"greedy": greedy, "sampled": sampled, "top1": top1,
            **_memory_sized_runs(checkpoint, backend, arch, prompts, stop_id)}


def _memory_sized_runs(checkpoint, backend, arch, prompts, stop_id) -> dict:
    """The cache megatron allocates against DecodeMemory's count of it, and greedy decoding in batches sized to a
    memory budget: one that splits these prompts, and --batch-size auto's."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from acemath_mcore.eval.backends import MegatronBackend
    from acemath_mcore.eval.generation import MegatronGenerator

    fixed = backend.generator
    context = StaticInferenceContext(3, 11)
    with torch.no_grad():
        fixed.model(torch.ones(3, 4, dtype=torch.long), torch.arange(4).expand(3, 4), None, inference_context=context,
                    runtime_gather_output=True)
    allocated = sum(t.numel() * t.element_size() for pair in context.key_value_memory_dict.values() for t in pair)
    longest = max(len(p) for p in prompts)
    budget = 2 * fixed.memory.row_bytes(longest, longest + NEW_TOKENS) + 1  # two rows of the longest prompt
    backend.generator = MegatronGenerator(fixed.model, arch, [stop_id], 512, memory_budget=budget)
    mine = sorted(len(p) for p in prompts[backend.dp_rank::backend.dp_size])
    budgeted = backend.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), 0, lambda *_: None)
    budget_batches = [list(b) for b in backend.generator.batches(mine, NEW_TOKENS)]
    # A budget one byte short of the longest prompt's row: every rank stops, also the data-parallel rank whose
    # share does not hold that prompt (alone, the other would wait in the gather for ever).
    backend.generator = MegatronGenerator(fixed.model, arch, [stop_id], 512, memory_budget=budget // 2 - 1)
    try:
        backend.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), 0, lambda *_: None)
        too_long = None
    except ValueError as error:
        too_long = str(error)
    auto = MegatronBackend(checkpoint, arch, [stop_id], max_batch_size="auto")
    return {"cache_bytes": (allocated, 3 * 11 * fixed.memory.cache_bytes_per_position),
            "budget_batches": budget_batches, "budgeted": budgeted, "too_long": too_long,
            "auto": auto.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), 0, lambda *_: None),
            "auto_budget": auto.generator.memory_budget}


@pytest.fixture(scope="module")
def stories_generations(tmp_path_factory):
    import sentencepiece

    from acemath_mcore.convert import convert_hf_to_megatron

    checkpoint = tmp_path_factory.mktemp("stories_gen") / "megatron"
    convert_hf_to_megatron(stories_dir(), checkpoint)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(stories_dir() / "tokenizer.model"))
    prompts = [[tokenizer.bos_id()] + tokenizer.encode(text) for text in TEXTS]
    stop_id = tokenizer.piece_to_id(".")
    data_parallel = run_workers(_generate_worker, 2, str(checkpoint), prompts, stop_id, 1)
    by_layout = {
        "tp2": run_workers(_generate_worker, 2, str(checkpoint), prompts, stop_id, 2)[0],
        "dp2": data_parallel[0],
        "dp2_rank1_greedy": data_parallel[1]["greedy"],  # the writer alone receives the gathered generations
    }
    return checkpoint, prompts, stop_id, by_layout


def _transformers_greedy(prompts, stop_id):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir(), dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        output = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=stop_id, pad_token_id=0)[0, len(prompt):].tolist()
        stopped = stop_id in output
        expected.append(Generation(output[:output.index(stop_id)] if stopped else output,
                                   "stop" if stopped else "length"))
    return expected


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_kv_cached_batched_greedy_equals_transformers(stories_generations, layout):
    _, prompts, stop_id, by_layout = stories_generations
    expected = _transformers_greedy(prompts, stop_id)
    assert {g.finish_reason for g in expected} == {"stop", "length"}, "the test needs both kinds of endings"
    assert by_layout[layout]["greedy"] == expected
    assert by_layout["dp2_rank1_greedy"] == []  # only the writer keeps every rank's generations


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_memory_sized_batches_count_the_cache_megatron_allocates_and_decode_alike(stories_generations, layout):
    _, prompts, _, by_layout = stories_generations
    result = by_layout[layout]
    allocated, predicted = result["cache_bytes"]
    assert allocated == predicted > 0
    # A budget of two rows of the longest prompt: several batches of two rows or more, in prompt-length order.
    batches = result["budget_batches"]
    assert len(batches) >= 2 and all(len(batch) >= 2 for batch in batches[:-1])
    assert [i for batch in batches for i in batch] == list(range(len(prompts) // (2 if layout == "dp2" else 1)))
    assert result["budgeted"] == result["greedy"] == result["auto"]
    assert result["auto_budget"] > 0
    longest = max(len(p) for p in prompts)
    assert f"one row of a {longest}-token prompt and up to {NEW_TOKENS} new tokens needs" in result["too_long"]


def test_sampling_is_seeded_reproducible_and_top1_is_greedy(stories_generations):
    _, _, _, by_layout = stories_generations
    same_seed, again, other_seed = by_layout["tp2"]["sampled"]
    assert same_seed == again
    assert same_seed != other_seed
    assert same_seed != by_layout["tp2"]["greedy"]
    assert by_layout["tp2"]["top1"] == by_layout["tp2"]["greedy"]


def test_batch_seeds_of_a_sharded_sampled_run_never_meet():
    """The seeds a run's batches draw from: chunk and rank strides, then the batch. With ``seed + batch`` rank 1's
    batch 27 of chunk 0 met rank 0's batch 0 of chunk 10 (1,000,003 + 27 = 10 x 100,003)."""
    from acemath_mcore.eval.backends import _SEED_STRIDE
    from acemath_mcore.eval.generation import batch_seed
    from acemath_mcore.eval.harness import CHUNK_SEED_STRIDE

    calls = [CHUNK_SEED_STRIDE * chunk + _SEED_STRIDE * rank for chunk in range(40) for rank in range(4)]
    seeds = [batch_seed(call, batch) for call in calls for batch in range(64)]
    assert len(set(seeds)) == len(seeds) and all(0 <= seed < 2**63 for seed in seeds)
    assert len({call + batch for call in calls for batch in range(64)}) < len(seeds)  # what the old sum gave
    assert batch_seed(7, 3) == batch_seed(7, 3)  # a rerun draws the same


def test_sample_next_cuts_to_top_k_and_nucleus():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probabilities.log().expand(20000, 4).contiguous()
    generator = torch.Generator().manual_seed(0)

    def frequencies(params):
        drawn = sample_next(logits, params, generator)
        return torch.bincount(drawn, minlength=4).float() / len(drawn)

    # Nucleus 0.8: tokens 0 and 1 (0.8 of the mass) stay, renormalised to 0.625 / 0.375.
    assert torch.allclose(frequencies(SamplingParams(temperature=1.0, top_p=0.8)),
                          torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)
    # top_p just above 0.8 needs the third token too.
    assert frequencies(SamplingParams(temperature=1.0, top_p=0.81))[2] > 0.1
    assert torch.allclose(frequencies(SamplingParams(temperature=1.0, top_k=3)),
                          torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015)
    # Temperature 0.5 squares the probabilities before renormalising.
    squared = probabilities[0] ** 2 / (probabilities[0] ** 2).sum()
    assert torch.allclose(frequencies(SamplingParams(temperature=0.5)), squared, atol=0.015)
    assert sample_next(logits[:2], SamplingParams(), None).tolist() == [0, 0]


def test_memory_sized_batches_fill_the_budget_and_no_more():
    memory = DecodeMemory(cache_bytes_per_position=10, prefill_bytes_per_token=3, logits_bytes=100)
    # A row of prompt n decoded to min(n + 50, 120) positions: 5 -> 665 bytes, 8 -> 704, 20 -> 860, 40 -> 1120,
    # 90 -> 1570 (the context caps it at 120 positions). Budget 3000: [5, 5, 8] (3 x 704), then 4 x 860 > 3000.
    lengths = [5, 5, 8, 20, 20, 40, 90]
    batches = memory_sized_batches(lengths, 50, 120, memory, budget=3000, max_rows=4)
    assert [list(b) for b in batches] == [[0, 1, 2], [3, 4], [5], [6]]
    assert [list(b) for b in memory_sized_batches([5] * 6, 50, 120, memory, 3000, max_rows=4)] == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match=r"90-token prompt and up to 50 new tokens needs 0.00 GiB .* lower "
                                          r"--max-new-tokens, raise --tensor-parallel"):
        memory_sized_batches(lengths, 50, 120, memory, budget=1500, max_rows=4)


def test_decode_memory_of_qwen25_72b_at_tp8():
    """The key/value cache per position against the model card's shapes: 80 layers x 8 KV heads x 128 x (K, V) x
    2 bytes = 320 KiB per token, an eighth of it per TP rank."""
    from acemath_mcore.models.presets import get_preset

    memory = DecodeMemory.of(get_preset("qwen2.5-math-72b"), tensor_parallel=8, dtype=torch.bfloat16)
    assert memory.cache_bytes_per_position == 80 * 8 * 128 * 2 * 2 // 8 == 40 * 1024
    fp32 = DecodeMemory.of(get_preset("qwen2.5-math-72b"), tensor_parallel=8, dtype=torch.float32)
    assert fp32.cache_bytes_per_position == 2 * memory.cache_bytes_per_position


def test_sampling_params_reject_bad_values():
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def _evaluate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_evaluate_cli_megatron_and_transformers_backends_agree(stories_generations, tmp_path):
    import json

    import shutil

    checkpoint = stories_generations[0]
    common = ["--template", "plain", "--benchmarks", "gsm8k,math", "--limit", "3", "--max-new-tokens", "24",
              "--data-dir", shared_path("data/eval")]
    megatron = _evaluate("--checkpoint", checkpoint, "--output-dir", tmp_path / "megatron", "--batch-size", "auto",
                         *common)
    assert megatron.returncode == 0, megatron.stderr[-3000:]
    assert "--batch-size auto: " in megatron.stdout and "rows per batch" in megatron.stdout
    # 3 problems per call where 512 rows fit: the log says the chunk, not the memory, sizes the batches (once).
    assert megatron.stdout.count("a generation call gives each rank 3 prompts, one batch, where the memory holds "
                                 "512 rows") == 1
    # An exported model carries its training data's prompt format (convert_to_hf copies prompt_format.json): the
    # HF backend takes the plain template from it, with no --template.
    exported = shutil.copytree(stories_dir(), tmp_path / "exported")
    (exported / "prompt_format.json").write_text(json.dumps({"template": "plain", "system_prompt": None}))
    hf = _evaluate("--backend", "hf", "--checkpoint", exported, "--output-dir", tmp_path / "hf", *common[2:])
    assert hf.returncode == 0, hf.stderr[-3000:]
    assert json.loads((tmp_path / "hf" / "gsm8k.meta.json").read_text())["settings"]["setup"]["template"] == "plain"
    for benchmark in ("gsm8k", "math"):
        rows = {name: [json.loads(line) for line in (tmp_path / name / f"{benchmark}.jsonl").open()]
                for name in ("megatron", "hf")}
        assert len(rows["megatron"]) == 3
        assert [r["code"] for r in rows["megatron"]] == [r["code"] for r in rows["hf"]]
        assert all(len(r["code"][0]) > 0 and r["num_tokens"][0] > 0 for r in rows["megatron"])
    assert "| gsm8k | 3 | 1 |" in megatron.stdout and "**average**" in megatron.stdout
    # Run again, as a resubmitted array task would: nothing to do, so no process group and no model (a TP of 2 in
    # one process would fail at the rendezvous); the same table.
    again = _evaluate("--checkpoint", checkpoint, "--output-dir", tmp_path / "megatron", "--tensor-parallel", 2, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "results with these settings already in" in again.stderr
    def table(out):
        return [line for line in out.splitlines() if line.startswith("|")]

    assert table(again.stdout) == table(megatron.stdout) and len(table(megatron.stdout)) == 5

    # gsm8k in two parts (3 problems in chunks of 2): the second merges; its rerun is skipped before the
    # rendezvous too, and the table it prints is the merged one.
    sharded = ["--checkpoint", checkpoint, "--output-dir", tmp_path / "sharded", *common[:3], "gsm8k", *common[4:],
               "--chunk-problems", 2]
    for part in ("0/2", "1/2"):
        done = _evaluate(*sharded, "--shard", part)
        assert done.returncode == 0, done.stderr[-3000:]
    merged = [json.loads(line) for line in (tmp_path / "sharded" / "gsm8k.jsonl").open()]
    assert [r["code"] for r in merged] == [json.loads(line)["code"] for line in (tmp_path / "megatron" / "gsm8k.jsonl").open()]
    assert "| gsm8k | 3 | 1 |" in done.stdout
    again = _evaluate(*sharded, "--shard", "1/2", "--tensor-parallel", 2)
    assert again.returncode == 0 and "results with these settings already in" in again.stderr, again.stderr[-3000:]
    assert "| gsm8k | 3 | 1 |" in again.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size: expected a positive number of rows or 'auto', got '0'"),
    (["--batch-size", "many"], "--batch-size: expected a positive number of rows or 'auto', got 'many'"),
    (["--batch-size", "auto", "--backend", "hf"], "--batch-size auto sizes the megatron backend's batches"),
])
def test_evaluate_cli_refuses_bad_batch_sizes(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        launch_main("evaluate")(["--checkpoint", str(tmp_path), "--output-dir", str(tmp_path), *args])
    assert message in f"{stop.value.code} {capsys.readouterr().err}"


def test_hf_backend_gives_each_row_its_own_context_budget():
    """Left-padded batches: a short prompt beside a long one may still fill the context on its own, exactly as it
    would alone (the batch's longest prompt used to cap every row's budget)."""
    from acemath_mcore.eval.backends import HFBackend

    backend = HFBackend(str(stories_dir()), stop_ids=[2], pad_id=0, dtype="float32", device="cpu",
                        max_sequence_length=60)
    short, long = [1, 365, 462, 471, 263], [1] + [365, 462, 471, 263, 217] * 9 + [365, 462, 471, 263]
    params = SamplingParams(max_new_tokens=30)
    together = backend.generate([short, long], params, seed=0, progress=lambda done, total: None)
    backend.max_batch_size = 1
    alone = backend.generate([short, long], params, seed=0, progress=lambda done, total: None)
    assert together == alone
    assert len(alone[1].token_ids) <= 60 - len(long)
    assert len(alone[0].token_ids) == 30 or alone[0].finish_reason == "stop"


def test_hf_backend_decodes_with_the_requested_settings_only(tmp_path):
    """A checkpoint's generation_config.json (repetition penalty, top-k, beams) and transformers' global defaults
    (top-k 50) must not change what the HF backend decodes: greedy is the argmax chain and sampling at a
    temperature is plain softmax sampling, token for token against a loop over the model's logits."""
    import json
    import shutil

    import transformers

    from acemath_mcore.eval.backends import HFBackend
    from acemath_mcore.eval.generation import batch_seed

    model_dir = tmp_path / "stories"
    shutil.copytree(stories_dir(), model_dir)
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(repetition_penalty=1.5, top_k=20, do_sample=True, num_beams=2)
    config_path.write_text(json.dumps(config))
    backend = HFBackend(str(model_dir), stop_ids=[2], pad_id=0, dtype="float32", device="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir(), dtype=torch.float32,
                                                              use_safetensors=True).eval()
    prompt, steps, temperature = [1, 365, 462, 471, 263], 20, 1.3

    def reference(pick) -> list:
        tokens, chosen = torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(steps):
                token = pick(model(tokens).logits[:, -1, :].float())
                if token == 2:
                    break
                chosen.append(token)
                tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        return chosen

    greedy = backend.generate([prompt], SamplingParams(max_new_tokens=steps), seed=0, progress=lambda d, t: None)
    assert greedy[0].token_ids == reference(lambda logits: int(logits.argmax()))
    sampled = backend.generate([prompt], SamplingParams(max_new_tokens=steps, temperature=temperature), seed=5,
                               progress=lambda d, t: None)
    torch.manual_seed(batch_seed(5, 0))  # the backend's first batch
    expected = reference(lambda logits: int(torch.multinomial(torch.softmax(logits / temperature, -1), 1)))
    assert sampled[0].token_ids == expected and len(set(expected)) > 5
