"""Chunked log-probs / entropies from the last hidden state (`posttrain.models.lean_logprobs`)
equal the full-logits path: the pure math on a random head (float64 to 1e-10, float32 to 1e-5,
values and gradients), and real tiny-model GRPO, SFT and DPO micro-batch losses and parameter
gradients with `train.logprob_chunk_tokens` 0 (full logits) vs 7."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posttrain import losses
from posttrain.config import load_config
from posttrain.data.preference import EncodedPair, pair_batch
from posttrain.errors import ConfigError
from posttrain.models import lean_logprobs as ll

N, H, V = 23, 6, 11


def _head(dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.normal_(0, 1.5)
    return head


def _full_reference(z: torch.Tensor, y: torch.Tensor, temp: float):
    """The formula in the input's own dtype (losses.token_logprobs rounds to float32)."""
    logp_all = torch.log_softmax(z / temp, dim=-1)
    logp = logp_all.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1)
    logp = torch.where(y >= 0, logp, torch.zeros((), dtype=logp.dtype))
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def _grads(head: nn.Linear, hidden: torch.Tensor, fn):
    """Values and gradients w.r.t. (hidden, head weight) of a random mix of logp and entropy."""
    h = hidden.clone().requires_grad_(True)
    head.zero_grad()
    logp, ent = fn(h)
    g1 = torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype)
    g2 = torch.linspace(0.5, -0.3, logp.numel(), dtype=logp.dtype)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    return logp.detach(), ent.detach(), h.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 5, 23, 64])  # divides N, does not, == N, > N
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
def test_chunked_equals_full_values_and_gradients(chunk, dtype, tol):
    head = _head(dtype)
    torch.manual_seed(1)
    hidden = torch.randn(N, H, dtype=dtype)
    y = torch.randint(0, V, (N,))
    y[3] = -100  # ignore index -> 0
    temp = 0.7

    def chunked(h):
        return ll.chunked_token_stats(h, head, y, temp, chunk, entropy="grad")

    def full(h):
        if dtype == torch.float64:
            return _full_reference(head(h), y, temp)
        z = head(h)[None]
        return losses.token_logprobs(z, y[None], temp)[0], losses.token_entropy(z, temp)[0]

    got, want = _grads(head, hidden, chunked), _grads(head, hidden, full)
    assert got[0][3] == 0.0
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_metric_entropy_has_no_graph_and_logp_gradient_is_unchanged():
    head = _head(torch.float64)
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    lp, ent = ll.chunked_token_stats(hidden, head, y, 1.3, 4, entropy="metric")
    assert lp.requires_grad and not ent.requires_grad
    want_lp, want_ent = _full_reference(head(hidden), y, 1.3)
    torch.testing.assert_close(ent, want_ent.detach(), atol=1e-10, rtol=0)
    (g,) = torch.autograd.grad(lp.sum(), hidden)
    (g_want,) = torch.autograd.grad(want_lp.sum(), hidden)
    torch.testing.assert_close(g, g_want, atol=1e-10, rtol=0)
    lp0, ent0 = ll.chunked_token_stats(hidden, head, y, 1.3, 4, entropy="none")
    assert ent0 is None
    torch.testing.assert_close(lp0, lp, atol=0, rtol=0)


