"""The LLM judge against a real vLLM OpenAI-compatible server (the tiny random model, on CPU).

The tiny model answers garbage, so the judge rewards must complete and give ``None`` with a reason
(``unparseable``), never a silent 0, and those reasons must reach the boundary's error counts.
With vLLM's structured outputs (a regex forcing ``{"score": 0|0.5|1}``) the same model gives valid
answers, which are cached: a repeat is served from the cache (memory, then the jsonl file).

The model copy gets ``max_position_embeddings=4096`` (RoPE, random weights: nothing else changes)
so the judge prompts, about 1,000 characters of a character-level tokenizer, fit in
``--max-model-len 2048``; the server's own 512 would reject every prompt with HTTP 400.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import judge as judge_mod
from rewards.boundary import score
from rewards.registry import RewardSpec
from rewards.rubric import rubric
from rewards.startup import validate_rewards
from rewards.verifier import judge_verifier
from tests.servers import free_port, stop, wait_healthy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

MODEL = "tiny-judge"
MAX_MODEL_LEN = 2048
PROMPTS = ["What is 2 + 3?"] * 4
COMPLETIONS = ["5", "The answer is 6.", "\\boxed{5}", "five"]
ANSWERS = ["5"] * 4
RUBRIC = [
    {"criterion": "Gives the result '5'", "kind": "essential"},
    {"criterion": "Shows the addition", "kind": "optional"},
    {"criterion": "Claims the result is '6'", "kind": "pitfall"},
]
SCORE_REGEX = r'\{"score": (0|0\.5|1)\}'
PARSE_FAILURES = {"unparseable", "invalid_answer"}


def _long_context_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_position_embeddings"] = 2 * MAX_MODEL_LEN
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="module")
def judge_url(tiny_model_dir, tmp_path_factory):
    """Base URL of a vLLM server of the tiny model; the server is always stopped afterwards."""
    root = tmp_path_factory.mktemp("vllm-judge")
    model_dir = _long_context_copy(tiny_model_dir, root / "model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL,
        "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_healthy(proc, url, log)
        yield url
    finally:
        stop(proc)


@pytest.fixture(autouse=True)
def _fresh_clients():
    judge_mod.reset_clients()
    yield
    judge_mod.reset_clients()


def _opts(url: str, **kw) -> dict:
    return {"base_url": url, "model": MODEL, "max_tokens": 24, "max_retries": 0, **kw}


def _reason_of(result, name: str, i: int) -> str | None:
    for part in (result.reasons[i] or "").split("; "):
        if part.startswith(f"{name}:"):
            return part.split(":", 1)[1]
    return None


def test_garbage_answers_are_none_with_a_reason_never_zero(judge_url):
    specs = [
        RewardSpec("judge_verifier", kwargs=_opts(judge_url)),
        RewardSpec("rubric", kwargs=_opts(judge_url, max_tokens=48)),
    ]
    columns = {"answer": ANSWERS, "rubric": [RUBRIC] * len(PROMPTS)}
    validate_rewards(specs, columns)  # reachable and serving MODEL
    result = score(specs, PROMPTS, COMPLETIONS, columns, timeout_s=120)
    for name in ("judge_verifier", "rubric"):
        n_none = 0
        for i, value in enumerate(result.per_reward[name]):
            if value is None:
                n_none += 1
                assert _reason_of(result, name, i) in PARSE_FAILURES, result.reasons[i]
            else:  # the random model happened to write a valid verdict
                assert 0.0 <= value <= 1.0
        counted = sum(v for k, v in result.errors.items() if k.startswith(f"reward/{name}/"))
        assert counted == n_none, result.errors
        assert f"reward/{name}/errors/none" not in result.errors
    # What the tiny random model actually does: no JSON at all.
    assert result.errors.get("reward/judge_verifier/errors/unparseable", 0) >= 1
    direct = judge_verifier(PROMPTS, COMPLETIONS, ANSWERS, **_opts(judge_url))
    assert all(s is None or 0.0 <= s <= 1.0 for s in direct)
    assert {r for s, r in zip(direct, direct.reasons, strict=True) if s is None} <= PARSE_FAILURES


def test_http_error_reason_reaches_the_counts(judge_url):
    long = "x" * (MAX_MODEL_LEN + 100)  # the judge prompt exceeds the server's context
    result = score(
        [RewardSpec("judge_verifier", kwargs=_opts(judge_url))],
        PROMPTS[:2],
        ["5", long],
        {"answer": ANSWERS[:2]},
        timeout_s=120,
    )
    assert result.per_reward["judge_verifier"][1] is None
    assert result.errors.get("reward/judge_verifier/errors/http_400") == 1
    assert _reason_of(result, "judge_verifier", 1) == "http_400"


def test_structured_answers_are_valid_and_cached(judge_url, tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    forced = {"structured_outputs": {"regex": SCORE_REGEX}}
    kw = _opts(judge_url, extra_body=forced, cache_path=str(cache))
    specs = [RewardSpec("judge_verifier", kwargs=kw)]
    columns = {"answer": ANSWERS}

    first = score(specs, PROMPTS, COMPLETIONS, columns, timeout_s=120)
    assert first.errors == {}
    assert all(v in (0.0, 0.5, 1.0) for v in first.per_reward["judge_verifier"])
    client = judge_mod.get_client(
        judge_url, MODEL, **{k: v for k, v in kw.items() if k not in ("base_url", "model")}
    )
    assert client.stats.requests == len(PROMPTS) and client.stats.cache_hits == 0
    assert first.metrics["reward/judge_verifier/cached_frac"] == 0.0

    again = score(specs, PROMPTS, COMPLETIONS, columns, timeout_s=120)
    assert again.per_reward == first.per_reward
    assert client.stats.requests == len(PROMPTS)  # nothing sent: every answer from the cache
    assert client.stats.cache_hits == len(PROMPTS)
    assert again.metrics["reward/judge_verifier/cached_frac"] == 1.0
    assert all(r.cached for r in judge_verifier.last_results)

    # a new process (fresh clients) reads the jsonl cache
    assert len(cache.read_text().splitlines()) == len(PROMPTS)
    judge_mod.reset_clients()
    from_file = judge_verifier(PROMPTS, COMPLETIONS, ANSWERS, **kw)
    assert list(from_file) == first.per_reward["judge_verifier"]
    assert from_file.metrics["cached_frac"] == 1.0

    # the rubric reward against the same server, implicit grading forced to a valid verdict
    graded = rubric(
        PROMPTS, COMPLETIONS, RUBRIC, aggregation="implicit", **_opts(judge_url, extra_body=forced)
    )
    assert all(v in (0.0, 0.5, 1.0) for v in graded) and graded.reasons == [None] * len(PROMPTS)
