#!/usr/bin/env bash
#SBATCH --job-name=pld_ds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# Pretrain under SLURM: one task per node runs launch/per_node.sh, whose settings (DATA, CONFIG, OUTPUT,
# MODEL, MAX_STEPS, NGPU) pass through srun; node ranks come from SLURM, node 0 is the job's first host.
#   MASTER_PORT   free TCP port on the first host (20000 + job id mod 20000: jobs sharing a host differ)
# Submit from the repository root; options after the script go to pld_ds.pretrain; sbatch options win
# over the lines above. A requeued or resubmitted job resumes from OUTPUT's newest checkpoint.
#   DATA=/shared/shards OUTPUT=/shared/runs/base sbatch --nodes 4 launch/slurm.sh --log-interval 50
set -euo pipefail
: "${DATA:?set DATA to a folder of *.hdf5 shards}"
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${hosts%%$'\n'*}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export NNODES=$SLURM_JOB_NUM_NODES
unset NODE_RANK  # a value inherited from the submitting shell would give every node the same rank
# Each task takes every CPU of its node: newer srun no longer inherits sbatch's CPU count.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
  bash launch/per_node.sh "$@"