def test_no_grad_path_and_bad_arguments():
    head = _head(torch.float32)
    hidden = torch.randn(N, H)
    y = torch.randint(0, V, (N,))
    with torch.no_grad():
        lp, ent = ll.chunked_token_stats(hidden, head, y, 1.0, 6, entropy="metric")
    z = head(hidden)[None]
    torch.testing.assert_close(lp, losses.token_logprobs(z, y[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, losses.token_entropy(z)[0], atol=1e-5, rtol=0)
    for kw in ({"chunk_tokens": 0}, {"temperature": 0.0}, {"entropy": "yes"}):
        args = {"temperature": 1.0, "chunk_tokens": 4, "entropy": "none", **kw}
        with pytest.raises(ValueError):
            ll.chunked_token_stats(hidden, head, y, **args)


def test_config_rejects_negative_chunk():
    with pytest.raises(ConfigError, match=r"train\.logprob_chunk_tokens=-1"):
        load_config(None, ["train.logprob_chunk_tokens=-1"])


# ------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(full, lean): the same tiny model twice, the second with the lean hooks (chunk 7)."""
    from posttrain.models import load_policy

    full, lean = load_policy(tiny_model_dir), load_policy(tiny_model_dir)
    assert not ll.install_lean_forward(full, 0)
    assert ll.install_lean_forward(lean, 7)
    return full, lean


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn(model)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def _assert_same(model_pair, fn, tol=2e-5):
    (l0, g0), (l1, g1) = (_loss_and_grads(m, fn) for m in model_pair)
    torch.testing.assert_close(l1, l0, atol=tol, rtol=tol)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=tol, rtol=1e-4, msg=k)


def test_lean_forward_keeps_no_full_logits(models):
    full, lean = models
    ids = torch.randint(0, 90, (2, 9))
    out = lean(input_ids=ids)
    assert out.logits.shape[1] == 1 and out.lean.hidden.shape == (2, 9, 128)
    with torch.no_grad():  # no-grad forwards (generation, eval) are untouched ...
        assert lean(input_ids=ids).logits.shape == (2, 9, 100)
        with ll.lean_forward(lean):  # ... unless asked for
            assert lean(input_ids=ids).logits.shape[1] == 1
    assert full(input_ids=ids).logits.shape == (2, 9, 100)


def _grpo_micro_batch(b=3, width=12, seed=0):
    L = width
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (b, L), generator=g)
    att = torch.ones(b, L, dtype=torch.long)
    att[1, 9:] = 0
    mask = torch.zeros(b, L - 1)
    mask[:, 4:] = 1.0
    mask[1, 8:] = 0.0
    rand = torch.randn(4, b, L - 1, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": att,
        "mask": mask,
        "adv": rand[0],
        "logp_roll": -rand[1].abs() - 4.0,
        "logp_old": -rand[2].abs() - 4.0,
        "logp_ref": -rand[3].abs() - 4.0,
    }


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_grpo_micro_batch_loss_and_gradients_match(models, entropy_coef):
    from posttrain.algorithms.grpo import clipped_policy_loss

    cfg = load_config(
        None,
        [
            "rollout.temperature=0.8",
            "kl.coef=0.1",
            f"loss.entropy_coef={entropy_coef}",
            "loss.clip_low=0.2",
            "loss.clip_high=0.28",
        ],
    )
    mb = _grpo_micro_batch()
    kw = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
    shares = {}

    def fn(model):
        loss, sh = clipped_policy_loss(cfg, model(**kw), mb, 20.0, 20.0, 0.1)
        shares[model is models[1]] = sh
        return loss

    _assert_same(models, fn)
    assert shares[True].keys() == shares[False].keys()
    for k in shares[True]:
        assert shares[True][k] == pytest.approx(shares[False][k], abs=1e-5), k


def test_sft_loss_and_gradients_match(models, tiny_model_dir):
    from posttrain.algorithms.sft import SFT
    from posttrain.data.arithmetic import make_split
    from posttrain.models import load_tokenizer

    cfg = load_config(
        None,
        ["train.algorithm=sft", "train.sft_batch_size=6", "train.micro_batch_size_per_device=6"],
    )
    algo = SFT(cfg, load_tokenizer(tiny_model_dir), make_split("train", 6, seed=2))
    batch = algo.make_batch(0, models[0])
    mb = batch.micro_batches[0]
    kw = {k: mb[k] for k in ("input_ids", "attention_mask", "position_ids") if k in mb}
    _assert_same(models, lambda m: algo.loss(m(**kw), mb, batch)[0])


def test_dpo_pair_loss_and_gradients_match(models):
    from posttrain.algorithms.dpo import pair_losses

    cfg = load_config(None, ["dpo.nll_coef=0.5"])
    g = torch.Generator().manual_seed(3)

    def seq(n):
        return tuple(torch.randint(0, 90, (n,), generator=g).tolist())

    pairs = [
        EncodedPair(0, seq(10), (0,) * 4 + (1,) * 6, seq(13), (0,) * 4 + (1,) * 9),
        EncodedPair(1, seq(8), (0,) * 3 + (1,) * 5, seq(7), (0,) * 3 + (1,) * 4),
    ]
    mb = pair_batch(pairs, 0)
    mb["ref_logps"] = torch.tensor([-30.0, -20.0, -35.0, -18.0])
    kw = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
    _assert_same(models, lambda m: pair_losses(m(**kw), mb, cfg.dpo)[0].sum())


