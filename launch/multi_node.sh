#!/usr/bin/env bash
# Pretrain on several nodes from one command: the deepspeed launcher starts every host of HOSTFILE over
# ssh (pdsh), so each needs passwordless ssh from here, this repository at the same path, and a shared OUTPUT.
#   HOSTFILE (required)  DeepSpeed hostfile, one "hostname slots=GPUS" line per node
#   DATA (required), CONFIG, OUTPUT, MODEL, MAX_STEPS   see launch/common.sh
#   NNODES        use the first NNODES hosts (all)        NGPU  GPUs per host (the hostfile's slots)
#   MASTER_ADDR   the first host's address as the others reach it (asked of that host over ssh)
#   MASTER_PORT   free TCP port on the first host (29500)
# Extra arguments go to pld_ds.pretrain unchanged. The run resumes from OUTPUT's newest checkpoint.
#   HOSTFILE=hosts DATA=/shared/shards OUTPUT=/shared/runs/base bash launch/multi_node.sh
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}"
launcher_args=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[ -z "${MASTER_ADDR:-}" ] || launcher_args+=(--master_addr "$MASTER_ADDR")
[ -z "${NNODES:-}" ] || launcher_args+=(--num_nodes "$NNODES")
[ -z "${NGPU:-}" ] || launcher_args+=(--num_gpus "$NGPU")
# pdsh hands the command to a remote shell; deepspeed quotes the arguments only against spaces, and
# the working directory and master address not at all. Refuse what that shell could read as code.
word='^[[:alnum:]_@+=:,./-]*$'
spaced='^[[:alnum:]_@+=:,./ -]*$'
check_safe() {
  [[ $2 =~ $1 ]] || { echo "${0##*/}: refusing '$2': the pdsh launcher would let a remote shell" \
    "interpret it (rename it, or start each node with launch/per_node.sh)" >&2; exit 2; }
}
check_safe "$word" "$PWD"
check_safe "$word" "${MASTER_ADDR:-}"
for value in "${pretrain_args[@]}" "$@"; do check_safe "$spaced" "$value"; done
exec deepspeed "${launcher_args[@]}" "${pretrain_args[@]}" "$@"
