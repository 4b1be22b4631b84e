"""`model.tiny_size: tiny_untied`: the tiny model with its own output head, in vLLM.

The head is a parameter of its own (not the embedding), so a weight sync must carry it: after
changing only the head, vLLM's logprobs of its samples equal the trainer's recomputation.
"""

from __future__ import annotations

import gc

import pytest
import torch

from posttrain.models import load_policy, load_tokenizer, make_tiny
from posttrain.rollout import make_engine
from posttrain.rollout.engine import SamplingConfig
from tests.servers import max_logprob_error


def test_untied_tiny_has_its_own_head(tmp_path):
    tied = load_policy(make_tiny(tmp_path / "tied", size="tiny", seed=0))
    untied = load_policy(make_tiny(tmp_path / "untied", size="tiny_untied", seed=0))
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    head, embed = untied.lm_head.weight, untied.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + head.numel()


@pytest.mark.slow
def test_vllm_sync_carries_the_untied_head(tmp_path):
    pytest.importorskip("vllm")
    path = make_tiny(tmp_path / "untied", size="tiny_untied", seed=0)
    original, policy = load_policy(path), load_policy(path)
    with torch.no_grad():  # change the head only
        policy.lm_head.weight.add_(torch.randn(policy.lm_head.weight.shape) * 0.05)
    tok = load_tokenizer(path)
    prompts = [tok(q)["input_ids"] for q in ("What is 2 + 3?", "Spell cat.", "Count: 1 2 3")]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=24, seed=3)
    engine = make_engine("vllm", str(path), max_model_len=256, seed=0, kv_cache_gib=0.5)
    try:
        before = engine.generate(prompts, sampling)
        assert max_logprob_error(original, before, 1.0) < 1e-4
        assert max_logprob_error(policy, before, 1.0) > 1e-2
        engine.load_weights(policy.state_dict().items(), version=engine.weight_version + 1)
        after = engine.generate(prompts, sampling)
        assert max_logprob_error(policy, after, 1.0) < 1e-4
    finally:
        del engine
        gc.collect()
