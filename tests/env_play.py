"""Playing environments from text, for the environment tests: hermes calls parsed into a `Turn`,
and an SFT transcript replayed through a fresh environment."""

from __future__ import annotations

from typing import Any

from posttrain.envs import Turn, make_environment
from posttrain.rollout.tool_calls import parse_hermes


def calls(text: str) -> Turn:
    """The assistant turn `text` with its hermes tool calls parsed."""
    found, errors = parse_hermes(text)
    return Turn(text=text, tool_calls=tuple(found), parse_errors=tuple(errors))


def replay(name: str, transcript: list[dict[str, Any]], row: dict[str, Any]) -> float | None:
    """Feed a transcript's assistant turns to a fresh env; it must answer as the transcript."""
    env = make_environment(name, {})
    first = env.reset(row)
    assert transcript[: len(first)] == first
    i, turn_index, done = len(first), 0, False
    while i < len(transcript):
        assert not done and transcript[i]["role"] == "assistant"
        turn = calls(transcript[i]["content"])
        result = env.step(Turn(turn.text, turn.tool_calls, turn.parse_errors, turn_index))
        assert not turn.parse_errors and set(result.tool_outcomes) <= {"ok"}
        j = i + 1
        while j < len(transcript) and transcript[j]["role"] != "assistant":
            j += 1
        assert result.messages == transcript[i + 1 : j]
        i, turn_index, done = j, turn_index + 1, result.done
    assert done
    return env.final_reward()
