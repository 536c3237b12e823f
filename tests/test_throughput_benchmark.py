"""benchmarks/train_throughput.py's worker runs our engine on CPU too (through the shim), so the GPU benchmark
cannot rot between GPU sessions: each task's step runs and reports the FLOPs of exactly the documents it trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.mark.parametrize("extra", [["--packed", "--mean-doc-length", "16"], ["--task", "rm", "--no-wgrad-fusion"]],
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
    else:  # one problem group of 6 padded responses per micro-batch, computed in full, through the scalar head
        tokens = 2 * 6 * seq
        assert result["flops_per_step"] == training_flops(arch, [seq] * 12, head_outputs=1)
    assert result["tokens_per_s"] == pytest.approx(tokens / result["step_s"], rel=1e-9)
