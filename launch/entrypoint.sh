#!/usr/bin/env bash
# Entrypoint of the Docker image (it works the same outside one):
#   no arguments, or options only   pretrain with the settings of launch/common.sh, the options going to
#                                   pld_ds.pretrain: launch/per_node.sh when MASTER_ADDR is set (one node
#                                   of several), else launch/single_node.sh (every GPU of this machine)
#   a command                       run as it is: deepspeed ..., bash launch/slurm.sh, pld-prep ..., bash
#   docker run --gpus all --ipc host -v /data:/data -e DATA=/data/shards -e OUTPUT=/data/runs/base IMAGE
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
if [ "$#" -gt 0 ] && [[ $1 != -* ]]; then
  exec "$@"
elif [ -n "${MASTER_ADDR:-}" ]; then
  exec bash "$here/per_node.sh" "$@"
else
  exec bash "$here/single_node.sh" "$@"
fi
