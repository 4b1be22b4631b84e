"""Fault injection: a GRPO run whose reward raises, hangs and returns NaN still completes, and
exactly the affected samples are masked and counted.

The faulty reward is a ``@per_sample`` reward, so the boundary isolates (and times out) each sample
on its own and a fault voids only that sample. Which samples fail is a deterministic function of
(prompt, completion): a per-sample reward does not see its position in the batch, and two equal
completions of one prompt get the same fate, which the expected counts below account for because
they apply the same rule to the batch that was actually scored:

    u = sha256(prompt + NUL + completion) as a number in [0, 1)
    u < 0.10: raise          -> reason "exception"
    u < 0.15: hang (> 0.5 s) -> reason "timeout"   (reward_timeout_s = 0.5, per sample)
    u < 0.20: return NaN     -> reason "nan"
    else:     len(completion) / 10

The test wraps ``rollout_source.score`` to see each step's completions and the boundary's result
(per-sample reasons), computes the expected faulty set independently with ``fault_of``, and checks
it against the per-sample totals and against ``samples/reward_none``, ``samples/masked`` and
``reward/t_fault/errors/<reason>`` in metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path

import pytest

import rewards
from posttrain.rollout import source as rollout_source
from posttrain.trainer import Trainer
from rewards import registry
from rewards.boundary import per_sample
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow

NAME = "t_fault"
TIMEOUT_S = 0.5
STEPS = 3
PROMPTS_PER_STEP = 8
SAMPLES_PER_PROMPT = 4
RELEASE = threading.Event()  # lets the hung reward threads finish after the test


def fault_of(prompt: str, completion: str) -> str:
    """The deterministic fault rule: "exception", "timeout", "nan" or "ok"."""
    digest = hashlib.sha256(f"{prompt}\x00{completion}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < 0.10:
        return "exception"
    if u < 0.15:
        return "timeout"
    if u < 0.20:
        return "nan"
    return "ok"


@per_sample
def faulty_reward(prompt: str, completion: str, **_: object) -> float:
    fault = fault_of(prompt, completion)
    if fault == "exception":
        raise RuntimeError(f"injected failure for {completion!r}")
    if fault == "timeout":
        RELEASE.wait(60)  # far past the per-sample timeout
    if fault == "nan":
        return math.nan
    return len(completion) / 10


@pytest.fixture
def fault_reward():
    RELEASE.clear()
    rewards.register(NAME, faulty_reward)
    yield
    RELEASE.set()
    registry.unregister(NAME)


@pytest.fixture
def scored(monkeypatch):
    """Every (prompts, completions, RewardResult) the rollout source scores, in order."""
    calls: list[tuple[list[str], list[str], object]] = []
    real = rollout_source.score

    def recording(specs, prompts, completions, columns=None, timeout_s=30.0):
        result = real(specs, prompts, completions, columns, timeout_s=timeout_s)
        calls.append((list(prompts), list(completions), result))
        return result

    monkeypatch.setattr(rollout_source, "score", recording)
    return calls


def _cfg(out: Path, model: Path):
    return tiny_cfg(
        out,
        model,
        f"train.steps={STEPS}",
        f"rollout.prompts_per_step={PROMPTS_PER_STEP}",
        f"rollout.samples_per_prompt={SAMPLES_PER_PROMPT}",
        "rollout.engine=hf",
        "rollout.filter_zero_variance_groups=false",
        "rollout.mask_truncated=false",
        f"reward_timeout_s={TIMEOUT_S}",
        f"rewards=[{{name: {NAME}}}, {{name: format_number, weight: 0.1}}]",
    )


def test_faulty_reward_masks_exactly_the_affected_samples(
    tmp_path, tiny_model_dir, fault_reward, scored
):
    t0 = time.monotonic()
    history = Trainer(_cfg(tmp_path / "run", tiny_model_dir)).train()
    elapsed = time.monotonic() - t0
    assert len(history) == STEPS
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert len(scored) == STEPS  # one scoring round per step (no dynamic sampling, no eval)

    totals: dict[str, int] = {"exception": 0, "timeout": 0, "nan": 0}
    for step, (row, (prompts, completions, result)) in enumerate(
        zip(rows, scored, strict=True), start=1
    ):
        assert len(completions) == PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
        faults = [fault_of(p, c) for p, c in zip(prompts, completions, strict=True)]
        # per sample: exactly the faulty samples have no reward, with the right reason
        for i, fault in enumerate(faults):
            if fault == "ok":
                assert result.total[i] is not None and result.reasons[i] is None, (step, i)
                assert result.per_reward[NAME][i] == len(completions[i]) / 10
            else:
                assert result.total[i] is None, (step, i, fault)
                assert result.reasons[i] == f"{NAME}:{fault}", (step, i)
            # the other reward keeps scoring every sample
            assert result.per_reward["format_number"][i] is not None
        n_bad = sum(f != "ok" for f in faults)
        assert row["samples/reward_none"] == n_bad, step
        assert row["samples/masked"] == n_bad, step
        assert row["reward/masked_count"] == n_bad, step
        for reason in totals:
            expected = sum(f == reason for f in faults)
            assert row.get(f"reward/{NAME}/errors/{reason}", 0.0) == expected, (step, reason)
            totals[reason] += expected
        assert not any(k.startswith("reward/format_number/errors/") for k in row), step
        assert math.isfinite(row["loss"]), step
    # the deterministic rule hit every kind of fault in this run
    assert all(n > 0 for n in totals.values()), totals
    # hangs were cut at the per-sample timeout, not waited out
    assert elapsed < 600
