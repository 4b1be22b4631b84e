"""Multi-turn episodes: the engine samples each assistant turn, an environment answers it.

Token-exact by construction: an episode's token ids are the prompt's, then each turn's sampled ids
exactly as the engine returned them (with its log-probs, loss mask 1), then the ids of the
environment's observation (loss mask 0), and so on. Earlier turns are never re-tokenized from
text. An observation's ids come from rendering the conversation with the chat template and taking
the new suffix; a template that is not prefix-preserving (it rewrites earlier turns, e.g. drops
`<think>` blocks) is refused with a message naming the turn.

All active episodes of a step advance together: one engine call per turn over the episodes still
running, then their environments answer concurrently (threads). An environment that raises ends
its episode with reward None (masked out of the loss, counted), never the run.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from posttrain.envs.base import Environment, StepResult, Turn
from posttrain.errors import ConfigError
from posttrain.rollout.engine import Rollout, SamplingConfig
from posttrain.rollout.tool_calls import parse_tool_calls

# Why an episode ended (counted in `agent/end/<reason>`)
END_REASONS = ("done", "max_turns", "max_episode_tokens", "turn_length", "env_error", "env_timeout")
# How observation ids are rendered (`env.observation_render`): the episode's own conversation
# re-rendered, or each observation after a fixed one-turn base (templates that rewrite history)
OBSERVATION_RENDERS = ("full", "fixed_base")
_BASE = ({"role": "user", "content": "."}, {"role": "assistant", "content": "."})


class TemplateError(ConfigError):
    """The chat template rewrote earlier turns, so appended ids would not match a re-render."""


@dataclass(frozen=True)
class EpisodeLimits:
    """Per-episode limits (`env.*` in the config).

    Attributes:
        max_turns: assistant turns at most.
        max_episode_tokens: tokens after the prompt (sampled + observations) at most; the
            episode ends once it has used them.
        max_new_tokens: tokens per assistant turn.
        step_timeout_s: an environment's `step` running longer ends its episode (masked).
        observation_render: one of OBSERVATION_RENDERS (see `observation_ids`).
    """

    max_turns: int = 4
    max_episode_tokens: int = 256
    max_new_tokens: int = 64
    step_timeout_s: float = 60.0
    observation_render: str = "full"


@dataclass
class Episode:
    """One episode's conversation, token ids and bookkeeping.

    Attributes:
        env: the environment instance (one per episode).
        messages: the conversation so far; an assistant content is its turn's sampled ids decoded
            with special tokens kept (but the end-of-turn token), so the template renders it
            back verbatim.
        prompt_ids: the rendered first messages (ending with the assistant header).
        ids: every token after the prompt: sampled turns and observations, in order.
        mask: 1 on sampled tokens, 0 on observation tokens; len(mask) == len(ids).
        logprobs: the engine's log-prob of each sampled token, 0.0 on observation tokens.
        turn_versions: the engine's weight version of each sampled turn.
        turn_lengths: sampled tokens of each turn.
        turn_rewards: per-turn rewards the environment gave (None where it gave none).
        turn_progress: per-turn progress the environment reported (None where it gave none).
        texts: each turn's decoded text with special tokens skipped (what rewards read).
        tool_outcomes: every tool call's outcome (CALL_OUTCOMES).
        end: why the episode ended ("" while it runs).
        solved: whether it succeeded (`envs.base.episode_solved`; None until scored or masked).
        seconds: environment time (reset + steps).
    """

    env: Environment
    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_versions: list[int] = field(default_factory=list)
    turn_lengths: list[int] = field(default_factory=list)
    turn_rewards: list[float | None] = field(default_factory=list)
    turn_progress: list[float | None] = field(default_factory=list)
    tool_outcomes: list[str] = field(default_factory=list)
    end: str = ""
    solved: bool | None = None
    seconds: float = 0.0
    tool_seconds: float = 0.0

    texts: list[str] = field(default_factory=list)

    @property
    def final_text(self) -> str:
        """The last assistant turn's text, special tokens skipped ("" before the first turn)."""
        return self.texts[-1] if self.texts else ""


