"""The environment seam of multi-turn episodes.

An `Environment` instance is one episode (like TRL's `environment_factory`: a fresh object per
episode holds that episode's state). The rollout layer (posttrain/rollout/episodes.py) drives it:

    env = make_environment(cfg.env)          # one instance per episode
    messages = env.reset(row)                # the episode's first messages (system, user...)
    while not done:
        turn = <the model's next assistant turn, its tool calls parsed>
        result = env.step(turn)              # observation messages, optional reward, done
    reward = env.final_reward()              # or the rewards/ registry on the final answer

Everything an environment says to the model is chat messages; the rollout layer renders them
with the model's chat template and appends their token ids (loss mask 0) after the sampled ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# How a tool call ended: counted per kind in the step metrics (`agent/tool_calls/<kind>`)
CALL_OUTCOMES = ("ok", "malformed", "unknown_tool", "bad_arguments", "error", "timeout")


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model made.

    Attributes:
        name: the tool's name as the model wrote it.
        arguments: the parsed JSON arguments (a mapping).
    """

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """One assistant turn as the environment sees it.

    Attributes:
        text: the assistant's decoded text (tool-call markup included, special tokens not).
        tool_calls: the calls parsed out of `text`, in order.
        parse_errors: one message per call that could not be parsed (malformed JSON, no name...);
            a ToolEnv answers each with an error observation.
        index: 0 for the first assistant turn of the episode.
        truncated: the turn hit the per-turn token limit before its end-of-turn token.
    """

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    parse_errors: tuple[str, ...] = ()
    index: int = 0
    truncated: bool = False


@dataclass
class StepResult:
    """The environment's answer to one assistant turn.

    Attributes:
        messages: observation messages appended to the conversation (role `tool` for tool
            results, `user` for an environment's reply); may be empty when `done`.
        reward: a per-turn reward (None: none for this turn).
        done: the episode is over.
        progress: optional task progress in [0, 1] after this turn (`advantage.credit:
            progress` spreads the final reward over the turns by its increments; None: not
            reported, the previous turn's value holds).
        tool_outcomes: how each tool call of the turn ended (one of CALL_OUTCOMES each).
        tool_seconds: wall time spent in tools this turn.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    reward: float | None = None
    done: bool = False
    progress: float | None = None
    tool_outcomes: list[str] = field(default_factory=list)
    tool_seconds: float = 0.0


@runtime_checkable
class Environment(Protocol):
    """One episode of a multi-turn task.

    `tools` (a list of plain typed Python functions with Google docstrings, or empty) is what the
    chat template is rendered with (`apply_chat_template(tools=...)`) so the model sees their
    JSON schemas. An environment may also expose `solved` (a bool attribute or property, read
    after the episode) when success is not "reward >= 1" (e.g. a reward with a per-turn cost);
    success rates (`accuracy`, `eval/greedy_acc`, `eval/avg@k`) count solved episodes.
    """

    tools: list[Any]

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Start the episode from a dataset row; return its first chat messages."""
        ...

    def step(self, turn: Turn) -> StepResult:
        """Answer one assistant turn."""
        ...

    def final_reward(self) -> float | None:
        """The episode's reward once it is done (None: score the final answer with `rewards`)."""
        ...


def episode_solved(env: Any, reward: float | None) -> bool | None:
    """Whether an episode succeeded: the environment's `solved` when it has one, else
    `reward >= 1.0` (None: the episode was masked)."""
    if reward is None:
        return None
    solved = getattr(env, "solved", None)
    return bool(solved) if isinstance(solved, bool) else reward >= 1.0
