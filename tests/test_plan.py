"""The layout planner: its memory items against hand arithmetic, its layout rules and errors, the layouts it
recommends for the paper's models, its CLI, and its memory model against a training run measured on CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
from launch_scripts import launch_main

from acemath_mcore import plan as planner
from acemath_mcore.models.arch import ModelArch

GIB = 2**30

# Round numbers for hand arithmetic: head_dim 1024 / 16 = 64, vocabulary already a multiple of 128.
HAND_ARCH = ModelArch(family="llama", num_layers=8, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                      num_query_groups=4, vocab_size=32000)


def hand_request(**changes) -> planner.PlanRequest:
    fields = dict(arch=HAND_ARCH, gpus=16, gpus_per_node=8, seq_length=2048, global_batch=64, micro_batch=1)
    return planner.PlanRequest(**{**fields, **changes})


def load_cli():
    return launch_main("plan")


# ---- (a) memory items equal hand-computed bytes ------------------------------------------------------------------
def test_memory_items_of_an_interleaved_layout_match_hand_arithmetic():
    """TP=2, PP=2, VPP=2, DP=4 on 16 GPUs, bf16, distributed optimizer, seq 2048, 16 micro-batches per DP rank."""
    layout = planner.Layout(tensor_parallel=2, pipeline_parallel=2, virtual_pipeline_parallel=2, context_parallel=1,
                            data_parallel=4, recompute="none")
    request = hand_request()
    assert planner.check_layout(request, layout) == 64 // (1 * 4)

    # Parameters of one layer on one TP rank: QKV 1024 x 64 x (16 + 2 x 4), output projection 16 x 64 x 1024,
    # SwiGLU MLP 3 x 1024 x 4096 -- all split over TP=2 -- plus two replicated RMSNorm weights of 1024.
    layer = (1024 * 64 * 24 + 16 * 64 * 1024 + 3 * 1024 * 4096) // 2 + 2 * 1024  # 7,604,224
    embedding = 32000 * 1024 // 2  # vocabulary rows split over TP
    first_params = 4 * layer + embedding  # 4 of the 8 layers, plus the word embeddings
    last_params = 4 * layer + 1024 + embedding  # final norm and the (untied) LM head
    tokens = 2048 * 1 // 2  # sequence parallelism: each TP rank stores half the sequence
    # Stored per token and layer: attention 2 x 1024 (norm and QKV inputs) + 2 x 16 x 64 (Q, attention output)
    # + 2 x 4 x 64 (K, V); MLP 2 x 1024 (norm and FC1 inputs) + 3 x 4096 (FC1 output, SwiGLU output).
    per_layer = 2048 + 2048 + 512 + 2048 + 12288  # 18,944
    # Interleaved 1F1B, first stage: 2 (PP - 1) + (VPP - 1) PP + 1 = 5 chunks of 8 / (PP VPP) = 2 layers in flight.
    first = planner.stage_memory(request, layout, micro_batches=16, stage=0)
    assert first == planner.MemoryBreakdown(
        stage="first",
        parameters=2 * first_params,  # bf16
        gradients=4 * first_params,  # fp32 main grads
        optimizer=12 * first_params // 4,  # fp32 master + Adam m, v, sharded over DP=4
        activations=10 * per_layer * tokens * 2,
        logits=0,
        overhead=4 * GIB,
    )
    # Last stage: (VPP - 1) PP + 1 = 3 chunks (6 layers), the final norm's and LM head's inputs (2 x 1024), and
    # the logits: the LM head gathers all 2048 tokens and splits the vocabulary (32000 / 2), 2 bytes each (our
    # loss kernel overwrites them with their gradient; megatron's keeps an fp32 softmax and a temporary: 10).
    last = planner.stage_memory(request, layout, micro_batches=16, stage=1)
    assert last == planner.MemoryBreakdown(
        stage="last",
        parameters=2 * last_params,
        gradients=4 * last_params,
        optimizer=12 * last_params // 4,
        activations=(6 * per_layer + 2048) * tokens * 2,
        logits=2048 * 16000 * 2,
        overhead=4 * GIB,
    )
    assert planner.peak_memory(request, layout, 16) == max(first, last, key=lambda m: m.total)
    megatron_loss = dataclasses.replace(request, cross_entropy="megatron")
    assert planner.stage_memory(megatron_loss, layout, micro_batches=16, stage=1).logits == 2048 * 16000 * 10
    # A plan for megatron's loss selects it in the recipe too (ours, "auto" on CUDA, needs no override).
    estimate = planner.estimate(megatron_loss, layout)
    assert planner.recipe_overrides(estimate, megatron_loss)[-1] == "model_options.cross_entropy=megatron"
    assert not any("cross_entropy" in o for o in planner.recipe_overrides(planner.estimate(request, layout), request))
    with pytest.raises(ValueError, match="cross_entropy must be one of"):
        dataclasses.replace(request, cross_entropy="fused")

    # Full recompute keeps only each in-flight layer's input (h) plus one layer being recomputed.
    full = planner.stage_memory(request, dataclasses.replace(layout, recompute="full"), micro_batches=16, stage=0)
    assert full.activations == (10 * 1024 + per_layer) * tokens * 2
    # Selective recompute (core attention) stores what flash attention stores anyway.
    selective = planner.stage_memory(request, dataclasses.replace(layout, recompute="selective"), 16, stage=0)
    assert selective.activations == first.activations


def test_fp32_replicated_optimizer_single_gpu_matches_hand_arithmetic():
    request = hand_request(gpus=1, global_batch=2, bf16=False, distributed_optimizer=False, overhead_bytes=0)
    layout = planner.Layout(1, 1, None, 1, 1, "none")
    memory = planner.peak_memory(request, layout, micro_batches=2)
    params = 8 * ((1024 * 64 * 24 + 16 * 64 * 1024 + 3 * 1024 * 4096) + 2 * 1024) + 2 * 32000 * 1024 + 1024
    assert params == HAND_ARCH.num_parameters()
    assert (memory.parameters, memory.gradients, memory.optimizer) == (4 * params, 4 * params, 8 * params)
    # One micro-batch in flight through all 8 layers, fp32 activations, the last stage's extras, fp32 logits.
    assert memory.activations == (8 * 18944 + 2048) * 2048 * 4
    assert memory.logits == 2048 * 32000 * 4
    assert memory.total == 16 * params + memory.activations + memory.logits


def test_step_time_is_flops_at_the_assumed_mfu_plus_the_pipeline_bubble():
    request = hand_request(gpus=2, global_batch=8, distributed_optimizer=False)
    single = planner.estimate(request, planner.Layout(1, 1, None, 1, 2, "none"))
    # 6 x matmul weights x tokens + 6 x L x (heads x head_dim) x s (s + 1), per 2048-token micro-batch;
    # matmul weights leave out the 17 norms and the embedding lookup.
    matmul = HAND_ARCH.num_parameters() - 17 * 1024 - 32000 * 1024
    flops = 6 * matmul * 2048 + 6 * 8 * 1024 * 2048 * 2049
    peak = planner.GPU_TYPES["h100-80gb"].bf16_peak_flops
    assert single.time.step_s == pytest.approx(4 * flops / (peak * 0.5))
    piped = planner.estimate(request, planner.Layout(1, 2, None, 1, 1, "none"))
    assert piped.time.bubble_fraction == (2 - 1) / 8
    assert piped.time.step_s == pytest.approx(piped.time.micro_batch_s * (8 + 1))
    # Full recompute: one more forward (a third of forward + backward) of every layer, not of the LM head.
    full = planner.estimate(request, planner.Layout(1, 1, None, 1, 2, "full"))
    head = 6 * 32000 * 1024 * 2048
    assert full.time.step_s == pytest.approx(4 * (flops + (flops - head) / 3) / (peak * 0.5))


# ---- (b) layout rules and errors ---------------------------------------------------------------------------------
def test_tensor_parallel_must_divide_query_groups():
    arch = dataclasses.replace(HAND_ARCH, num_query_groups=2)
    request = hand_request(arch=arch)
    assert {e.layout.tensor_parallel for e in planner.plan(request)} == {1, 2}
    with pytest.raises(ValueError, match="num_query_groups=2"):
        planner.check_layout(request, planner.Layout(4, 1, None, 1, 4, "none"))


def test_batch_and_schedule_divisibility_rules():
    request = hand_request(global_batch=24)  # 16 GPUs: DP=16 cannot split 24 samples
    assert all(e.layout.data_parallel in (1, 2, 4, 8) for e in planner.plan(request))
    with pytest.raises(ValueError, match="not divisible by micro-batch 1 x DP 16"):
        planner.check_layout(request, planner.Layout(1, 1, None, 1, 16, "none"))
    # 24 / DP 8 = 3 micro-batches: the interleaved schedule needs whole groups of PP=2.
    with pytest.raises(ValueError, match="groups of PP=2"):
        planner.check_layout(request, planner.Layout(1, 2, 2, 1, 8, "none"))
    with pytest.raises(ValueError, match="does not divide num_layers"):
        planner.check_layout(request, planner.Layout(1, 2, 3, 1, 8, "none"))
    with pytest.raises(ValueError, match="context parallelism"):
        planner.check_layout(hand_request(task="rm"), planner.Layout(1, 1, None, 2, 8, "none"))


def test_nothing_fits_names_the_smallest_need_and_suggests_more_gpus():
    request = planner.request_for("qwen2.5-72b", gpus=8, seq_length=4096, global_batch=256)
    estimates = planner.plan(request)
    with pytest.raises(planner.PlanError) as error:
        planner.recommend(estimates, request)
    leanest = min(e.memory.total for e in estimates)
    assert f"needs {leanest / GIB:.1f} GiB per GPU" in str(error.value)
    assert "Use more GPUs" in str(error.value) and "71.2 GiB usable" in str(error.value)


def test_no_valid_layout_is_an_error_with_the_batch_numbers():
    with pytest.raises(planner.PlanError, match="divides global batch 3 / micro-batch 2"):
        planner.plan(hand_request(global_batch=3, micro_batch=2))


# ---- (c) recommendations -----------------------------------------------------------------------------------------
def test_qwen25_72b_on_256_h100s():
    request = planner.request_for("qwen2.5-72b", gpus=256, seq_length=4096, global_batch=256)
    best = planner.recommend(planner.plan(request), request)
    layout = best.layout
    assert best.fits and best.memory.total <= 0.9 * request.gpu.memory_bytes < 80 * GIB
    assert layout.pipeline_parallel >= 2 or layout.tensor_parallel == 8
    assert layout.model_parallel_size * layout.data_parallel == 256
    # Weights alone (72.7B x 18 bytes without sharding) need far more than one GPU: model parallelism is used.
    assert layout.tensor_parallel * layout.pipeline_parallel >= 8
    assert best.tokens_per_s > 0 and 0 <= best.time.bubble_fraction < 0.1


def test_context_parallel_layouts_are_estimated_but_never_recommended():
    """The trainer refuses CP > 1, so asking for CP candidates shows their estimates without recommending one."""
    request = dataclasses.replace(planner.request_for("qwen2.5-7b", gpus=8, seq_length=32768, global_batch=8),
                                  context_parallel=(1, 2, 4))
    estimates = planner.plan(request)
    assert any(e.fits and e.layout.context_parallel > 1 for e in estimates)
    fastest = min((e for e in estimates if e.fits), key=lambda e: e.time.step_s)
    assert fastest.layout.context_parallel > 1  # what the estimates alone would pick
    best = planner.recommend(estimates, request)
    assert best.fits and best.layout.context_parallel == 1
    assert "parallel.context_parallel=1" in planner.recipe_overrides(best, request)

    at_64k = dataclasses.replace(request, seq_length=65536, recompute=("none",))
    with pytest.raises(planner.PlanError, match=r"only layouts with context parallelism fit 8 x h100-80gb \(e.g. TP=4 "
                                                r"PP=1 VPP=- CP=2 DP=1 recompute=none\), and the trainer refuses CP > 1"):
        planner.recommend(planner.plan(at_64k), at_64k)


def test_small_model_on_one_node_is_pure_data_parallel():
    request = planner.request_for("qwen2.5-math-1.5b", gpus=8, seq_length=4096, global_batch=128)
    assert planner.recommend(planner.plan(request), request).layout.tensor_parallel == 1


def test_smallest_cluster_for_72b_is_more_than_one_node():
    request = planner.request_for("qwen2.5-math-72b", gpus=8, seq_length=4096, global_batch=256)
    sized, _, best = planner.smallest_cluster(request)
    assert 16 <= sized.gpus <= 64 and best.fits
    with pytest.raises(planner.PlanError):
        planner.recommend(planner.plan(dataclasses.replace(request, gpus=sized.gpus // 2)), request)


def test_a_resumed_split_is_kept_when_the_gpu_count_changes(capsys):
    """A run saved at 256 GPUs, resubmitted on 128: left free the planner picks another VPP there, which the
    checkpoint's dp_reshardable optimizer state cannot take; with --model-parallel it keeps the saved split."""
    at_256 = planner.request_for("qwen2.5-math-72b", gpus=256, seq_length=4096, global_batch=256)
    saved = planner.recommend(planner.plan(at_256), at_256).layout
    split = (saved.tensor_parallel, saved.pipeline_parallel, saved.virtual_pipeline_parallel)
    at_128 = dataclasses.replace(at_256, gpus=128)
    free = planner.recommend(planner.plan(at_128), at_128).layout
    assert (free.tensor_parallel, free.pipeline_parallel, free.virtual_pipeline_parallel) != split
    kept = dataclasses.replace(at_128, model_parallel=split)
    estimates = planner.plan(kept)
    assert {(e.layout.tensor_parallel, e.layout.pipeline_parallel, e.layout.virtual_pipeline_parallel)
            for e in estimates} == {split}
    best = planner.recommend(estimates, kept)
    assert best.fits and best.layout.data_parallel == 128 // (split[0] * split[1])
    main = load_cli()
    args = ["--model", "qwen2.5-math-72b", "--gpus", "128", "--global-batch", "256", "--format", "overrides"]
    assert main([*args, "--model-parallel", f"{split[0]},{split[1]},{split[2] or 1}"]) == 0
    assert f"parallel.virtual_pipeline_parallel={split[2] or 'none'}" in capsys.readouterr().out.split()
    with pytest.raises(planner.PlanError, match=f"on 24 GPUs with TP={split[0]}, PP={split[1]}, VPP={split[2] or 1} "
                                                r"\(required: the checkpoint's optimizer state fits only that split\)"):
        planner.plan(dataclasses.replace(kept, gpus=24))


