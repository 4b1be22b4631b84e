"""Preference data and DPO plumbing: rows, bad rows, padding invariance, reference cache."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch

from posttrain import losses
from posttrain.algorithms.dpo import (
    DPO,
    ReferenceLogps,
    cache_components,
    cache_key,
    pair_logps,
    read_cache,
    sequence_logps,
    write_cache,
)
from posttrain.config import load_config
from posttrain.data.arithmetic import make_split
from posttrain.data.preference import (
    arithmetic_pairs,
    build_pairs,
    encode_pairs,
    normalize_pairs,
    pair_batch,
)
from posttrain.errors import ConfigError

COLS = ("prompt", "chosen", "rejected", None)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from posttrain.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def ref_model(tiny_model_dir):
    from posttrain.models import load_reference

    return load_reference(tiny_model_dir)


def _pairs(tok, n=6, max_length=64):
    rows = arithmetic_pairs(make_split("train", n, seed=2), seed=0)
    enc, dropped = build_pairs(
        rows, tok, columns=COLS, max_length=max_length, bad_rows="drop", section="dpo", split="t"
    )
    assert dropped == 0
    return enc


# ----------------------------------------------------------------------------- rows


def _evaluate(expression: str) -> int:
    """The value of an arithmetic prompt, computed by Python itself (not `arithmetic.solve`)."""
    assert re.fullmatch(r"[0-9]+[+-][0-9]+", expression), expression
    return int(eval(expression, {"__builtins__": {}}))


def _plausible_wrong(expression: str) -> set[int]:
    """The hard negatives `arithmetic_pairs` documents: off by 1/2/10, sign or operator mistakes."""
    a, _, b = re.fullmatch(r"([0-9]+)([+-])([0-9]+)", expression).groups()
    a, b, c = int(a), int(b), _evaluate(expression)
    return {c + d for d in (-10, -2, -1, 1, 2, 10)} | {-c, a - b, a + b, b - a}


def test_arithmetic_pairs_prefer_the_correct_answer():
    rows = make_split("train", 50, seed=1)
    pairs = arithmetic_pairs(rows, seed=7)
    assert len(pairs) == len(rows)
    for row, p in zip(rows, pairs, strict=True):
        value = _evaluate(row["prompt"])
        assert p["prompt"] == row["prompt"] and p["answer"] == row["answer"] == str(value)
        assert p["chosen"] == str(value), row
        wrong = int(p["rejected"])  # an integer string ...
        assert p["rejected"] == str(wrong) and wrong != value  # ... that is not the answer
        assert wrong in _plausible_wrong(row["prompt"]), (row, p["rejected"])
    assert len({p["rejected"] for p in pairs}) > 10  # not one constant wrong answer
    # deterministic, and a row's wrong answer does not depend on its position
    assert arithmetic_pairs(rows, seed=7) == pairs
    assert arithmetic_pairs(rows[::-1], seed=7) == pairs[::-1]
    # several distinct negatives per prompt, the first one as with negatives=1
    many = arithmetic_pairs(rows, seed=7, negatives=6)
    assert len(many) == 6 * len(rows)
    for i, (row, p) in enumerate(zip(rows, pairs, strict=True)):
        group = many[6 * i : 6 * i + 6]
        assert group[0] == p and len({g["rejected"] for g in group}) == 6
        value = _evaluate(row["prompt"])
        assert all(g["chosen"] == str(value) != g["rejected"] for g in group)
        assert {int(g["rejected"]) for g in group} <= _plausible_wrong(row["prompt"]) - {value}


def test_uniform_wrong_answers_cover_the_answer_range():
    rows = make_split("train", 300, seed=1, max_operand=30, ops=["+"])
    answers = [int(r["answer"]) for r in rows]
    lo, hi = min(answers), max(answers)
    pairs = arithmetic_pairs(rows, seed=7, negatives=6, kind="uniform")
    assert len(pairs) == 6 * len(rows)
    wrong = [int(p["rejected"]) for p in pairs]
    assert all(lo <= w <= hi for w in wrong)
    assert all(p["rejected"] != p["chosen"] == p["answer"] for p in pairs)
    for i in range(len(rows)):
        assert len({p["rejected"] for p in pairs[6 * i : 6 * i + 6]}) == 6
    assert set(wrong) == set(range(lo, hi + 1))  # 1800 draws over ~60 values reach every one
    # uniform negatives are far on average (E|w - c| ~ 20 here); plausible ones are close
    dist = sum(abs(int(p["rejected"]) - int(p["chosen"])) for p in pairs) / len(pairs)
    near = arithmetic_pairs(rows, seed=7, negatives=6)
    close = sum(abs(int(p["rejected"]) - int(p["answer"])) <= 10 for p in near) / len(near)
    assert dist > 12 and close > 0.6
    assert arithmetic_pairs(rows[::-1], seed=7, negatives=6, kind="uniform")[:6] == pairs[-6:]
    # mixed: negatives alternate plausible / uniform; the first is plausible's first
    mixed = arithmetic_pairs(rows, seed=7, negatives=6, kind="mixed")
    assert [m["rejected"] for m in mixed[::6]] == [p["rejected"] for p in near[::6]]
    assert all(lo <= int(m["rejected"]) <= hi for m in mixed[1::6])
    with pytest.raises(ValueError, match="'plausible', 'uniform' or 'mixed'"):
        arithmetic_pairs(rows, seed=7, kind="random")


def test_normalize_strings_messages_and_implicit_prompt():
    user = {"role": "user", "content": "hi"}
    rows = [
        {"prompt": "2+2", "chosen": "4", "rejected": "5"},
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        },
        {  # implicit prompt: the shared first message
            "chosen": [user, {"role": "assistant", "content": "hello"}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        },
        {  # full conversations with an explicit string prompt
            "prompt": "hi",
            "chosen": [user, {"role": "assistant", "content": "a"}],
            "rejected": [user, {"role": "assistant", "content": "b"}],
        },
    ]
    good, bad = normalize_pairs(rows)
    assert bad == []
    implicit, _ = normalize_pairs(rows[2:3], prompt_column="chosen")
    assert implicit[0].prompt == (user,) and implicit[0].chosen == "hello"
    assert [(p.chosen, p.rejected) for p in good] == [
        ("4", "5"),
        ("hello", "go away"),
        ("hello", "no"),
        ("a", "b"),
    ]
    assert good[2].prompt == (user,)


def test_bad_rows_are_reported_with_their_index():
    rows = [
        {"prompt": "1+1", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2", "chosen": "3"},  # missing rejected
        {"prompt": "1+3", "chosen": "4", "rejected": "4"},  # chosen == rejected
        {"prompt": "1+4", "chosen": " ", "rejected": "6"},  # empty completion
        {"prompt": "1+5", "chosen": [{"role": "user", "content": "x"}], "rejected": "7"},
        {"prompt": "", "chosen": "a", "rejected": "b"},  # empty prompt
    ]
    good, bad = normalize_pairs(rows)
    assert [p.index for p in good] == [0]
    reasons = dict(bad)
    assert "missing 'rejected'" in reasons[1]
    assert "'chosen' == 'rejected'" in reasons[2]
    assert "empty 'chosen'" in reasons[3]
    assert "assistant message" in reasons[4]
    assert "prompt" in reasons[5]


def test_bad_row_policy_drop_counts_and_error_raises(tok, caplog):
    rows = [
        {"prompt": "1+1", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2", "chosen": "3"},
        {"prompt": "1+3", "chosen": "4" * 80, "rejected": "5"},  # too long for max_length
    ]
    kw = {"columns": COLS, "max_length": 48, "section": "dpo", "split": "train"}
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        enc, dropped = build_pairs(rows, tok, bad_rows="drop", **kw)
    assert dropped == 2 and [p.index for p in enc] == [0]
    assert "row 1: missing 'rejected'" in caplog.text
    assert "row 2: too long" in caplog.text
    with pytest.raises(ConfigError, match=r"dpo: 2 bad preference row\(s\).*row 1: missing"):
        build_pairs(rows, tok, bad_rows="error", **kw)
    with pytest.raises(ConfigError, match="none of the 1 train rows"):
        build_pairs(rows[1:2], tok, bad_rows="drop", **kw)


def test_margin_column(tok):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "m": 1.5},
        {"prompt": "p", "chosen": "a"},
    ]
    good, bad = normalize_pairs(rows, margin_column="m")
    assert good[0].margin == 1.5 and len(bad) == 1
    good, bad = normalize_pairs(
        [{"prompt": "p", "chosen": "a", "rejected": "b"}], margin_column="m"
    )
    assert not good and "'m' must be a number" in bad[0][1]


def test_pair_batch_layout(tok):
    enc = _pairs(tok, 3)
    t = pair_batch(enc, tok.pad_token_id)
    assert t["input_ids"].shape[0] == 6
    for i, p in enumerate(enc):
        for row, ids, mask in (
            (i, p.chosen_ids, p.chosen_mask),
            (i + 3, p.rejected_ids, p.rejected_mask),
        ):
            n = len(ids)
            assert t["input_ids"][row, :n].tolist() == list(ids)
            assert t["attention_mask"][row].sum() == n
            assert t["mask"][row, : n - 1].tolist() == list(mask[1:])
            assert t["mask"][row, n - 1 :].sum() == 0
    # the response of a chosen row decodes to the answer + EOS
    row0 = t["input_ids"][0, 1:][t["mask"][0].bool()]
    assert tok.decode(row0).endswith("<|im_end|>")


# ----------------------------------------------------------------------------- padding


def test_extra_padding_does_not_change_sequence_logps_or_loss(tok, ref_model):
    enc = _pairs(tok, 4)
    t = pair_batch(enc, tok.pad_token_id)
    extra = 9
    padded = {
        "input_ids": torch.nn.functional.pad(t["input_ids"], (0, extra), value=tok.pad_token_id),
        "attention_mask": torch.nn.functional.pad(t["attention_mask"], (0, extra)),
        "mask": torch.nn.functional.pad(t["mask"], (0, extra)),
    }
    with torch.no_grad():
        out = []
        for b in (t, padded):
            logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            out.append(sequence_logps(logits, b["input_ids"], b["mask"])[1])
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)
    # one pair alone, unpadded: the same numbers again
    alone = pair_logps(ref_model, enc[:1], tok.pad_token_id, 1)
    torch.testing.assert_close(alone[0], torch.stack([out[0][0], out[0][4]]), atol=1e-5, rtol=0)
    ref = torch.randn(8)
    la, _ = losses.preference_loss(out[0][:4], out[0][4:], ref[:4], ref[4:])
    lb, _ = losses.preference_loss(out[1][:4], out[1][4:], ref[:4], ref[4:])
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)


def _hand_logp(model, ids, mask) -> float:
    """Sum of log p(token | prefix) over a sequence's response tokens, one unpadded forward."""
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    total = 0.0
    for t in range(1, len(ids)):  # token t is predicted by the logits at t - 1
        if mask[t]:
            total += float(logp[t - 1, ids[t]])
    return total


