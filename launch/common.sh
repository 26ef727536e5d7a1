# shellcheck shell=bash
# Sourced by the launchers: the settings they share, checked once and turned into pld_ds.pretrain arguments.
#   DATA (required)  folder of *.hdf5 shards, or one with train/ and validation/ (what pld-prep writes)
#   CONFIG           DeepSpeed JSON (ds_configs/bert_base_pld.json of this repository)
#   OUTPUT           run folder (runs/<CONFIG name>); launching again with the same OUTPUT resumes
#   MODEL            preset (tiny, mini, small, base, large) or JSON file (base)
#   MAX_STEPS        optimizer steps to train to (200000)
# Extra arguments given to a launcher follow these, so they win: `--resume PATH` replaces `--resume auto`.
: "${DATA:?set DATA to a folder of *.hdf5 shards}"
CONFIG=${CONFIG:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/ds_configs/bert_base_pld.json}
# shellcheck disable=SC2034  # read by the launchers that source this file
pretrain_args=(--module pld_ds.pretrain --deepspeed_config "$CONFIG" --data "$DATA"
  --output "${OUTPUT:-runs/$(basename "$CONFIG" .json)}" --model "${MODEL:-base}"
  --max-steps "${MAX_STEPS:-200000}" --resume auto)

# Exits unless $2 is a plain number: bash arithmetic would run a $(...) hidden in it.
check_count() {
  [[ $2 =~ ^[0-9]+$ ]] || { echo "${0##*/}: $1: expected a number, got '$2'" >&2; exit 2; }
}

# Processes per node: NGPU, else the GPUs nvidia-smi lists, else one (a CPU-only machine).
local_gpus() {
  local count=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
  check_count NGPU "$count"
  echo "$((count > 0 ? count : 1))"
}
