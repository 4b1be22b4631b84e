#!/usr/bin/env bash
# GRPO launched by `accelerate launch` (accelerate is only the process launcher here: posttrain
# drives DeepSpeed itself). Run from the repository root; extra arguments are posttrain overrides.
#
#   launch/accelerate_grpo.sh train.steps=20
#   CONFIG=launch/accelerate/deepspeed_zero3.yaml NPROC=8 launch/accelerate_grpo.sh
#   DRY_RUN=1 launch/accelerate_grpo.sh        # print the command instead of running it
#
# When CONFIG names a `deepspeed_config_file`, that JSON is passed to posttrain as
# train.deepspeed_config (with train.zero_stage from its zero_optimization.stage), so the YAML
# stays the single place that says which ZeRO stage runs.
#
# Environment (defaults): CONFIG (launch/accelerate/multi_gpu.yaml), NPROC (the YAML's
# num_processes), PORT (the YAML's main_process_port), RECIPE (recipes/quickstart.yaml), ENGINE
# (hf), ACCELERATE (accelerate), PYTHON (python), DRY_RUN (0).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=${CONFIG:-launch/accelerate/multi_gpu.yaml}
if [[ ! -f "$CONFIG" ]]; then
  echo "CONFIG=$CONFIG: no such file (expected e.g. launch/accelerate/multi_gpu.yaml)" >&2
  exit 2
fi
RECIPE=${RECIPE:-recipes/quickstart.yaml}
ENGINE=${ENGINE:-hf}
ACCELERATE=${ACCELERATE:-accelerate}
DS_CONFIG=${DS_CONFIG:-$(sed -n 's/^[[:space:]]*deepspeed_config_file:[[:space:]]*//p' "$CONFIG" | tr -d "\"'")}
deepspeed_overrides

launch_args=(--config_file "$CONFIG")
[[ -n "${NPROC:-}" ]] && launch_args+=(--num_processes "$NPROC")
[[ -n "${PORT:-}" ]] && launch_args+=(--main_process_port "$PORT")

cmd=("$ACCELERATE" launch "${launch_args[@]}"
  -m posttrain.cli train "$RECIPE" "rollout.engine=$ENGINE" "${ds_args[@]}" "$@")
run_or_print "${cmd[@]}"
