"""benchmarks/train_throughput.py's worker runs our engine on CPU too (through the shim), so the GPU benchmark
cannot rot between GPU sessions: each task's step runs and reports the FLOPs of exactly the documents it trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



@pytest.mark.parametrize("extra", [["--packed", "--mean-doc-length", "16"],
                                   ["--task", "rm", "--no-wgrad-fusion", "--groups", "2"]],
                         ids=["sft-packed", "rm"])
def test_worker_trains_and_reports_flops(extra, tmp_path):
    seq = 64
    command = [sys.executable, str(SCRIPT), "--worker", "native", "--model", "tiny", "--seq-length", str(seq),
               "--micro-batches", "2", "--steps", "2", "--warmup", "1", *extra]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-2000:] + completed.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["status"] == "ok"
    assert result["step_s_min"] <= result["step_s"] <= result["step_s_max"]

    from acemath_mcore.models import get_preset
    from acemath_mcore.training.flops import training_flops

    arch = get_preset("tiny")
    if extra[0] == "--packed":  # one packed row of documents filling seq tokens, per micro-batch
        tokens = 2 * seq
        assert result["flops_per_step"] < training_flops(arch, [seq, seq])  # causal work per document, not per row
        assert result["flops_per_step"] > training_flops(arch, [1] * tokens)
    else:  # two problem groups of 6 padded responses per micro-batch, computed in full, through the scalar head
        tokens = 2 * 2 * 6 * seq
        assert result["flops_per_step"] == training_flops(arch, [seq] * 24, head_outputs=1)
    assert result["tokens_per_s"] == pytest.approx(tokens / result["step_s"], rel=1e-9)


def test_profile_breakdown_classifies_hopper_kernel_names():
    kernels = [  # names as the torch profiler reported them on the lent H100 (cuDNN attention, cuBLAS, TE, torch)
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0", 5.0),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 7.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", 1.0),
        ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", 2.0),
        ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>", 0.5),
        ("void transformer_engine::rmsnorm_fwd_tuned_kernel<bf16>", 3.0),
        ("triton_red_fused_copy__exp_sub_sum_unsqueeze_2", 4.0),  # megatron's fused loss, torch-compiled
        ("_row_statistics_kernel", 0.25),  # ours
    ]
    breakdown = _load_script().kernel_time_breakdown(kernels)
    assert breakdown == {"attention": 5.0, "matmul": 8.0, "optimizer": 2.0, "cross entropy": 4.25,
                         "copy/memset": 0.5, "other": 3.0}


def test_gpu_idle_is_split_by_the_innermost_host_phase():
    # Window 0-100. Device work 0-10, 5-20 (overlapping) and 30-40 leaves idle 20-30 and 40-100. Host phases:
    # outer 0-100 holding a 15-35 and b 60-80, with c 70-75 nested in b.
    kernels = [(5, 20), (0, 10), (30, 40), (150, 160)]  # the last one lies outside the window
    phases = [("outer", 0, 100), ("a", 15, 35), ("b", 60, 80), ("c", 70, 75)]
    idle = _load_script().gpu_idle_by_phase(kernels, phases, (0, 100))
    assert idle == {"outer": 40.0, "a": 10.0, "b": 15.0, "c": 5.0}  # outer: 40-60 and 80-100
    assert list(idle) == ["outer", "b", "a", "c"]  # largest first
    assert _load_script().gpu_idle_by_phase([(0, 50)], [], (0, 60)) == {"outside the phases": 10.0}


def test_profiled_step_names_the_engine_phases(tmp_path):
    """On CPU the profile has no device work, so the 'GPU idle' time is the whole step, split by the engine's
    annotated phases: every phase must appear and the parts must add up to the profiled step."""
    command = [sys.executable, str(SCRIPT), "--worker", "native", "--model", "tiny", "--seq-length", "64",
               "--micro-batches", "2", "--steps", "1", "--warmup", "1", "--packed", "--mean-doc-length", "16",
               "--profile"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    step_ms = float(next(line for line in lines if line.startswith("PROFILE step ")).split()[2])
    idle_line = next(line for line in lines if line.startswith("IDLE "))
    parts = {}
    for item in idle_line.split("): ", 1)[1].split(", "):  # "name 12.3 ms"
        name, milliseconds, _ = item.rsplit(" ", 2)
        parts[name] = float(milliseconds)
    for phase in ("forward_backward", "forward", "loss_reduction", "grad_norm", "optimizer_step"):
        assert phase in parts, idle_line
    assert sum(parts.values()) == pytest.approx(step_ms, abs=0.05 * len(parts) + 0.1)
    assert "WAITS not counted: no CUDA device" in lines