def render(tokenizer: Any, messages: list[dict], tools: list | None, generation: bool) -> str:
    """The chat template's text for `messages` (with the tools' schemas when given)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _turn_renders(
    tokenizer: Any,
    history: list[dict[str, Any]],
    assistant: dict[str, Any],
    observations: list[dict[str, Any]],
    tools: list | None,
) -> tuple[str, str, str, bool]:
    """The template's text before an assistant turn (with its header), with the turn closed, and
    with the observations after it; and whether each is a prefix of the next."""
    seen = render(tokenizer, history, tools, generation=True)
    closed = render(tokenizer, [*history, assistant], tools, generation=False)
    after = render(tokenizer, [*history, assistant, *observations], tools, generation=True)
    return seen, closed, after, closed.startswith(seen) and after.startswith(closed)


def observation_ids(
    tokenizer: Any,
    history: list[dict[str, Any]],
    sampled_ids: Sequence[int],
    text: str,
    observations: list[dict[str, Any]],
    tools: list | None,
    turn: int,
) -> list[int]:
    """The token ids that follow a sampled assistant turn: the template's text between the end of
    the sampled ids and the next assistant header, observations included.

    Args:
        history: the conversation before the assistant turn.
        sampled_ids: the turn's ids as the engine sampled them (ending with the end-of-turn id).
        text: the assistant message's content: the sampled ids but the end-of-turn token, decoded
            with special tokens kept.
        observations: the environment's messages after the turn.
        tools: the environment's tools (rendered into the template).
        turn: the turn's index, for the error message.

    Raises:
        TemplateError: the template does not render the sampled turn verbatim after what the model
            saw, or rewrites the conversation when the observations are added.
    """
    assistant = {"role": "assistant", "content": text}
    seen, closed, after, ok = _turn_renders(tokenizer, history, assistant, observations, tools)
    sampled = tokenizer.decode(list(sampled_ids), skip_special_tokens=False)
    if not ok or not closed[len(seen) :].startswith(sampled):
        raise TemplateError(
            f"chat template is not prefix-preserving at assistant turn {turn}: rendering the "
            "conversation with this turn and its observations changes the text before them (the "
            "template rewrites earlier turns, e.g. drops <think> blocks), so appended token ids "
            "would not match what the model sees; use a template that renders earlier turns "
            "verbatim"
        )
    return _ids(tokenizer, closed[len(seen) + len(sampled) :] + after[len(closed) :])


def fixed_base_observation_ids(
    tokenizer: Any,
    sampled_ids: Sequence[int],
    text: str,
    observations: list[dict[str, Any]],
    tools: list | None,
    turn: int,
) -> list[int]:
    """`observation_ids` for a template that rewrites earlier turns (`observation_render:
    fixed_base`): the observations are rendered after a fixed one-turn base conversation (a user
    message and an assistant reply, both "."), not after the episode's own history, so how the
    template would re-render earlier turns (e.g. dropping their `<think>` blocks) cannot change
    them. The text between the end of the sampled ids and the observations (e.g. a newline
    after the end-of-turn token) comes from the base's closed assistant turn.

    Args:
        sampled_ids: the turn's ids as the engine sampled them (ending with the end-of-turn id).
        text: the sampled ids but the end-of-turn token, decoded with special tokens kept.
        observations, tools, turn: as for `observation_ids`.

    Raises:
        TemplateError: even the fixed base is rewritten when observations follow it, or the
            sampled turn's ending is not the template's end of an assistant turn.
    """
    user, assistant = _BASE
    seen, closed, after, ok = _turn_renders(tokenizer, [user], assistant, observations, tools)
    ending = tokenizer.decode(list(sampled_ids), skip_special_tokens=False)[len(text) :]
    tail = closed[len(seen) :]
    if not ok or not tail.startswith(".") or not tail[1:].startswith(ending):
        raise TemplateError(
            f"env.observation_render=fixed_base: at assistant turn {turn} the chat template "
            "rewrites even a fixed one-turn conversation when observations follow it, or ends "
            f"an assistant turn differently from the sampled ending {ending!r}; this template "
            "cannot be used for multi-turn episodes"
        )
    return _ids(tokenizer, tail[1 + len(ending) :] + after[len(closed) :])


def _start(env_factory: Callable[[], Environment], row: dict, tokenizer: Any) -> Episode:
    env = env_factory()
    t0 = time.perf_counter()
    try:
        messages = env.reset(row)
    except Exception:  # an environment that raises masks its episode, never the run
        ep = Episode(env, [], [])
        ep.end = "env_error"
        ep.seconds = time.perf_counter() - t0
        return ep
    prompt = _ids(tokenizer, render(tokenizer, messages, env.tools, generation=True))
    return Episode(env, list(messages), prompt, seconds=time.perf_counter() - t0)


def _content(tokenizer: Any, ids: Sequence[int]) -> str:
    """A sampled turn as the assistant message's content: every token but the end-of-turn one,
    special tokens kept (a turn may contain one mid-way; skipping it would change the text)."""
    ids = list(ids)
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _append_turn(ep: Episode, r: Rollout) -> None:
    ep.ids += r.completion_ids
    ep.mask += [1] * len(r.completion_ids)
    ep.logprobs += list(r.logprobs[: len(r.completion_ids)])
    ep.turn_versions.append(r.weight_version)
    ep.turn_lengths.append(len(r.completion_ids))


def _answer(ep: Episode, r: Rollout, parser: str, tokenizer: Any) -> StepResult | None:
    """The environment's answer to the episode's newest turn (None: the environment raised)."""
    calls, errors = parse_tool_calls(r.text, parser, tokenizer)
    turn = Turn(
        r.text,
        tuple(calls),
        tuple(errors),
        index=len(ep.turn_lengths) - 1,
        truncated=r.finish_reason == "length",
    )
    t0 = time.perf_counter()
    try:
        result = ep.env.step(turn)
    except Exception:
        result = None
    ep.seconds += time.perf_counter() - t0
    return result


def _answer_all(
    active: list[Episode], rollouts: list[Rollout], parser: str, tokenizer: Any, timeout_s: float
) -> list[StepResult | str]:
    """Every running episode's environment answers its turn, concurrently (daemon threads: a
    hung environment cannot block the run or its exit). A str is why there is no answer."""
    results: list[StepResult | str] = ["env_timeout"] * len(active)

    def work(i: int) -> None:
        answer = _answer(active[i], rollouts[i], parser, tokenizer)
        results[i] = "env_error" if answer is None else answer

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(active))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


def _advance(ep: Episode, r: Rollout, result: StepResult | str, tk: Any, lim: EpisodeLimits):
    """Record the environment's answer; append the observation ids or end the episode."""
    if isinstance(result, str):  # the environment raised or hung: the episode is masked
        ep.end = result
        return
    ep.turn_rewards.append(result.reward)
    ep.turn_progress.append(result.progress)
    ep.tool_outcomes += result.tool_outcomes
    ep.tool_seconds += result.tool_seconds
    history = list(ep.messages)
    ep.texts.append(r.text)
    content = _content(tk, r.completion_ids)
    ep.messages.append({"role": "assistant", "content": content})
    if result.done:
        ep.end = "done"
    elif r.finish_reason == "length":
        ep.end = "turn_length"  # no end-of-turn token: nothing can follow it
    elif len(ep.turn_lengths) >= lim.max_turns:
        ep.end = "max_turns"
    else:
        turn = len(ep.turn_lengths) - 1
        if lim.observation_render == "fixed_base":
            obs = fixed_base_observation_ids(
                tk, r.completion_ids, content, result.messages, ep.env.tools, turn
            )
        else:
            obs = observation_ids(
                tk, history, r.completion_ids, content, result.messages, ep.env.tools, turn
            )
        ep.messages += result.messages
        ep.ids += obs
        ep.mask += [0] * len(obs)
        ep.logprobs += [0.0] * len(obs)
        if len(ep.ids) >= lim.max_episode_tokens:
            ep.end = "max_episode_tokens"