def test_cli_overrides_select_the_recommended_layout_in_a_recipe(capsys):
    from acemath_mcore.recipes import apply_overrides, get_recipe

    main = load_cli()
    args = ["--model", "qwen2.5-72b", "--gpus", "256", "--seq-length", "4096", "--global-batch", "256"]
    assert main([*args, "--format", "overrides"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    request = planner.request_for("qwen2.5-72b", gpus=256, seq_length=4096, global_batch=256)
    layout = planner.recommend(planner.plan(request), request).layout
    config = apply_overrides(get_recipe("qwen25_math_72b_sft_stage1"), line.split())
    assert (config.parallel.tensor_parallel, config.parallel.pipeline_parallel,
            config.parallel.virtual_pipeline_parallel, config.parallel.context_parallel) == (
        layout.tensor_parallel, layout.pipeline_parallel, layout.virtual_pipeline_parallel, layout.context_parallel)
    assert config.parallel.sequence_parallel == (layout.tensor_parallel > 1)
    assert config.model_options.recompute == (None if layout.recompute == "none" else layout.recompute)

    assert main([*args, "--format", "nodes"]) == 0
    assert capsys.readouterr().out == "32\n"


def test_cli_table_json_and_failure(capsys, tmp_path):
    main = load_cli()
    out = tmp_path / "plans" / "plan.json"  # a folder that does not exist yet
    assert main(["--model", "qwen2.5-math-7b", "--gpus", "8", "--global-batch", "128", "--top", "5",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "<- recommended" in printed and "overrides: parallel.tensor_parallel=" in printed
    report = json.loads(out.read_text())
    assert report["nodes"] == 1 and report["recommended"]["fits"] and report["layouts"]
    assert main(["--model", "qwen2.5-72b", "--gpus", "8", "--global-batch", "256", "--format", "overrides"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "needs" in captured.err
    assert main(["--model", "qwen2.5-math-7b", "--global-batch", "128", "--format", "nodes"]) == 0
    assert capsys.readouterr().out == "1\n"
    for flag in ("--gpus", "--micro-batch", "--seq-length"):  # 0 GPUs was planned as 8, the others divided by 0
        with pytest.raises(SystemExit) as exit_:
            main(["--model", "qwen2.5-math-7b", "--global-batch", "128", flag, "0"])
        assert exit_.value.code == 2 and f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


# ---- (d) against a measured peak: training on CPU ----------------------------------------------------------------
# Big enough that model state and activations dwarf allocator noise, small enough for ~15 s on two cores.
MEASURED_ARCH = ModelArch(family="qwen2", num_layers=8, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8,
                          num_query_groups=4, vocab_size=512, qkv_bias=True, max_position_embeddings=1024)
MEASURED_SEQ, MEASURED_MICRO_BATCHES, MEASURED_STEPS = 512, 2, 2  # step 2 runs beside Adam's state: the peak


def _measure_training_memory(rank, world_size):
    """Resident memory of one fp32 training process (native spec, megatron DDP + torch Adam, no distributed
    optimizer) after set-up, after building the engine, after a forward-only warm-up and after each step; plus
    the peak."""
    import gc

    import psutil
    import torch

    from acemath_mcore.models.builder import ModelOptions
    from acemath_mcore.runtime import init_distributed, peak_memory_bytes
    from acemath_mcore.runtime.distributed import ParallelConfig
    from acemath_mcore.training.engine import Engine, OptimConfig
    from acemath_mcore.training.sft import SFTTask

    process = psutil.Process()
    parallel = ParallelConfig()
    init_distributed(parallel)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(MEASURED_MICRO_BATCHES):
        tokens = torch.randint(0, MEASURED_ARCH.vocab_size, (1, MEASURED_SEQ), generator=generator)
        batches.append(dict(tokens=tokens, labels=torch.roll(tokens, -1, dims=1),
                            loss_mask=torch.ones(1, MEASURED_SEQ), position_ids=torch.arange(MEASURED_SEQ)[None]))
    gc.collect()
    measured = {"baseline": process.memory_info().rss}
    engine = Engine(MEASURED_ARCH, parallel, ModelOptions(spec="native", bf16=False), OptimConfig(lr=1e-4),
                    train_steps=MEASURED_STEPS)
    measured["built"] = process.memory_info().rss
    task = SFTTask()
    # A forward-only pass first, so the library workspaces and caches (RoPE tables, kernel scratch) that stay
    # allocated are not booked to the optimizer below.
    engine.forward_backward(task, batches, forward_only=True)
    measured["warmed"] = process.memory_info().rss
    for step in range(MEASURED_STEPS):
        engine.train_step(task, batches)
        measured[f"after_step_{step + 1}"] = process.memory_info().rss
    measured["peak"] = peak_memory_bytes()
    return measured


@pytest.fixture(scope="module")
def measured_memory():
    from distributed_helpers import run_workers

    # glibc's heap would keep freed activation buffers resident (and ratchet its mmap threshold up), so a
    # finished step would not show its memory returned; mapping every allocation over 64 KiB separately makes
    # the resident size follow the tensors that are alive. glibc reads it when a process starts: a spawned worker
    # does, a forked one keeps its parent's heap.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
        return run_workers(_measure_training_memory, 1, timeout=300, fresh_interpreter=True)[0]


# Margins. Model state is plain tensors, so the planner must be close (the 5-10% above it is the native spec's
# RoPE tables, megatron's bookkeeping and the optimizer's per-parameter temporaries). The peak margin is wider
# upwards: on CPU the unfused SwiGLU keeps its FFN-wide output twice, torch's RMSNorm its normalised input and
# SDPA's output is copied before the projection, so activations are ~1.6x what the GPU kernels the planner
# models keep (docs/planner.md has the per-tensor count).
STATE_MARGIN = 0.10
PEAK_MARGIN = (0.90, 1.35)


def test_measured_cpu_memory_matches_the_planner(measured_memory):
    request = planner.PlanRequest(arch=MEASURED_ARCH, gpus=1, gpus_per_node=1, seq_length=MEASURED_SEQ,
                                  global_batch=MEASURED_MICRO_BATCHES, bf16=False, distributed_optimizer=False,
                                  recompute=("none",), overhead_bytes=0)
    predicted = planner.estimate(request, planner.Layout(1, 1, None, 1, 1, "none")).memory
    weights_and_grads = measured_memory["built"] - measured_memory["baseline"]
    optimizer = measured_memory["after_step_1"] - measured_memory["warmed"]
    peak = measured_memory["peak"] - measured_memory["baseline"]
    mib = 2**20
    report = (f"MiB measured / predicted: weights + grads {weights_and_grads / mib:.0f} / "
              f"{(predicted.parameters + predicted.gradients) / mib:.0f}, optimizer {optimizer / mib:.0f} / "
              f"{predicted.optimizer / mib:.0f}, peak increase {peak / mib:.0f} / {predicted.total / mib:.0f}")
    print(report)
    assert weights_and_grads == pytest.approx(predicted.parameters + predicted.gradients, rel=STATE_MARGIN), report
    assert optimizer == pytest.approx(predicted.optimizer, rel=STATE_MARGIN), report
    assert PEAK_MARGIN[0] <= peak / predicted.total <= PEAK_MARGIN[1], report
