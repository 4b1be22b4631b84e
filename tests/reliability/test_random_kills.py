"""Random kills, CI size: real `posttrain train` processes SIGKILLed inside chosen phases (the phase
trace's hold), resumed with `train.resume=auto`, compared with a straight run bitwise (per-step
metrics without timings, final weights, data ids, the checkpoints each resume loaded). The longer
run over every phase and algorithm is `benchmarks/reliability.py` (results/reliability.json).
"""

from __future__ import annotations

import pytest

from benchmarks.reliability import CONFIGS, Attempt, run_trial, straight_run

pytestmark = pytest.mark.slow

# (config, the holds of the killed processes): GRPO killed while a resume loads its checkpoint,
# SFT in a checkpoint write, GRPO with max_staleness=1 in its 2nd prefetch (step 1 trains: no
# checkpoint yet; its 4th, after the step-1 checkpoint, is tested below)
TRIALS = (
    ("grpo", ("optimizer step@3", "resume@1")),
    ("sft", ("checkpoint write@3",)),
    ("grpo_async", ("async prefetch@2",)),
    # DPO in its final eval (reused from step 4's): the resumed run must not log it a second time
    ("dpo", ("eval@4",)),
)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    names = {name for name, _ in TRIALS} | {"grpo_async"}
    return {c.name: straight_run(c, work, tiny_model_dir) for c in CONFIGS if c.name in names}


def _trial(straight, model, work, config, holds):
    plan = [Attempt(hold, "entry") for hold in holds]
    return run_trial(0, straight[config], holds[-1].split("@")[0], plan, work, model)


@pytest.mark.parametrize(("config", "holds"), TRIALS)
def test_killed_inside_a_phase_resumes_exactly(straight, tiny_model_dir, tmp_path, config, holds):
    row = _trial(straight, tiny_model_dir, tmp_path, config, holds)
    assert row["completed"], row
    assert row["kills"] == len(holds)
    for attempt, hold in zip(row["attempts"], holds, strict=False):
        # killed at the phase's entry: the trace shows it begun and not ended
        assert hold.split("@")[0] in attempt["hit"], attempt
    for attempt in row["attempts"][1:]:
        # each resume loaded the newest complete checkpoint (one killed first: maybe none)
        assert attempt["loaded"] == attempt["expected"] or attempt["killed"], attempt
    if holds[-1] == "resume@1":  # the second process died loading step-2; the third loaded it
        assert row["attempts"][2]["loaded"].endswith("step-000002")
    assert row["checkpoint_problems"] == []  # each checkpoint loaded = the straight run's, bitwise
    assert row["diff"] == [] and row["metrics_equal"] and row["ids_equal"] is not False
    assert row["weights_equal"]
    assert row["outcome"] == "resumed exactly"


def test_async_resume_trains_the_prefetched_batch_exactly(straight, tiny_model_dir, tmp_path):
    """An async run killed in its 4th prefetch resumes from the step-1 checkpoint, which holds the
    batch of step 2 the straight run had prefetched with the weights before step 1: the resumed
    run trains that batch (staleness 1, as straight), so metrics, weights and data ids are equal."""
    row = _trial(straight, tiny_model_dir, tmp_path, "grpo_async", ("async prefetch@4",))
    assert row["completed"] and row["checkpoint_problems"] == []
    assert row["attempts"][1]["loaded"].endswith("step-000001")
    assert row["diff"] == [] and row["metrics_equal"] and row["ids_equal"] is True
    assert row["weights_equal"]
    assert row["outcome"] == "resumed exactly"
