#!/usr/bin/env bash
# The main job on an embedded default, on CPU: a corpus from the documentation that ships with
# Python (or CORPUS=path of your own text), shards with pld-prep, PLD pretraining through the
# DeepSpeed engine (the micro preset, sequence length 64, a 4,096-token vocabulary, MLM only, 30% of
# the tokens masked anew in every training batch), evaluation on held-out shards (masked at 15% by
# pld-prep) against the unigram baseline, fill-mask examples. Settings: OUT (runs/quickstart),
# STEPS (3000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
out=${OUT:-runs/quickstart}
corpus=${CORPUS:-}
if [ -z "$corpus" ]; then
  corpus=$out/corpus.txt
  python -m data_prep.demo_corpus "$corpus"
fi
pld-prep --input "$corpus" --output "$out/shards" --train-vocab 4096 --max-seq-length 64 \
  --max-predictions-per-seq 10 --dupe-factor 5 --no-nsp --validation-fraction 0.05 --num-shards 4 --seed 1
pld-pretrain --deepspeed_config ds_configs/quickstart_cpu.json --data "$out/shards" --output "$out/run" \
  --model micro --masked-lm-prob 0.3 --max-steps "${STEPS:-3000}" --log-interval 100 --eval-interval 500 \
  --eval-batches 40 --resume auto
# The unigram baseline, the eval loss below it, masked-token accuracy, three fill-mask answers, plot.png.
python -m pld_ds.probe "$out/run" --data "$out/shards" --plot "$out/run/plot.png"
cat <<TXT

artefacts
  shards       $out/shards (manifest.json, vocab.txt, train/, validation/)
  checkpoint   $out/run/checkpoints
  scalars      $out/run/tensorboard (also CSV under $out/run/csv)
  plot         $out/run/plot.png (loss beside the unigram baseline, theta and expected depth against steps)
  settings     $out/run/run_config.json
watch with:    .venv/bin/tensorboard --logdir $out/run/tensorboard
TXT