def test_dpo_loss_shares_sum_to_the_mean_over_pairs(tok, ref_model):
    """Micro-batching: shares over micro-batches of 3 + 3 + 2 pairs == the 8-pair mean, and that
    mean is the per-pair loss of hand-computed log-probs, with a policy that is not the
    reference (so pair losses differ and a wrong weighting would show)."""
    enc = _pairs(tok, 8)
    policy = copy.deepcopy(ref_model)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    overrides = ["train.algorithm=dpo", "dpo.pairs_per_step=8", "dpo.beta=0.5"]
    cfg = load_config(None, overrides)
    ref = ReferenceLogps(tok.pad_token_id, model=ref_model)
    algo = DPO(cfg, tok, enc, [], engine=None, ref=ref)
    full = algo.make_batch(0, policy)
    cfg3 = load_config(None, [*overrides, "train.micro_batch_size_per_device=3"])
    algo3 = DPO(cfg3, tok, enc, [], engine=None, ref=ref)
    split = algo3.make_batch(0, policy)
    assert [mb["input_ids"].shape[0] for mb in split.micro_batches] == [6, 6, 4]

    def total(algo, batch):
        loss, shares = 0.0, {}
        for mb in batch.micro_batches:
            with torch.no_grad():
                out = policy(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
            lo, sh = algo.loss(out, mb, batch)
            loss += float(lo)
            for k, v in sh.items():
                shares[k] = shares.get(k, 0.0) + v
        return loss, shares

    (la, sa), (lb, sb) = total(algo, full), total(algo3, split)

    # the expectation, pair by pair: unpadded forwards, log-softmax summed by hand
    logps = {
        name: torch.tensor(
            [
                [_hand_logp(model, p.chosen_ids, p.chosen_mask) for p in enc],
                [_hand_logp(model, p.rejected_ids, p.rejected_mask) for p in enc],
            ]
        )
        for name, model in (("policy", policy), ("ref", ref_model))
    }
    pw, pl = logps["policy"]
    rw, rl = logps["ref"]
    pair_loss, _ = losses.preference_loss(pw, pl, rw, rl, kind="sigmoid", beta=0.5)
    h = 0.5 * ((pw - rw) - (pl - rl))  # and the sigmoid loss itself, from its formula
    torch.testing.assert_close(pair_loss, -torch.nn.functional.logsigmoid(h).float())
    want = {
        "loss": float(pair_loss.mean()),
        "margin": float(h.mean()),
        "rewards/chosen": float((0.5 * (pw - rw)).mean()),
        "rewards/rejected": float((0.5 * (pl - rl)).mean()),
        "accuracy": float((h > 0).double().mean()),
        "logps/chosen": float(pw.mean()),
        "logps/rejected": float(pl.mean()),
    }
    # the test can tell: the policy moved away from the reference and the pairs disagree
    assert abs(want["loss"] - 0.693147) > 0.01 and float(pair_loss.std()) > 0.05
    assert 0 < want["accuracy"] < 1
    for got_loss, got in ((la, sa), (lb, sb)):
        assert got_loss == pytest.approx(want["loss"], abs=1e-5)
        assert set(got) == set(want) - {"loss"}
        for k in got:
            assert got[k] == pytest.approx(want[k], abs=1e-4, rel=1e-5), k


# ----------------------------------------------------------------------------- reference cache


def _cfg(tmp_path, *extra):
    return load_config(
        None,
        [
            f"train.output_dir={tmp_path}",
            "train.algorithm=dpo",
            "train.micro_batch_size_per_device=4",
            *extra,
        ],
    )


def test_cached_and_on_the_fly_reference_logps_are_identical(tmp_path, tok, tiny_model_dir):
    train, held = _pairs(tok, 10), _pairs(tok, 3)
    fly = ReferenceLogps.create(_cfg(tmp_path), str(tiny_model_dir), train, held, tok)
    cached = ReferenceLogps.create(
        _cfg(tmp_path, "dpo.ref_cache=auto"), str(tiny_model_dir), train, held, tok
    )
    assert (tmp_path / "ref_logps.pt").is_file() and cached.model is None
    torch.testing.assert_close(fly.held_logps(), cached.held_logps(), atol=1e-5, rtol=0)
    positions = [7, 2, 5]  # a step's micro-batch, in stream order
    mb = pair_batch([train[p] for p in positions], tok.pad_token_id)
    torch.testing.assert_close(
        fly.train_logps(positions, mb), cached.train_logps(positions, mb), atol=1e-5, rtol=0
    )


def test_stale_cache_is_detected_and_recomputed(tmp_path, tok, tiny_model_dir, caplog):
    train, held = _pairs(tok, 4), _pairs(tok, 2)
    cfg = _cfg(tmp_path, "dpo.ref_cache=auto")
    comps = cache_components(cfg, str(tiny_model_dir), tok, train, held)
    path = tmp_path / "ref_logps.pt"
    write_cache(path, comps, torch.full((4, 2), -1.0), torch.full((2, 2), -1.0))
    assert read_cache(path, comps)["key"] == cache_key(comps)
    # every input of the key invalidates it
    other_rows = cache_components(cfg, str(tiny_model_dir), tok, _pairs(tok, 5), held)
    longer = cache_components(
        _cfg(tmp_path, "dpo.max_length=300"), str(tiny_model_dir), tok, train, held
    )
    assert cache_key(other_rows) != cache_key(comps) != cache_key(longer)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert read_cache(path, other_rows) is None
    assert "stale" in caplog.text and "train_pairs" in caplog.text
    # a different reference model (weights file changed) -> recomputed, never the stale -1s
    from posttrain.models import make_tiny

    other_model = make_tiny(tmp_path / "other", seed=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        ref = ReferenceLogps.create(cfg, str(other_model), train, held, tok)
    assert "stale" in caplog.text and "reference_model" in caplog.text
    assert (ref.held_logps() < -1.0).all()
    # now the file holds the new key: reused as is
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        again = ReferenceLogps.create(cfg, str(other_model), train, held, tok)
    assert "reusing" in caplog.text
    torch.testing.assert_close(again.held_logps(), ref.held_logps())


def test_tokenized_data_too_long_is_dropped_not_truncated(tok):
    rows = arithmetic_pairs(make_split("train", 3, seed=0), seed=0)
    pairs, _ = normalize_pairs(rows)
    enc, bad = encode_pairs(tok, pairs, max_length=5)
    assert enc == [] and all("too long" in why for _, why in bad)