def run_episodes(
    rows: list[dict[str, Any]],
    env_factory: Callable[[], Environment],
    engine: Any,
    tokenizer: Any,
    sampling: SamplingConfig,
    limits: EpisodeLimits,
    parser: str = "hermes",
    clock: dict[str, float] | None = None,
) -> list[Episode]:
    """Play one episode per row, all turn by turn together.

    Args:
        rows: one dataset row per episode (repeat a row G times for a group of G episodes).
        env_factory: makes a fresh environment for each episode.
        engine: a RolloutEngine; each turn is one `generate` call with `n=1` over the running
            episodes (episode i of the call gets seed `sampling.seed + turn * 7919 + i`).
        tokenizer: the policy's tokenizer (chat template, decode).
        sampling: temperature, top_p and the base seed (its `n` and `max_new_tokens` are replaced).
        limits: turns, episode tokens, tokens per turn.
        parser: the tool-call format (`posttrain.rollout.tool_calls`).
        clock: if given, `clock["env_s"]` is increased by the wall time the environments took
            (resets, then each turn's concurrent answers; `Episode.seconds` sums per episode).

    Returns:
        The episodes, in row order, each ended (`Episode.end` is one of END_REASONS).
    """
    t0 = time.perf_counter()
    episodes = [_start(env_factory, row, tokenizer) for row in rows]
    env_s = time.perf_counter() - t0
    for turn in range(limits.max_turns):
        active = [ep for ep in episodes if not ep.end]
        if not active:
            break
        seed = None if sampling.seed is None else sampling.seed + turn * 7919
        call = replace(sampling, n=1, max_new_tokens=limits.max_new_tokens, seed=seed)
        rollouts = engine.generate([ep.prompt_ids + ep.ids for ep in active], call)
        for ep, r in zip(active, rollouts, strict=True):
            _append_turn(ep, r)
        t0 = time.perf_counter()
        answers = _answer_all(active, rollouts, parser, tokenizer, limits.step_timeout_s)
        env_s += time.perf_counter() - t0
        for ep, r, result in zip(active, rollouts, answers, strict=True):
            _advance(ep, r, result, tokenizer, limits)
    for ep in episodes:
        ep.end = ep.end or "max_turns"
    if clock is not None:
        clock["env_s"] = clock.get("env_s", 0.0) + env_s
    return episodes


