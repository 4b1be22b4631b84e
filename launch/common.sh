# Shared helpers for the launch scripts (sourced, not run).
#   run_or_print CMD...     runs CMD, or prints it shell-quoted on one line when DRY_RUN=1
#   deepspeed_overrides     fills the array `ds_args` with the posttrain overrides for $DS_CONFIG:
#                           train.zero_stage=<its zero_optimization.stage> train.deepspeed_config=<path>
#                           (a missing file, bad JSON or no stage: one line on stderr, exit 2)

PYTHON=${PYTHON:-python}

run_or_print() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    printf '\n'
    return 0
  fi
  exec "$@"
}

# prints zero_optimization.stage of the JSON file argv[1], or one line on stderr and exits 1
ZERO_STAGE_PY='
import json, sys
path = sys.argv[1]
try:
    with open(path) as f:
        config = json.load(f)
except ValueError as err:
    sys.exit(f"DS_CONFIG={path}: not valid JSON ({err})")
zero = config.get("zero_optimization") if isinstance(config, dict) else None
stage = zero.get("stage") if isinstance(zero, dict) else None
if stage not in (0, 1, 2, 3):
    sys.exit(f"DS_CONFIG={path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
print(stage)
'

deepspeed_overrides() {
  ds_args=()
  if [[ -n "${DS_CONFIG:-}" ]]; then
    if [[ ! -f "$DS_CONFIG" ]]; then
      echo "DS_CONFIG=$DS_CONFIG: no such file (expected e.g. launch/deepspeed/zero3.json)" >&2
      exit 2
    fi
    local stage
    stage=$("$PYTHON" -c "$ZERO_STAGE_PY" "$DS_CONFIG") || exit 2  # its one-line error is printed
    ds_args=("train.zero_stage=$stage" "train.deepspeed_config=$DS_CONFIG")
  fi
}
