#!/usr/bin/env bash
# GRPO with torchrun on one node: NPROC training ranks (DeepSpeed data parallel; gloo on CPU,
# NCCL on GPU). Run from the repository root; extra arguments are posttrain overrides.
#
#   launch/torchrun_grpo.sh train.steps=20
#   NPROC=8 DS_CONFIG=launch/deepspeed/zero3.json launch/torchrun_grpo.sh model.path=Qwen/Qwen2.5-0.5B
#   DRY_RUN=1 launch/torchrun_grpo.sh          # print the command instead of running it
#
# Environment (defaults): NPROC (2) ranks, PORT (29500) rendezvous port, RECIPE
# (recipes/quickstart.yaml), ENGINE (hf; vllm = one colocated vLLM replica per rank), DS_CONFIG
# (unset; a launch/deepspeed/*.json, sets train.zero_stage + train.deepspeed_config), PYTHON
# (python), DRY_RUN (0).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC=${NPROC:-2}
PORT=${PORT:-29500}
RECIPE=${RECIPE:-recipes/quickstart.yaml}
ENGINE=${ENGINE:-hf}
deepspeed_overrides

# SIGTERM: posttrain saves a checkpoint within train.preempt_grace_s (60); torchrun SIGKILLs its
# workers after --shutdown-timeout (its default, 30 s, is shorter)
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}

cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --master_port="$PORT"
  --shutdown-timeout="$SHUTDOWN_TIMEOUT" -m posttrain.cli train "$RECIPE" "rollout.engine=$ENGINE" "${ds_args[@]}" "$@")
run_or_print "${cmd[@]}"