def test_no_grad_token_stats_match(models):
    from posttrain.models.forward import policy_token_stats

    mb = _grpo_micro_batch(b=4, width=10, seed=5)
    full, lean = (policy_token_stats(m, mb, 0.6, 3, ref_model=m) for m in models)
    assert full.keys() == lean.keys() == {"logp_old", "entropy_old", "logp_ref"}
    for k in full:
        torch.testing.assert_close(lean[k], full[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("value_head", ["shared", "separate"])
def test_actor_critic_lean_output_matches(tiny_model_dir, value_head):
    from posttrain.algorithms.grpo import clipped_policy_loss
    from posttrain.models.actor_critic import load_actor_critic

    cfg = load_config(
        None,
        [
            "train.algorithm=ppo",
            "advantage.estimator=gae",
            f"ppo.value_head={value_head}",
            "loss.entropy_coef=0.01",
        ],
    )
    pair = [load_actor_critic(str(tiny_model_dir), cfg=cfg) for _ in range(2)]
    assert ll.install_lean_forward(pair[1], 7) and pair[1].logprob_chunk_tokens == 7
    mb = _grpo_micro_batch(seed=7)
    kw = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}

    def fn(model):
        out = model(**kw)
        assert (out.logits is None) == (out.lean is not None) == (model is pair[1])
        return clipped_policy_loss(cfg, out, mb, 20.0, 20.0, 0.0)[0] + out.values.sum() * 0.1

    _assert_same(pair, fn)


def test_lora_policy_matches(tiny_model_dir):
    from posttrain.algorithms.grpo import clipped_policy_loss
    from posttrain.models import load_policy
    from posttrain.runtime.lora import apply_lora

    cfg = load_config(
        None,
        ["model.lora.r=4", "model.lora.dropout=0.0", "model.lora.target_modules=[q_proj,lm_head]"],
    )
    pair = [apply_lora(load_policy(tiny_model_dir), cfg.model.lora) for _ in range(2)]
    for n, p in pair[0].named_parameters():  # B starts at zero: make the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    pair[1].load_state_dict(pair[0].state_dict())  # and the same (random) A in both
    assert ll.install_lean_forward(pair[1], 7)
    mb = _grpo_micro_batch(seed=9)
    kw = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}

    def fn(model):
        out = model(**kw)
        assert hasattr(out, "lean") == (model is pair[1])
        return clipped_policy_loss(cfg, out, mb, 20.0, 20.0, 0.0)[0]

    (l0, g0), (l1, g1) = (_loss_and_grads(m, fn) for m in pair)
    torch.testing.assert_close(l1, l0, atol=2e-5, rtol=2e-5)
    lora_grads = [k for k in g0 if "lora_" in k and "lm_head" in k]
    assert lora_grads
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=2e-5, rtol=1e-4, msg=k)


def test_reference_only_pass_gives_the_same_kl_loss(models):
    """KL with one update per batch: GRPO runs the reference alone (`policy=False`); the loss then
    divides by its detached current log-probs, which equal a separate step-start pass."""
    from posttrain.algorithms.grpo import clipped_policy_loss
    from posttrain.models.forward import policy_token_stats

    full = models[0]
    cfg = load_config(None, ["rollout.temperature=0.8", "kl.coef=0.1", "loss.clip_high=0.28"])
    mb = {k: v for k, v in _grpo_micro_batch(b=4, width=10, seed=2).items() if "old" not in k}
    del mb["logp_ref"]  # both come from the passes below
    both = policy_token_stats(full, mb, 0.8, 3, ref_model=models[1])
    ref_only = policy_token_stats(full, mb, 0.8, 3, ref_model=models[1], policy=False)
    assert ref_only.keys() == {"logp_ref"}
    torch.testing.assert_close(ref_only["logp_ref"], both["logp_ref"], atol=0, rtol=0)
    kw = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
    runs = [
        _loss_and_grads(
            full, lambda m, s=s: clipped_policy_loss(cfg, m(**kw), {**mb, **s}, 20.0, 20.0, 0.1)[0]
        )
        for s in (both, ref_only)
    ]
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-6, rtol=0)
    for k in runs[0][1]:
        torch.testing.assert_close(runs[1][1][k], runs[0][1][k], atol=1e-6, rtol=1e-5, msg=k)
