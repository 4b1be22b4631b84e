# Shared helpers for the launch scripts (sourced, not run).
#   run_or_print CMD...     runs CMD, or prints it shell-quoted on one line when DRY_RUN=1
#   deepspeed_overrides     fills the array `ds_args` with the posttrain overrides for $DS_CONFIG:
#                           train.zero_stage=<its zero_optimization.stage> train.deepspeed_config=<path>

PYTHON=${PYTHON:-python}

run_or_print() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    printf '\n'
    return 0
  fi
  exec "$@"
}

deepspeed_overrides() {
  ds_args=()
  if [[ -n "${DS_CONFIG:-}" ]]; then
    if [[ ! -f "$DS_CONFIG" ]]; then
      echo "DS_CONFIG=$DS_CONFIG: no such file (expected e.g. launch/deepspeed/zero3.json)" >&2
      exit 2
    fi
    local stage
    stage=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["zero_optimization"]["stage"])' "$DS_CONFIG")
    ds_args=("train.zero_stage=$stage" "train.deepspeed_config=$DS_CONFIG")
  fi
}
