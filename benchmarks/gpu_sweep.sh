#!/usr/bin/env bash
# Issue 9's GPU measurements in named groups, each sized to fit one 10-minute device call:
#
#   bash benchmarks/gpu_sweep.sh tests headline     # after staging TE + megatron-core (../shared/gpu/README.md)
#
# Groups:
#   tests  the gpu-marked tests (native vs CPU reference, packing, TE step, fused vs unfused weight gradients,
#          our cross-entropy kernel vs float64 and vs megatron's in a model)
#   headline  issue 9's configuration: qwen2.5-1.5b packed, mbs 4 x 4 (64k tokens), TE bf16, TE FP8, native;
#          then the loss kernels alone (benchmarks/cross_entropy_speed.py)
#   idle   the headline's TE bf16 and FP8 steps profiled: GPU busy time per kernel class, the GPU's idle time
#          per host phase of the engine, and where a step makes the host wait for the GPU (WAITS): what FP8's
#          remaining gap to 1.25x bf16 is made of
#   graphs the headline's TE bf16 and FP8 steps with CUDA graphs of every layer's MLP, profiled (compare with idle)
#   wgrad  qwen2.5-1.5b packed, mbs 2 x 2, TE and native specs, gradient-accumulation fusion on, then off
#   accum  the training-shaped step: mbs 2 x 8 micro-batches (64k tokens, one of 8 GPUs' share of 128 x 4096),
#          TE bf16, TE FP8 (delayed) and native, each with a profiled step (GPU busy share, time per kernel class)
#   mbs    micro-batch 3 and 4
#   fp8    TE FP8 with delayed and tensorwise scaling at mbs 2 x 2, and blockwise at mbs 2 x 8
#   fp8recipes  TE FP8 at the headline's mbs 4 x 4: tensorwise (current) and blockwise scaling; delayed is in headline
#   fp8layers  qwen2.5-7b's layer shapes, 4 and then 8 layers, TE bf16 vs FP8 at mbs 2 x 2: the step-time difference
#          is the per-layer cost, which is what decides FP8's gain on the full 7B and 72B models
#   rm     qwen2.5-math-1.5b reward model, 4 problem groups of 6 responses per step: one group per micro-batch
#          padded and packed
#   rmgroups  the reward model with several problem groups per micro-batch: 2 padded, 2, 3 and 4 packed (4 x 1 and
#          4 x 2 micro-batches; 4 padded runs out of memory on an 80 GB H100)
#   rmbins the paper RM recipes' micro-batch: one packed bin of ~24k tokens (8 groups of 6 responses of 420-600
#          tokens), qwen2.5-math-1.5b with full recompute as the recipes use it, then qwen2.5-math-7b's layer
#          shapes (4 layers) with and without it: the MFU of the recipes' actual shape (measured so far: ~21k-token
#          micro-batches, 1.5B, no recompute)
#   hf     the transformers baseline issue 9 quotes (unpacked, mbs 1 x 4)
#   decode generation with our Megatron loop, qwen2.5-7b shapes (random weights, bf16): 256 prompts of 100-400
#          tokens, 512 new tokens each, batches of 32 rows and --batch-size auto (tokens/s, batches, peak memory)
# One JSON line per run goes to $OUT/throughput.jsonl ($OUT defaults to .; decode: $OUT/generation.jsonl), the printed
# tables to $OUT/sweep.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-.}
mkdir -p "$out"
failed=0

bench() {
    python3 benchmarks/train_throughput.py --model qwen2.5-1.5b --steps 8 --warmup 3 --json "$out/throughput.jsonl" \
        "$@" 2>&1 | tee -a "$out/sweep.log" || failed=1
}

groups="tests headline idle graphs wgrad accum mbs fp8 fp8recipes fp8layers rm rmgroups rmbins hf decode"
[ $# -gt 0 ] || { echo "usage: $0 GROUP... ($groups)" >&2; exit 2; }
for group in "$@"; do
    echo "== $group $(date -u +%FT%TZ)" | tee -a "$out/sweep.log"
    case $group in
        tests) python3 -m pytest -m gpu tests/test_gpu.py -q 2>&1 | tee -a "$out/sweep.log" || failed=1 ;;
        headline)
            bench --impls te,te-fp8,native --packed --micro-batch 4 --micro-batches 4
            python3 benchmarks/cross_entropy_speed.py 2>&1 | tee -a "$out/sweep.log" || failed=1 ;;
        idle) bench --impls te,te-fp8 --packed --micro-batch 4 --micro-batches 4 --steps 4 --warmup 2 --profile ;;
        graphs) bench --impls te,te-fp8 --packed --micro-batch 4 --micro-batches 4 --steps 4 --warmup 3 --profile \
            --cuda-graph mlp ;;
        wgrad)
            bench --impls te,native --packed --micro-batch 2 --micro-batches 2
            bench --impls te,native --packed --micro-batch 2 --micro-batches 2 --no-wgrad-fusion ;;
        accum) bench --impls te,te-fp8,native --packed --micro-batch 2 --micro-batches 8 --profile ;;
        mbs)
            bench --impls te,native --packed --micro-batch 3 --micro-batches 2
            bench --impls te,native --packed --micro-batch 4 --micro-batches 1 ;;
        fp8)
            bench --impls te-fp8 --packed --micro-batch 2 --micro-batches 2
            bench --impls te-fp8 --packed --micro-batch 2 --micro-batches 2 --fp8-recipe tensorwise
            bench --impls te-fp8 --packed --micro-batch 2 --micro-batches 8 --fp8-recipe blockwise ;;
        fp8recipes)
            for recipe in tensorwise blockwise; do
                bench --impls te-fp8 --packed --micro-batch 4 --micro-batches 4 --steps 6 --warmup 2 --fp8-recipe $recipe
            done ;;
        fp8layers)
            for layers in 4 8; do
                bench --model qwen2.5-7b --num-layers $layers --impls te,te-fp8 --packed --micro-batch 2 --micro-batches 2 \
                    --steps 6 --warmup 2
            done ;;
        rm)
            bench --task rm --model qwen2.5-math-1.5b --impls te,native --seq-length 1024 --micro-batches 4
            bench --task rm --model qwen2.5-math-1.5b --impls te,native --seq-length 1024 --micro-batches 4 --packed ;;
        rmgroups)
            rm_bench() { bench --task rm --model qwen2.5-math-1.5b --seq-length 1024 "$@"; }
            rm_bench --impls te,native --micro-batches 2 --groups 2
            rm_bench --impls te,native --micro-batches 2 --groups 2 --packed
            rm_bench --impls te --micro-batches 1 --groups 3 --packed
            rm_bench --impls te,native --micro-batches 1 --groups 4 --packed
            rm_bench --impls te,native --micro-batches 2 --groups 4 --packed ;;
        rmbins)
            bin_bench() { bench --task rm --seq-length 600 --groups 8 --packed --micro-batches 2 "$@"; }
            bin_bench --model qwen2.5-math-1.5b --impls te --recompute full
            bin_bench --model qwen2.5-math-7b --num-layers 4 --impls te --recompute full
            bin_bench --model qwen2.5-math-7b --num-layers 4 --impls te ;;
        hf) bench --impls hf --micro-batch 1 --micro-batches 4 ;;
        decode) python3 benchmarks/generation_speed.py --model qwen2.5-7b --prompts 256 --new-tokens 512 \
            --batch-sizes 32,auto 2>&1 | tee -a "$out/sweep.log" | grep '^{' >>"$out/generation.jsonl" || failed=1 ;;
        *) echo "unknown group '$group'; choose from: $groups" >&2; exit 2 ;;
    esac
done
exit $failed