def _token_turns(mask: list[int], turn_lengths: list[int]) -> list[int]:
    """Each token's turn: sampled tokens are consumed turn by turn (`turn_lengths`, so a turn
    with no sampled token or an empty observation cannot shift the count); an observation token
    gets the turn it answers."""
    out, turn, left = [], -1, 0
    for m in mask:
        while m and left == 0 and turn + 1 < len(turn_lengths):
            turn += 1
            left = turn_lengths[turn]
        left -= m
        out.append(max(turn, 0))
    return out


def episode_rollout(ep: Episode, index: int) -> Rollout:
    """The episode as one Rollout: prompt ids, then all later ids with their loss mask, each
    token's turn and each turn's reward and progress (per-turn credit assignment)."""
    return Rollout(
        prompt_index=index,
        prompt_ids=ep.prompt_ids,
        completion_ids=ep.ids,
        logprobs=ep.logprobs,
        text=ep.final_text,
        finish_reason="length" if ep.end == "turn_length" else "stop",
        weight_version=min(ep.turn_versions, default=0),
        completion_mask=ep.mask,
        turn_versions=tuple(ep.turn_versions),
        turn_index=_token_turns(ep.mask, ep.turn_lengths),
        turn_rewards=tuple(ep.turn_rewards),
        turn_progress=tuple(ep.turn_progress),
    )


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Turns, tool calls by outcome, end reasons, masked-token share, environment seconds."""
    n = max(len(episodes), 1)
    turns = [len(ep.turn_lengths) for ep in episodes]
    out = {
        "agent/turns_mean": sum(turns) / n,
        "agent/turns_max": float(max(turns, default=0)),
        "agent/env_seconds": sum(ep.seconds for ep in episodes),
        "agent/tool_seconds": sum(ep.tool_seconds for ep in episodes),
    }
    tokens = sum(len(ep.mask) for ep in episodes)
    out["agent/observation_token_frac"] = (
        sum(len(ep.mask) - sum(ep.mask) for ep in episodes) / tokens if tokens else 0.0
    )
    lengths = [t for ep in episodes for t in ep.turn_lengths]
    out["agent/turn_length_mean"] = sum(lengths) / len(lengths) if lengths else 0.0
    for reason, count in Counter(ep.end for ep in episodes).items():
        out[f"agent/end/{reason}"] = float(count)
    calls = Counter(o for ep in episodes for o in ep.tool_outcomes)
    for outcome, count in calls.items():
        out[f"agent/tool_calls/{outcome}"] = float(count)
    total_calls = sum(calls.values())
    if total_calls:  # no calls (an environment without tools): no share to report
        out["agent/tool_calls/valid_frac"] = calls["ok"] / total_calls
    return out
