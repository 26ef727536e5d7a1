#!/usr/bin/env bash
# Pretrain on one node with the deepspeed launcher; every setting is an environment variable:
#   DATA (required)  folder of shards        CONFIG  DeepSpeed JSON (ds_configs/bert_base_pld.json)
#   OUTPUT           run folder (runs/<date>) MODEL   preset or JSON (base)
#   NGPU             GPUs to use (all)        MAX_STEPS  optimizer steps (200000)
# Extra arguments go to pld_ds.pretrain unchanged. The run resumes from OUTPUT's newest checkpoint.
set -euo pipefail
: "${DATA:?set DATA to a folder of *.hdf5 shards}"
if [ -z "${NGPU:-}" ]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "$NGPU" -gt 0 ] || NGPU=1
fi
exec deepspeed --num_gpus "$NGPU" --module pld_ds.pretrain \
  --deepspeed_config "${CONFIG:-ds_configs/bert_base_pld.json}" \
  --data "$DATA" \
  --output "${OUTPUT:-runs/$(date +%Y%m%d-%H%M%S)}" \
  --model "${MODEL:-base}" \
  --max-steps "${MAX_STEPS:-200000}" \
  --resume auto \
  "$@"
