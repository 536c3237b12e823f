"""Checkpoint save and load with the distributed optimizer, per optimizer format, with or without megatron's
fully parallel strategies, and written in the foreground or by a background process (``checkpoint.async_save``):
wall time, bytes each rank writes, and each rank's resident-memory rise while saving.

    python benchmarks/checkpoint_io.py                          # ~130M-parameter model, 2 CPU ranks (DP=2)
    python benchmarks/checkpoint_io.py --layers 2 --hidden 256  # quick

One process per data-parallel rank (gloo on CPU, NCCL on a GPU machine), fp32 weights, one training step first
so the Adam state exists. Each setting saves into a fresh directory and loads that checkpoint back into the same
model (the resume path: ``training/checkpointing.load_checkpoint``); times are the slowest rank's, from a barrier
to a barrier, median of ``--repeats``: "save s" is how long training would stop (for a background save, until
the writer process has started), "published s" until ``latest`` names the checkpoint. The memory rise is the
largest resident size of the rank's own process sampled every 5 ms during the save, minus the size just before
it (a background writer's memory is its own process's, not counted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

SETTINGS = [  # (optimizer format, fully parallel, background)
    ("fully_reshardable", False, False),
    ("fully_reshardable", True, False),
    ("dp_reshardable", False, False),
    ("dp_reshardable", True, False),
    ("dp_reshardable", True, True),
]


class PeakResidentMemory:
    """The largest resident size seen by a sampling thread between ``start`` and ``stop``."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.process, self.interval_s = psutil.Process(), interval_s
        self.peak = self.baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakResidentMemory":
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def rise(self) -> int:
        return self.peak - self.baseline


def _measure(rank: int, world_size: int, args: argparse.Namespace, root: str) -> dict:
    import torch

    from acemath_mcore.models.arch import ModelArch
    from acemath_mcore.options import ModelOptions, OptimConfig, ParallelConfig
    from acemath_mcore.runtime import init_distributed
    from acemath_mcore.training import checkpointing
    from acemath_mcore.training.engine import Engine
    from acemath_mcore.training.sft import SFTTask

    arch = ModelArch(family="qwen2", num_layers=args.layers, hidden_size=args.hidden,
                     ffn_hidden_size=args.hidden * 11 // 4, num_attention_heads=args.hidden // 64,
                     num_query_groups=max(1, args.hidden // 256), vocab_size=args.vocab, qkv_bias=True)
    parallel = ParallelConfig()
    init_distributed(parallel)
    engine = Engine(arch, parallel, ModelOptions(spec="native"),
                    OptimConfig(lr=1e-4, use_distributed_optimizer=True), train_steps=2)
    tokens = torch.randint(0, arch.vocab_size, (1, 128))
    batch = dict(tokens=tokens, labels=torch.roll(tokens, -1, dims=1), loss_mask=torch.ones(1, 128),
                 position_ids=torch.arange(128)[None])
    engine.train_step(SFTTask(), [batch])
    parameters = sum(p.numel() for chunk in engine.model for p in chunk.parameters())

    def timed(action) -> float:
        torch.distributed.barrier()
        start = time.perf_counter()
        action()
        torch.distributed.barrier()
        elapsed = torch.tensor([time.perf_counter() - start])
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        return float(elapsed)

    rows = []
    for optimizer_format, fully_parallel, background in SETTINGS:
        saves, published, loads, rises, written = [], [], [], [], []
        for repeat in range(args.repeats):
            save_dir = Path(root) / f"{optimizer_format}-{fully_parallel}-{background}-{repeat}"
            writer = checkpointing.CheckpointWriter(save_dir, keep_last=2, optimizer_format=optimizer_format,
                                                    fully_parallel=fully_parallel, background=background)
            with PeakResidentMemory() as memory:
                saves.append(timed(lambda: writer.save(1, engine.model, engine.optimizer, engine.scheduler,
                                                       {"consumed_samples": 0})))
                published.append(saves[-1] + timed(writer.wait))
            rises.append(memory.rise)
            checkpoint = save_dir / "iter_0000001"
            written.append(sum(path.stat().st_size for path in checkpoint.glob(f"__{rank}_*.distcp")))
            loads.append(timed(lambda: checkpointing.load_checkpoint(
                checkpoint, engine.model, engine.optimizer, engine.scheduler, fully_parallel=fully_parallel)))
            torch.distributed.barrier()
            if rank == 0:
                shutil.rmtree(save_dir)
        rows.append({"optimizer_format": optimizer_format, "fully_parallel": fully_parallel, "background": background,
                     "save_s": statistics.median(saves), "published_s": statistics.median(published),
                     "load_s": statistics.median(loads),
                     "written_bytes": max(written), "save_rss_rise_bytes": max(rises)})
    return {"parameters": parameters, "rows": rows}


def main() -> None:
    from acemath_mcore.runtime.local_workers import run_local_workers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (processes)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.dir)
    try:
        per_rank = run_local_workers(_measure, args.ranks, args, root, timeout=3600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    parameters = per_rank[0]["parameters"]
    print(f"{parameters / 1e6:.0f}M parameters, fp32, distributed optimizer over {args.ranks} data-parallel ranks")
    print(f"{'optimizer format':<18} {'fully parallel':>14} {'background':>10} {'save s':>7} {'published s':>11} "
          f"{'load s':>7} "
          + " ".join(f"{'rank ' + str(r) + ' MB':>9}" for r in range(args.ranks))
          + " " + " ".join(f"{'rss+ r' + str(r) + ' MB':>12}" for r in range(args.ranks)))
    results = []
    for index, row in enumerate(per_rank[0]["rows"]):
        written = [rank_rows["rows"][index]["written_bytes"] for rank_rows in per_rank]
        rises = [rank_rows["rows"][index]["save_rss_rise_bytes"] for rank_rows in per_rank]
        print(f"{row['optimizer_format']:<18} {str(row['fully_parallel']):>14} {str(row['background']):>10} "
              f"{row['save_s']:>7.2f} {row['published_s']:>11.2f} {row['load_s']:>7.2f} "
              + " ".join(f"{b / 1e6:>9.0f}" for b in written) + " " + " ".join(f"{b / 1e6:>12.0f}" for b in rises))
        results.append(dict(row, written_bytes=written, save_rss_rise_bytes=rises))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"parameters": parameters, "ranks": args.ranks, "results": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
