"""The MTA task types, in the order that fixes task ids, and the score of each.

The order matters: task id i is `TASK_TYPES[i]`, and the Task Weight Selector's biased
initialisation favours adapters {i, i + 1} for type i (docs/method.md). A run may use its own
list (`config.mta.task_types`); this is the released one.
"""
from typing import Mapping

TASK_TYPES: tuple[str, ...] = ("classify", "nli", "mrc", "generate", "anaphora_resolution")

# The authors' evaluation: exact match for the label tasks, character-level Rouge-L for
# generation, character-level LCS F1 for reading comprehension (scoring.py).
METRIC_BY_TYPE: Mapping[str, str] = {
    "classify": "accuracy",
    "nli": "accuracy",
    "anaphora_resolution": "accuracy",
    "generate": "rouge_l_char",
    "mrc": "f1_char",
}
