#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, one group per call (each sized for a ten-minute limit on
# one H100), from the repository root with DeepSpeed importable:
#   bash bench/gpu_suite.sh OUT_DIR tests|base128|large128|base512|zero|host|binning|unpadded|buckets|graphs
# Each pld-bench table goes to OUT_DIR/DATE_DEVICE_NAME.md and its rows to the .json beside it
# (bench/results/ keeps them). `binning` reads seq-512 shards from $SHARDS (default runs/shards512), e.g.
#   pld-prep --input WIKI_FILES... --output runs/shards512 --vocab vocab.txt --max-seq-length 512 \
#            --max-predictions-per-seq 77 --dupe-factor 1
# `buckets` reads the same shards. `unpadded` times the nested-tensor encoder (BertConfig.unpadded) against
# the padded one on synthetic batches with 70% real positions; `graphs` times per-layer CUDA graphs
# (torch.compile mode reduce-overhead) at theta 1 and 0.5, the padded and the unpadded path side by side.
set -euo pipefail
usage="usage: bash bench/gpu_suite.sh OUT_DIR tests|base128|large128|base512|zero|host|binning|unpadded|buckets|graphs"
out=${1:?$usage}
group=${2:?$usage}
mkdir -p "$out"
device=$(python3 -c 'import torch; c = torch.cuda.is_available(); print(torch.cuda.get_device_name().split()[1].lower() if c else "cpu")')
tag="$(date +%F)_$device"

bench() {
  local name=$1
  shift
  python3 -m pld_ds.bench "$@" --json "$out/${tag}_$name.json" | tee "$out/${tag}_$name.md"
}

case $group in
  tests)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/${tag}_gpu_tests.txt"
    ;;
  base128)
    bench base128_mb256_amp_compile --model base --seq-len 128 --micro-batch 256 --precision amp-bf16 --compile
    bench base128_mb64_amp_compile --model base --seq-len 128 --micro-batch 64 --precision amp-bf16 --compile --hf
    ;;
  large128)
    bench large128_mb64_amp_compile --model large --seq-len 128 --micro-batch 64 --precision amp-bf16 --compile --hf
    bench large128_mb128_amp_compile --model large --seq-len 128 --micro-batch 128 --precision amp-bf16 --compile
    ;;
  base512)
    bench base512_mb32_amp_compile --model base --seq-len 512 --micro-batch 32 --precision amp-bf16 --compile --hf
    ;;
  zero)
    bench base128_bf16_zero --model base --seq-len 128 --micro-batch 64 --precision bf16 --zero 0 1 2 3
    ;;
  host)
    python3 bench/host_overhead.py | tee "$out/${tag}_host_overhead.md"
    python3 bench/profile_step.py --model base --seq-len 128 --micro-batch 64 --precision amp-bf16 \
      | tee "$out/${tag}_profile_base128.txt"
    ;;
  binning)
    python3 bench/length_binning.py --data "${SHARDS:-runs/shards512}" --model base --micro-batch 32 --batches 40 \
      | tee "$out/${tag}_binning_base512.txt"
    ;;
  unpadded)
    for model_seq_mb in base:128:128 base:512:32 large:128:64; do
      IFS=: read -r model seq mb <<<"$model_seq_mb"
      python3 bench/unpadded_attention.py --model "$model" --seq-len "$seq" --micro-batch "$mb" --theta 1 0.5 \
        | tee "$out/${tag}_unpadded_${model}${seq}.txt"
      python3 bench/unpadded_attention.py --model "$model" --seq-len "$seq" --micro-batch "$mb" --theta 1 0.5 \
        --compile | tee "$out/${tag}_unpadded_${model}${seq}_compile.txt"
    done
    ;;
  buckets)
    python3 bench/unpadded_attention.py --data "${SHARDS:-runs/shards512}" --buckets 128,256,384,512 --model base \
      --micro-batch 32 --batches 24 --compile --theta 1 0.5 | tee "$out/${tag}_buckets_base512_compile.txt"
    ;;
  graphs)
    python3 bench/unpadded_attention.py --model large --seq-len 128 --micro-batch 64 --compile \
      --compile-mode reduce-overhead --theta 1 0.5 | tee "$out/${tag}_graphs_large128.txt"
    python3 bench/unpadded_attention.py --model base --seq-len 128 --micro-batch 128 --compile \
      --compile-mode reduce-overhead --theta 1 0.5 | tee "$out/${tag}_graphs_base128.txt"
    ;;
  *)
    echo "gpu_suite: unknown group '$group'; $usage" >&2
    exit 2
    ;;
esac
