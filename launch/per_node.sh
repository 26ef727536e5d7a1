#!/usr/bin/env bash
# Pretrain on several nodes without ssh between them: start this once on every node (by hand, from a
# container, or through srun as launch/slurm.sh does). Every setting is an environment variable:
#   DATA (required), CONFIG, OUTPUT, MODEL, MAX_STEPS   see launch/common.sh; OUTPUT must be shared
#   NNODES        number of nodes (SLURM_JOB_NUM_NODES under SLURM)
#   NODE_RANK     this node's index, 0 to NNODES-1 (SLURM_NODEID under SLURM)
#   MASTER_ADDR   address of node 0 as every node reaches it (required)
#   MASTER_PORT   free TCP port on node 0 (29500)
#   NGPU          processes on this node, the same on every node (every GPU; 1 without one)
# Extra arguments go to pld_ds.pretrain unchanged. The run resumes from OUTPUT's newest checkpoint.
#   DATA=/data/shards NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/per_node.sh
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:?set NNODES to the number of nodes}}
node_rank=${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK to this node\'s index}}
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
check_count NNODES "$nnodes"
check_count NODE_RANK "$node_rank"
[ "$node_rank" -lt "$nnodes" ] || { echo "${0##*/}: NODE_RANK $node_rank is not below NNODES $nnodes" >&2; exit 2; }
ngpu=$(local_gpus)
# deepspeed --no_ssh still reads the node list from a hostfile; only its length and slots count here.
# The file depends on nothing but its name, so jobs that share it write the same bytes (then rename).
hostfile=${TMPDIR:-/tmp}/pld_ds-$(id -u)-hostfile-${nnodes}x$ngpu
if [ ! -s "$hostfile" ]; then
  tmp=$(mktemp "$hostfile.XXXXXX")
  for ((i = 0; i < nnodes; i++)); do echo "node$i slots=$ngpu"; done >"$tmp"
  mv -f "$tmp" "$hostfile"
fi
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" "${pretrain_args[@]}" "$@"
