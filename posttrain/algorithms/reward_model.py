"""Bradley-Terry reward model (`train.algorithm: reward_model`).

The trained model is `AutoModelForSequenceClassification` with `num_labels=1`, loaded from the
same model directory as a policy (the score head is new). Its scalar is read at the last non-pad
token of each row (transformers does this from `config.pad_token_id`, which must be set; our
rows end with the EOS token, and pad != EOS).

make_batch: `reward_model.pairs_per_step` pairs per step; each micro-batch is one forward over
2m rows (chosen rows, then rejected rows). loss = -log sigmoid(r_w - r_l - margin), summed over
the micro-batch's pairs and divided by the step's total pair count (all ranks).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain import losses
from posttrain.algorithms.base import StepBatch
from posttrain.algorithms.dpo import check_pairs_per_step, load_preference_data
from posttrain.config import Config
from posttrain.data.preference import EncodedPair, pair_batch
from posttrain.data.stream import RowStream
from posttrain.data.tensors import chunk_indices, shard_for_rank
from posttrain.errors import ConfigError
from posttrain.models.reward_model import rewards_of
from posttrain.runtime import distributed as dist
from posttrain.runtime.data_log import Drawn


class RewardModel:
    """Bradley-Terry training of a scalar reward head.

    Args:
        cfg: run config (`reward_model` section).
        tokenizer: chat-template tokenizer (its pad id must equal the model config's).
        train, held: encoded preference pairs.
        engine: the trained model (DeepSpeed engine), used by `evaluate`.
        dropped: bad train rows dropped while loading.
        other_held: further held-out sets scored by `evaluate` ({name: pairs}, e.g. the other
            kind of arithmetic wrong answer), logged as `eval/<name>/pair_accuracy`.
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
        dropped: int = 0,
        other_held: dict[str, list[EncodedPair]] | None = None,
    ) -> None:
        check_pairs_per_step("reward_model", cfg.reward_model.pairs_per_step)
        self.cfg = cfg
        self.pad_id = int(tokenizer.pad_token_id)
        module = getattr(engine, "module", engine)
        if not type(module).__name__.endswith("ForSequenceClassification"):
            raise ConfigError(
                f"train.algorithm=reward_model needs a sequence-classification model, but the "
                f"trainer built {type(module).__name__}; the trainer must load its model with "
                "ALGORITHMS['reward_model'].load_model (posttrain/algorithms/__init__.py)"
            )
        model_pad = getattr(getattr(module, "config", None), "pad_token_id", self.pad_id)
        if model_pad != self.pad_id:
            raise ConfigError(
                f"reward_model: the model config's pad_token_id={model_pad} differs from the "
                f"tokenizer's pad id {self.pad_id}; the score would be read at the wrong token"
            )
        self.train, self.held = train, held
        self.other_held = other_held or {}
        self.engine = engine
        self.dropped = dropped
        self.use_margin = cfg.reward_model.margin_column is not None
        self.stream = RowStream(list(range(len(train))), seed=cfg.data.seed)

    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """This rank's micro-batches of the step's pairs."""
        cfg = self.cfg
        order = self.stream.take(cfg.reward_model.pairs_per_step)
        mine = [order[i] for i in shard_for_rank(len(order), dist.rank(), dist.world_size())]
        micro = [
            pair_batch([self.train[mine[i]] for i in idx], self.pad_id)
            for idx in chunk_indices(len(mine), cfg.train.micro_batch_size_per_device)
        ]
        metrics = {"data/dropped_pairs": float(self.dropped)}
        return StepBatch(micro, metrics, denominator=float(cfg.reward_model.pairs_per_step))

    def pair_losses(
        self, outputs: Any, mb: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [m], accuracy [m], r_chosen [m], r_rejected [m]) of one micro-batch."""
        r = rewards_of(outputs)
        m = r.shape[0] // 2
        margin = mb["margin"] if self.use_margin else None
        loss, acc = losses.bradley_terry_loss(r[:m], r[m:], margin)
        return loss, acc, r[:m].detach(), r[m:].detach()

    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Share of the step's mean Bradley-Terry loss, and metric shares."""
        loss, acc, rw, rl = self.pair_losses(outputs, mb)
        n = batch.denominator
        shares = {
            "accuracy": float(acc.sum()) / n,
            "rewards/chosen": float(rw.sum()) / n,
            "rewards/rejected": float(rl.sum()) / n,
            "margin": float((rw - rl).sum()) / n,
        }
        return loss.sum() / n, shares

    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Nothing to sync."""
        return {}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out pair accuracy (r_w > r_l), mean margin and loss; every rank does all pairs.

        The main held-out set gives `eval/pair_accuracy`, `eval/margin`, `eval/loss`; each
        `other_held` set `eval/<name>/pair_accuracy` and `eval/<name>/margin`.
        """
        if not self.held:
            return {}
        was_training = self.engine.training
        self.engine.eval()
        try:
            acc, margin, loss = self._score(self.held)
            out = {"eval/pair_accuracy": acc, "eval/margin": margin, "eval/loss": loss}
            for name, pairs in self.other_held.items():
                acc, margin, _ = self._score(pairs)
                out[f"eval/{name}/pair_accuracy"] = acc
                out[f"eval/{name}/margin"] = margin
        finally:
            self.engine.train(was_training)
        return out

    def _score(self, pairs: list[EncodedPair]) -> tuple[float, float, float]:
        """(pair accuracy, mean margin, mean loss) of `pairs` under the current model."""
        acc, margin, loss = 0.0, 0.0, 0.0
        for idx in chunk_indices(len(pairs), self.cfg.train.micro_batch_size_per_device):
            mb = pair_batch([pairs[i] for i in idx], self.pad_id)
            out = self.engine(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
            pair_loss, pair_acc, rw, rl = self.pair_losses(out, mb)
            acc += float(pair_acc.sum())
            margin += float((rw - rl).sum())
            loss += float(pair_loss.sum())
        n = max(len(pairs), 1)
        return acc / n, margin / n, loss / n

    def state_dict(self) -> dict[str, Any]:
        """Data position."""
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the data position."""
        self.stream.load_state_dict(state["stream"])

    def drawn_rows(self) -> Drawn:
        """The preference rows (source row indices) the last batch drew (runtime/data_log.py)."""
        return Drawn.of([(e, self.train[p].index) for e, p in self.stream.take_drawn()])


def build_reward_model(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> RewardModel:
    """Load preference data (with the optional margin column) and make the RM object."""
    r = cfg.reward_model
    train, held, dropped, other = load_preference_data(
        cfg, tokenizer, "reward_model", r.max_length, r.bad_rows, r.margin_column, other_kinds=True
    )
    return RewardModel(cfg, tokenizer, train, held, engine, dropped, other)
