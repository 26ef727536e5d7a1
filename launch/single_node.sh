#!/usr/bin/env bash
# Pretrain on this machine with the deepspeed launcher. Every setting is an environment variable:
#   DATA (required), CONFIG, OUTPUT, MODEL, MAX_STEPS   see launch/common.sh
#   NGPU          processes to start (every GPU; 1 on a machine without one)
#   MASTER_PORT   local TCP port for the ranks to meet on (29500)
# Extra arguments go to pld_ds.pretrain unchanged. The run resumes from OUTPUT's newest checkpoint.
#   DATA=/data/shards NGPU=8 bash launch/single_node.sh --log-interval 50
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ngpu=$(local_gpus)
exec deepspeed --num_gpus "$ngpu" --master_port "${MASTER_PORT:-29500}" "${pretrain_args[@]}" "$@"
