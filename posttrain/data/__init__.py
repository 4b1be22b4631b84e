"""Datasets: the built-in arithmetic task, row loading (local files or `datasets`), chat templating.

`datasets` is imported only when a file or named dataset is loaded.
"""

from posttrain.data.arithmetic import make_split, sft_completion, wrong_answer
from posttrain.data.chat import encode_prompts, encode_sft
from posttrain.data.loading import load_rows

__all__ = [
    "encode_prompts",
    "encode_sft",
    "load_rows",
    "make_split",
    "sft_completion",
    "wrong_answer",
]
