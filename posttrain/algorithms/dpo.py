"""DPO family (`train.algorithm: dpo`): sigmoid, cDPO (label smoothing), robust DPO (unbiased
under label flips), IPO, hinge (SLiC), SimPO, length-normalised DPO, each optionally + RPO's NLL
term (docs/algorithms.md and `losses.preference_loss`).

make_batch: `dpo.pairs_per_step` pairs (this rank's shard), micro-batches of
`micro_batch_size_per_device` pairs; each micro-batch is ONE forward over 2m rows (chosen rows,
then rejected rows). Reference sequence log-probs come from a cache file (`dpo.ref_cache`) or a
frozen reference model run in make_batch.
loss: sequence log-probs = sum of response-token log-probs; the pair losses of the micro-batch
summed and divided by the step's total pair count (all ranks), so shares add up to the mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from posttrain import losses
from posttrain.algorithms.base import StepBatch
from posttrain.config import Config
from posttrain.data.preference import EncodedPair, arithmetic_pairs, build_pairs, pair_batch
from posttrain.data.splits import load_train_eval_rows
from posttrain.data.stream import RowStream
from posttrain.data.tensors import chunk_indices, shard_for_rank
from posttrain.errors import ConfigError
from posttrain.models.lean_logprobs import install_lean_forward, lean_forward, output_token_stats
from posttrain.runtime import distributed as dist
from posttrain.runtime.data_log import Drawn

logger = logging.getLogger("posttrain")

LENGTH_NORMALISED = ("ipo", "simpo", "length_normalized")
CACHE_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def load_preference_data(
    cfg: Config,
    tokenizer: Any,
    section: str,
    max_length: int,
    bad_rows: str,
    margin: str | None,
    other_kinds: bool = False,
) -> tuple[list[EncodedPair], list[EncodedPair], int, dict[str, list[EncodedPair]]]:
    """Train and held-out pairs for DPO / reward-model runs.

    `data.source: arithmetic` gives synthetic pairs (chosen = correct answer, rejected =
    `data.wrong_answers` wrong answers, `data.preference_negatives` per prompt); other sources
    need prompt/chosen/rejected columns.

    Args:
        other_kinds: also pair the arithmetic held-out rows with each kind of wrong answer that
            is not `data.wrong_answers` (a model trained on one kind is scored on the others).

    Returns:
        (train pairs, held-out pairs (from the first `eval.num_problems` held-out rows),
        dropped train rows, {kind: held-out pairs} of the other kinds (empty unless
        `other_kinds` and the held-out data is arithmetic)).
    """
    d = cfg.data
    train_rows, held_source = load_train_eval_rows(cfg)
    held_source = held_source[: cfg.eval.num_problems]
    held_arithmetic = (d.eval_source or d.source) == "arithmetic"

    def encode(rows: list[dict], split: str, **kw: Any) -> tuple[list[EncodedPair], int]:
        if not rows:
            return [], 0
        return build_pairs(
            rows, tokenizer, split=split, system_prompt=d.system_prompt, section=section, **kw
        )

    def pairs_of(rows: list[dict], kind: str) -> list[dict]:
        return arithmetic_pairs(rows, d.seed, d.preference_negatives, kind)

    if d.source == "arithmetic":
        train_rows = pairs_of(train_rows, d.wrong_answers)
    held_rows = pairs_of(held_source, d.wrong_answers) if held_arithmetic else held_source
    cols = (d.prompt_column, d.chosen_column, d.rejected_column, margin)
    kw = {"columns": cols, "max_length": max_length, "bad_rows": bad_rows}
    train, dropped = build_pairs(
        train_rows, tokenizer, split="train", system_prompt=d.system_prompt, section=section, **kw
    )
    held, _ = encode(held_rows, "held-out", **kw)
    other: dict[str, list[EncodedPair]] = {}
    if other_kinds and held_arithmetic:
        for kind in ("plausible", "uniform"):
            if kind != d.wrong_answers:
                other[kind], _ = encode(
                    pairs_of(held_source, kind),
                    f"held-out ({kind} wrong answers)",
                    columns=(*cols[:3], None),
                    max_length=max_length,
                    bad_rows="drop",
                )
    return train, held, dropped, other


def check_pairs_per_step(section: str, pairs_per_step: int) -> None:
    """Pairs are split evenly over ranks."""
    world = dist.world_size()
    if pairs_per_step % world:
        raise ConfigError(
            f"{section}.pairs_per_step={pairs_per_step} must be divisible by the {world} ranks"
        )


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token and per-sequence response log-probs.

    Args:
        logits: [B, W, V] model outputs.
        input_ids: [B, W].
        mask: [B, W - 1] response-target mask.

    Returns:
        (token log-probs [B, W - 1], zero off the mask; sequence sums [B]).
    """
    return output_sequence_logps(SimpleNamespace(logits=logits), input_ids, mask)


