"""Length-ordered micro-batching: less padding, same samples."""

from __future__ import annotations

from posttrain.algorithms.online import by_length
from posttrain.data.tensors import chunk_indices
from posttrain.rollout.engine import Rollout
from posttrain.rollout.source import Sample


def _sample(prompt: int, completion: int) -> Sample:
    rollout = Rollout(
        prompt_index=0,
        prompt_ids=[1] * prompt,
        completion_ids=[2] * completion,
        logprobs=[0.0] * completion,
        text="x" * completion,
        finish_reason="stop",
        weight_version=0,
    )
    return Sample(rollout=rollout, reward=1.0, valid=True)


def test_by_length_orders_longest_first_and_keeps_every_index():
    samples = [_sample(3, n) for n in (5, 1, 9, 1, 7, 2)]  # lengths 8, 4, 12, 4, 10, 5
    order = by_length(samples, [0, 1, 2, 3, 4, 5])
    assert order == [2, 4, 0, 5, 1, 3]  # ties (1, 3) keep their order
    assert by_length(samples, [1, 3, 5]) == [5, 1, 3]  # only the given indices


def test_by_length_cuts_padding_of_micro_batches():
    samples = [_sample(3, n) for n in (1, 9, 1, 9, 1, 9, 1, 9)]

    def padded(order: list[int]) -> int:
        lengths = [3 + len(samples[i].rollout.completion_ids) for i in order]
        return sum(max(lengths[j] for j in mb) * len(mb) for mb in chunk_indices(len(order), 4))

    assert padded(list(range(8))) == 8 * 12  # every micro-batch pads to the longest (12)
    assert padded(by_length(samples, list(range(8)))) == 4 * 12 + 4 * 4
