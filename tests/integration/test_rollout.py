"""Rollout engines on the tiny model: sampler logprobs vs a recomputed forward, and weight sync.

Expected logprobs come from a naive loop: one HF forward per rollout, log_softmax(logits / T)
gathered at the sampled tokens (with top-p masking done by hand where top_p < 1).
The vLLM tests share ONE module-scoped in-process engine (CPU, float32, 1 GiB KV cache).
"""

from __future__ import annotations

import gc
import string

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.models import load_policy, load_tokenizer
from posttrain.rollout import make_engine
from posttrain.rollout.engine import Rollout, RolloutEngine, SamplingConfig
from posttrain.rollout.hf import HFEngine

QUESTIONS = ["What is 2 + 3?", "Spell cat.", "Say hi\nto me", "Count: 1 2 3"]
# > 128 tokens = one full vLLM CPU KV block: its prefix-cache entry must not survive a weight sync
LONG_QUESTION = "The quick brown fox jumps over the lazy dog. " * 4


def encode(tok, questions: list[str]) -> list[list[int]]:
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
            "input_ids"
        ]
        for q in questions
    ]


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Naive nucleus filter over [V] logits: keep the top tokens until their mass reaches top_p."""
    values = logits.tolist()
    probs = torch.softmax(logits, dim=-1).tolist()
    keep = [float("-inf")] * len(values)
    mass = 0.0
    for v in sorted(range(len(values)), key=lambda v: -values[v]):
        keep[v] = values[v]
        mass += probs[v]
        if mass >= top_p:
            break
    return torch.tensor(keep)


@torch.no_grad()
def recompute(model, rollouts: list[Rollout], temperature: float, top_p: float = 1.0) -> list:
    """Per rollout: log_softmax(logits / T) (top-p filtered) at the sampled tokens, float32."""
    out = []
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / temperature
        if top_p < 1.0:
            logits = torch.stack([top_p_mask(row, top_p) for row in logits])
        logp = torch.log_softmax(logits, dim=-1)
        out.append(logp.gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0])
    return out


def max_abs_diff(rollouts: list[Rollout], expected: list[torch.Tensor]) -> float:
    return max(
        float((torch.tensor(r.logprobs) - e).abs().max())
        for r, e in zip(rollouts, expected, strict=True)
    )


def check_structure(
    rollouts: list[Rollout], n_prompts: int, sampling: SamplingConfig, tok, version: int
):
    assert len(rollouts) == n_prompts * sampling.n
    assert [r.prompt_index for r in rollouts] == [
        i for i in range(n_prompts) for _ in range(sampling.n)
    ]
    for r in rollouts:
        assert len(r.logprobs) == len(r.completion_ids) >= 1
        assert all(lp <= 0.0 for lp in r.logprobs)
        assert r.weight_version == version
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
        if r.finish_reason == "stop":
            assert r.completion_ids[-1] == tok.eos_token_id
            assert tok.eos_token_id not in r.completion_ids[:-1]
        else:
            assert r.finish_reason == "length"
            assert len(r.completion_ids) == sampling.max_new_tokens
            assert tok.eos_token_id not in r.completion_ids


# ---------------------------------------------------------------- HF engine (fast)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_hf_engine_logprobs_match_forward(tiny_model_dir, tok, temperature, top_p):
    model = load_policy(tiny_model_dir)
    engine = HFEngine(model, tok, batch_size=3)  # batches split prompts: padding is exercised
    sampling = SamplingConfig(n=2, temperature=temperature, top_p=top_p, max_new_tokens=16, seed=7)
    rollouts = engine.generate(encode(tok, QUESTIONS), sampling)
    check_structure(rollouts, len(QUESTIONS), sampling, tok, version=0)
    assert model.training  # mode restored
    assert max_abs_diff(rollouts, recompute(model, rollouts, temperature, top_p)) < 1e-4


@pytest.mark.slow
def test_hf_engine_seed_greedy_and_weights(tiny_model_dir, tok):
    model = load_policy(tiny_model_dir)
    engine = make_engine("hf", str(tiny_model_dir), model=model, tokenizer=tok)
    assert isinstance(engine, RolloutEngine)
    prompts = encode(tok, QUESTIONS[:2])
    sampling = SamplingConfig(n=2, max_new_tokens=16, seed=3)
    rng = torch.random.get_rng_state()
    first = engine.generate(prompts, sampling)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded sampling forks the RNG
    assert [r.completion_ids for r in first] == [
        r.completion_ids for r in engine.generate(prompts, sampling)
    ]
    greedy = engine.generate(prompts, SamplingConfig(n=2, temperature=0.0, max_new_tokens=16))
    assert greedy[0].completion_ids == greedy[1].completion_ids
    assert max_abs_diff(greedy, recompute(model, greedy, 1.0)) < 1e-4

    other = load_policy(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    seconds = engine.load_weights(other.state_dict().items(), version=4)
    assert seconds >= 0 and engine.weight_version == 4
    assert torch.equal(model.model.norm.weight, other.model.norm.weight)
    assert all(r.weight_version == 4 for r in engine.generate(prompts, sampling))
    with pytest.raises(ConfigError, match="not_a_param"):
        engine.load_weights([("not_a_param", torch.zeros(1))], version=5)


def test_make_engine_rejects_unknown_kind(tiny_model_dir):
    with pytest.raises(ConfigError, match="vllm"):
        make_engine("sglang", str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"sampling\.n"):
        HFEngine(load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)).generate(
            [[1, 2]], SamplingConfig(n=0)
        )


# ---------------------------------------------------------------- vLLM engine (slow)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    pytest.importorskip("vllm")
    engine = make_engine("vllm", str(tiny_model_dir), max_model_len=256, seed=0, kv_cache_gib=1.0)
    yield engine
    del engine
    gc.collect()


@pytest.mark.slow
def test_vllm_tokenizer_round_trips(vllm_engine, tok):
    vtok = vllm_engine.tokenizer
    for text in [
        "Hello, world!",
        "a  b\n\nc\td",
        "12+34=46 (ok) [x] {y} ~`'\"\\|/?!",
        string.printable[:-3],
    ]:
        ids = tok(text)["input_ids"]
        assert vtok.encode(text, add_special_tokens=False) == ids
        assert vtok.decode(ids) == text


@pytest.mark.slow
def test_vllm_generate_structure_and_seed(vllm_engine, tok):
    prompts = encode(tok, QUESTIONS)
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=48, seed=11)
    rollouts = vllm_engine.generate(prompts, sampling)
    check_structure(rollouts, len(prompts), sampling, tok, version=vllm_engine.weight_version)
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}  # random init: both happen
    again = vllm_engine.generate(prompts, sampling)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rollouts]
    assert [r.logprobs for r in again] == [r.logprobs for r in rollouts]
    other = vllm_engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=48, seed=12))
    assert [r.completion_ids for r in other] != [r.completion_ids for r in rollouts]
    # decoding generated ids with vLLM's tokenizer gives the HF tokenizer's text
    texts = [
        vllm_engine.tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts
    ]
    assert texts == [r.text for r in rollouts]


@pytest.mark.slow
def test_vllm_top_p_logprobs_are_renormalised(vllm_engine, tiny_model_dir, tok):
    model = load_policy(tiny_model_dir)
    sampling = SamplingConfig(n=2, temperature=0.8, top_p=0.9, max_new_tokens=16, seed=5)
    rollouts = vllm_engine.generate(encode(tok, QUESTIONS[:2]), sampling)
    assert max_abs_diff(rollouts, recompute(model, rollouts, 0.8, 0.9)) < 1e-4


@pytest.mark.slow
def test_vllm_weight_sync_matches_trained_policy(vllm_engine, tiny_model_dir, tok):
    original = load_policy(tiny_model_dir)
    policy = load_policy(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    prompts = encode(tok, [*QUESTIONS, LONG_QUESTION])
    assert len(prompts[-1]) > 128
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=32, seed=21)
    version = vllm_engine.weight_version

    before = vllm_engine.generate(prompts, sampling)
    assert max_abs_diff(before, recompute(original, before, 1.0)) < 1e-4  # engine == checkpoint
    assert max_abs_diff(before, recompute(policy, before, 1.0)) > 1e-2  # stale vs new policy

    try:
        seconds = vllm_engine.load_weights(policy.state_dict().items(), version=version + 1)
        assert 0 <= seconds < 30
        assert vllm_engine.weight_version == version + 1
        for temperature in (1.0, 0.7):
            sampling_t = SamplingConfig(n=4, temperature=temperature, max_new_tokens=32, seed=21)
            after = vllm_engine.generate(prompts, sampling_t)
            assert all(r.weight_version == version + 1 for r in after)
            assert max_abs_diff(after, recompute(policy, after, temperature)) < 1e-4
    finally:  # leave the shared engine on the checkpoint's weights
        vllm_engine.load_weights(original.state_dict().items(), version=version + 2)
    restored = vllm_engine.generate(prompts, sampling)
    assert max_abs_diff(restored, recompute(original, restored, 1.0)) < 1e-4


@pytest.mark.slow
def test_vllm_and_hf_engines_agree_on_greedy(vllm_engine, tiny_model_dir, tok):
    prompts = encode(tok, QUESTIONS)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=16)
    hf = HFEngine(load_policy(tiny_model_dir), tok).generate(prompts, greedy)
    vl = vllm_engine.generate(prompts, greedy)
    assert [r.completion_ids for r in vl] == [r.completion_ids for r in hf]
    assert [r.finish_reason for r in vl] == [r.finish_reason for r in hf]
    assert max_abs_diff(vl, [torch.tensor(r.logprobs) for r in hf]) < 1e-4
