#!/usr/bin/env bash
# The main job on an embedded default, on CPU: a corpus from the documentation that ships with
# Python (or CORPUS=path of your own text), shards with pld-prep, PLD pretraining through the
# DeepSpeed engine (a 12-layer, 128-wide PreLN BERT, sequence length 128, an 8,192-token vocabulary),
# evaluation on held-out shards against the unigram baseline, fill-mask examples. Settings: OUT
# (runs/quickstart), STEPS (1500).
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
pld-prep --input "$corpus" --output "$out/shards" --train-vocab 8192 --max-seq-length 128 \
  --max-predictions-per-seq 20 --dupe-factor 5 --num-shards 4 --seed 1
pld-pretrain --deepspeed_config ds_configs/quickstart_cpu.json --data "$out/shards" --output "$out/run" \
  --model narrow12 --max-steps "${STEPS:-1500}" --log-interval 50 --eval-interval 250 --eval-batches 40 --resume auto
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