def output_sequence_logps(
    outputs: Any, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of a forward output: chunked from `outputs.lean` when the forward was
    lean (`lean_logprobs`), else from `outputs.logits` [B, W, V].

    Returns:
        (token log-probs [B, W - 1], zero off the mask; sequence sums [B]).
    """
    logp, _ = output_token_stats(outputs, input_ids)
    logp = torch.where(mask.to(logp.device).bool(), logp, torch.zeros((), dtype=logp.dtype))
    return logp, logp.sum(-1)


def _no_grad_sequence_logps(model: Any, t: dict[str, torch.Tensor], device: Any) -> torch.Tensor:
    """[B] sequence log-probs of a pair batch `t` under `model` (lean when it has the hooks)."""
    with torch.no_grad(), lean_forward(model):
        out = model(
            input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device)
        )
        return output_sequence_logps(out, t["input_ids"].to(device), t["mask"])[1].float().cpu()


@torch.no_grad()
def pair_logps(
    model: Any, pairs: list[EncodedPair], pad_id: int, pairs_per_forward: int
) -> torch.Tensor:
    """Sequence log-probs of pairs under `model`, without grad.

    Returns:
        [N, 2] float32: column 0 chosen, column 1 rejected (sum over response tokens).
    """
    device = next(model.parameters()).device
    out = []
    for idx in chunk_indices(len(pairs), pairs_per_forward):
        t = pair_batch([pairs[i] for i in idx], pad_id)
        out.append(_no_grad_sequence_logps(model, t, device).view(2, -1).T)
    return torch.cat(out) if out else torch.zeros(0, 2)


# ----------------------------------------------------------------- reference log-probs


def _sha_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _model_hash(path: str) -> str:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise ConfigError(
            f"dpo.ref_cache needs a local reference model directory to hash; {path!r} is not "
            "one (download the model, or set dpo.ref_cache=null to compute it on the fly)"
        )
    weights = sorted(f for f in d.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
    return _sha_files([d / "config.json", *weights])


def _tokenizer_hash(tokenizer: Any) -> str:
    d = Path(str(getattr(tokenizer, "name_or_path", "")))
    files = sorted(d / n for n in _TOKENIZER_FILES if (d / n).is_file()) if d.is_dir() else []
    if files:
        return _sha_files(files)
    text = tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template)
    return hashlib.sha256(text.encode()).hexdigest()


def _pairs_hash(pairs: list[EncodedPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(
            json.dumps(
                [p.index, p.chosen_ids, p.chosen_mask, p.rejected_ids, p.rejected_mask]
            ).encode()
        )
    return h.hexdigest()


def cache_components(
    cfg: Config, ref_path: str, tokenizer: Any, train: list[EncodedPair], held: list[EncodedPair]
) -> dict[str, Any]:
    """What reference log-probs depend on; the cache key is a hash of all of it."""
    return {
        "version": CACHE_VERSION,
        "reference_model": _model_hash(ref_path),
        "tokenizer": _tokenizer_hash(tokenizer),
        "train_pairs": _pairs_hash(train),
        "held_pairs": _pairs_hash(held),
        "max_length": cfg.dpo.max_length,
        "system_prompt": cfg.data.system_prompt,
        "dtype": cfg.model.dtype,
    }


def cache_key(components: dict[str, Any]) -> str:
    """sha256 of the components (sorted JSON)."""
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def cache_path(cfg: Config) -> Path | None:
    """`dpo.ref_cache` as a path (`auto` = `<output_dir>/ref_logps.pt`), or None (off)."""
    value = cfg.dpo.ref_cache
    if value is None:
        return None
    return Path(cfg.train.output_dir) / "ref_logps.pt" if value == "auto" else Path(value)


def read_cache(path: Path, components: dict[str, Any], log: bool = True) -> dict | None:
    """The cached tables when the file exists and its key matches, else None (logged)."""
    if not path.is_file():
        if log:
            logger.warning("dpo.ref_cache: %s does not exist; computing reference log-probs", path)
        return None
    data = torch.load(path, weights_only=True)
    if data.get("key") != cache_key(components):
        if log:
            old = data.get("components", {})
            changed = sorted(k for k in components if old.get(k) != components[k])
            logger.warning(
                "dpo.ref_cache: %s is stale (key mismatch; changed: %s); recomputing reference "
                "log-probs",
                path,
                ", ".join(changed) or "format",
            )
        return None
    if log:
        logger.warning("dpo.ref_cache: reusing reference log-probs from %s", path)
    return data


def write_cache(path: Path, components: dict[str, Any], train: torch.Tensor, held: torch.Tensor):
    """Atomically write the cache file (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {"key": cache_key(components), "components": components, "train": train, "held": held}
    torch.save(data, tmp)
    os.replace(tmp, path)


class ReferenceLogps:
    """Reference sequence log-probs of the train and held-out pairs: [N, 2] (chosen, rejected).

    Either tables read from / written to a cache file, or a frozen model run on each step's
    micro-batches (held-out pairs are computed once).

    Args:
        pad_id: pad token id.
        model: frozen reference model (on-the-fly mode) or None.
        train: [N, 2] cached table (cache mode) or None.
        held: [M, 2] table of the held-out pairs.
    """

    def __init__(
        self,
        pad_id: int,
        model: Any = None,
        train: torch.Tensor | None = None,
        held: torch.Tensor | None = None,
    ) -> None:
        if (model is None) == (train is None):
            raise ValueError("ReferenceLogps needs exactly one of model (on the fly) or train")
        self.pad_id = pad_id
        self.model = model
        self.train = train
        self.held = held if held is not None else torch.zeros(0, 2)

    @classmethod
    def create(
        cls,
        cfg: Config,
        ref_path: str,
        train: list[EncodedPair],
        held: list[EncodedPair],
        tokenizer: Any,
    ) -> ReferenceLogps:
        """On the fly (`dpo.ref_cache: null`) or from the cache, recomputing a stale one."""
        from posttrain.models import load_reference

        pad_id = int(tokenizer.pad_token_id)
        size = cfg.train.micro_batch_size_per_device
        path = cache_path(cfg)

        def model() -> Any:
            ref = load_reference(ref_path, dtype=cfg.model.dtype).to(dist.device())
            install_lean_forward(ref, cfg.train.logprob_chunk_tokens)
            return ref

        if path is None:
            ref = model()
            return cls(pad_id, model=ref, held=pair_logps(ref, held, pad_id, size))
        components = cache_components(cfg, ref_path, tokenizer, train, held)
        data = read_cache(path, components) if dist.is_main() else None
        if data is None and dist.is_main():
            ref = model()
            data = {
                "train": pair_logps(ref, train, pad_id, size),
                "held": pair_logps(ref, held, pad_id, size),
            }
            write_cache(path, components, data["train"], data["held"])
            del ref
        dist.barrier()
        if data is None:
            data = read_cache(path, components, log=False)
            if data is None:
                raise RuntimeError(f"rank {dist.rank()}: reference cache {path} was not written")
        return cls(pad_id, train=data["train"], held=data["held"])

    def train_logps(self, positions: list[int], mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """[m, 2] reference log-probs of the micro-batch `mb` (train pairs at `positions`)."""
        if self.train is not None:
            return self.train[positions]
        device = next(self.model.parameters()).device
        return _no_grad_sequence_logps(self.model, mb, device).view(2, -1).T

    def held_logps(self) -> torch.Tensor:
        """[M, 2] reference log-probs of the held-out pairs."""
        return self.held


def pair_losses(
    outputs: Any, mb: dict[str, torch.Tensor], d: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO-family loss [m] and metric tensors of one concatenated micro-batch.

    Args:
        outputs: the policy's forward output over 2m rows (rows 0..m-1 chosen, m..2m-1
            rejected): `lean` (chunked log-probs) or `logits` [2m, W, V]; a bare logits tensor
            is taken as `logits`.
        mb: `input_ids` [2m, W], `mask` [2m, W-1], `ref_logps` [2m] (absent for simpo).
        d: the `dpo` config section (loss kind, beta, label_smoothing, simpo_gamma, nll_coef).

    Returns:
        (loss [m], metrics: the `losses.preference_loss` ones plus logps_chosen /
        logps_rejected [m] and, with nll_coef, nll [m]).
    """
    if isinstance(outputs, torch.Tensor):
        outputs = SimpleNamespace(logits=outputs)
    lean = getattr(outputs, "lean", None)
    device = (lean.hidden if lean is not None else outputs.logits).device
    mb = {k: v.to(device) for k, v in mb.items() if isinstance(v, torch.Tensor)}
    logp, seq = output_sequence_logps(outputs, mb["input_ids"], mb["mask"])
    m = seq.shape[0] // 2
    n_tok = mb["mask"].sum(-1)
    ref = mb.get("ref_logps")
    loss, met = losses.preference_loss(
        seq[:m],
        seq[m:],
        None if ref is None else ref[:m],
        None if ref is None else ref[m:],
        kind=d.loss,
        beta=d.beta,
        label_smoothing=d.label_smoothing,
        gamma=d.simpo_gamma,
        len_w=n_tok[:m],
        len_l=n_tok[m:],
    )
    met["logps_chosen"] = seq[:m].detach()
    met["logps_rejected"] = seq[m:].detach()
    if d.nll_coef:
        nll = losses.rpo_nll(logp[:m], mb["mask"][:m])
        loss = loss + d.nll_coef * nll
        met["nll"] = nll.detach()
    return loss, met


class DPO:
    """The DPO-family algorithm object the trainer drives.

    Args:
        cfg: run config (`dpo` section).
        tokenizer: chat-template tokenizer.
        train, held: encoded preference pairs.
        engine: the trained policy (DeepSpeed engine), used by `evaluate`.
        ref: reference log-probs (cached or on the fly), None for SimPO.
        dropped: bad train rows dropped while loading (logged every step).
    """

    rolls_out = False
    evaluates = True

    def __init__(
        self,
        cfg: Config,
        tokenizer: Any,
        train: list[EncodedPair],
        held: list[EncodedPair],
        engine: Any,
        ref: ReferenceLogps | None,
        dropped: int = 0,
    ) -> None:
        check_pairs_per_step("dpo", cfg.dpo.pairs_per_step)
        self.cfg = cfg
        self.pad_id = int(tokenizer.pad_token_id)
        self.train, self.held = train, held
        self.engine = engine
        self.ref = ref
        self.dropped = dropped
        self.stream = RowStream(list(range(len(train))), seed=cfg.data.seed)

    # --------------------------------------------------------------- batch
    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """This rank's micro-batches of the step's pairs, with reference log-probs."""
        cfg = self.cfg
        order = self.stream.take(cfg.dpo.pairs_per_step)
        mine = [order[i] for i in shard_for_rank(len(order), dist.rank(), dist.world_size())]
        t0 = time.perf_counter()
        micro = []
        for idx in chunk_indices(len(mine), cfg.train.micro_batch_size_per_device):
            positions = [mine[i] for i in idx]
            mb = pair_batch([self.train[p] for p in positions], self.pad_id)
            if self.ref is not None:
                ref = self.ref.train_logps(positions, mb)  # [m, 2]
                mb["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
            micro.append(mb)
        metrics = {"data/dropped_pairs": float(self.dropped)}
        metrics["time/ref_logprob_s"] = time.perf_counter() - t0
        return StepBatch(micro, metrics, denominator=float(cfg.dpo.pairs_per_step))

    # ---------------------------------------------------------------- loss
    def pair_losses(
        self, outputs: Any, mb: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair loss [m] and per-pair metric tensors of one micro-batch's forward output."""
        return pair_losses(outputs, mb, self.cfg.dpo)

    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Share of the step's mean pair loss, and metric shares."""
        loss, met = self.pair_losses(outputs, mb)
        n = batch.denominator
        shares = {
            "rewards/chosen": float(met["rewards_chosen"].sum()) / n,
            "rewards/rejected": float(met["rewards_rejected"].sum()) / n,
            "margin": float(met["margin"].sum()) / n,
            "accuracy": float(met["accuracy"].sum()) / n,
            "logps/chosen": float(met["logps_chosen"].sum()) / n,
            "logps/rejected": float(met["logps_rejected"].sum()) / n,
        }
        if "nll" in met:
            shares["nll"] = float(met["nll"].sum()) / n
        return loss.sum() / n, shares

    # ---------------------------------------------------------- lifecycle
    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Nothing to sync."""
        return {}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out preference accuracy of the current policy (every rank evaluates all pairs).

        `eval/pref_accuracy`: the policy alone prefers the chosen response (log pi(y_w|x) >
        log pi(y_l|x); per-token means for ipo/simpo/length_normalized), no reference involved.
        `eval/reward_accuracy` / `eval/margin`: the loss's implicit reward margin > 0 / its mean.
        """
        if not self.held:
            return {}
        held_ref = self.ref.held_logps() if self.ref is not None else None
        was_training = self.engine.training
        self.engine.eval()
        pref, acc, margin, loss = 0.0, 0.0, 0.0, 0.0
        try:
            for idx in chunk_indices(len(self.held), self.cfg.train.micro_batch_size_per_device):
                mb = pair_batch([self.held[i] for i in idx], self.pad_id)
                if held_ref is not None:
                    r = held_ref[idx]
                    mb["ref_logps"] = torch.cat([r[:, 0], r[:, 1]])
                with lean_forward(self.engine):
                    out = self.engine(
                        input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]
                    )
                pair_loss, met = self.pair_losses(out, mb)
                score = met["logps_chosen"], met["logps_rejected"]
                if self.cfg.dpo.loss in LENGTH_NORMALISED:
                    n_tok = mb["mask"].sum(-1)
                    m = n_tok.shape[0] // 2
                    score = score[0] / n_tok[:m], score[1] / n_tok[m:]
                pref += float((score[0] > score[1]).float().sum())
                acc += float(met["accuracy"].sum())
                margin += float(met["margin"].sum())
                loss += float(pair_loss.sum())
        finally:
            self.engine.train(was_training)
        n = len(self.held)
        return {
            "eval/pref_accuracy": pref / n,
            "eval/reward_accuracy": acc / n,
            "eval/margin": margin / n,
            "eval/loss": loss / n,
        }

    def state_dict(self) -> dict[str, Any]:
        """Data position."""
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the data position."""
        self.stream.load_state_dict(state["stream"])

    def drawn_rows(self) -> Drawn:
        """The preference rows (source row indices) the last batch drew (runtime/data_log.py)."""
        return Drawn.of([(e, self.train[p].index) for e, p in self.stream.take_drawn()])


def build_dpo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> DPO:
    """Load preference data and reference log-probs, and make the DPO object."""
    d = cfg.dpo
    train, held, dropped, _ = load_preference_data(
        cfg, tokenizer, "dpo", d.max_length, d.bad_rows, None
    )
    ref = None
    if d.loss != "simpo":
        ref = ReferenceLogps.create(cfg, cfg.model.ref_path or model_path, train, held, tokenizer)
    install_lean_forward(engine, cfg.train.logprob_chunk_tokens)
    return DPO(cfg, tokenizer, train, held, engine, ref, dropped)
