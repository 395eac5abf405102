"""An embedded synthetic multi-task mixture: no files, no downloads, deterministic by seed.

Every task reads the same surface form, a short phrase of words from one small
lexicon of antonym pairs, behind a task prefix; the tasks then demand
conflicting word-level mappings from it, the case MTA is for:
  polarity (classify):  "polarity: hot tiny up"        -> "positive"  (majority polarity)
  relation (nli):       "relation: hot tiny ; cold"    -> "contradiction" (two inputs)
  lookup   (mrc):       "lookup: hot tiny up ; t"      -> "tiny"      (a word maps to itself)
  opposite (generate):  "opposite: hot tiny up"        -> "cold big down" (... to its antonym)
A shared FFN must map "hot" to itself, to "cold" and to a polarity at once.
Inputs are at most 26 bytes and targets at most 14, so byte-level sequences stay
small. Measured with a throwaway 2+2-layer, d_model 96 byte-level transformer,
20,000 training examples, batch 64, 800 steps (about 2 minutes on 2 CPU cores):
eval exact match 0.96 polarity, 0.83 lookup, 0.62 relation, 0.65 opposite.
Train and eval inputs are disjoint (a stable hash of the input picks its split),
so eval scores measure the rules learnt, not memorised phrases.
"""

from __future__ import annotations

import zlib

import numpy as np

from mta_jax.errors import DataError

# (positive word, negative word): which side is "positive" is arbitrary but fixed.
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"),
    ("big", "tiny"),
    ("new", "old"),
    ("fast", "slow"),
    ("good", "bad"),
    ("high", "low"),
    ("up", "down"),
    ("wet", "dry"),
    ("rich", "poor"),
    ("hard", "soft"),
)
POLARITY = {w: label for pair in ANTONYMS for w, label in zip(pair, ("positive", "negative"))}
OPPOSITE = {a: b for pair in ANTONYMS for a, b in (pair, pair[::-1])}
NLI_LABELS = ("contradiction", "entailment", "neutral")

# Task name -> (MTA type, share of the examples). Unequal shares give the mixture
# rates something to do.
TASKS: dict[str, tuple[str, float]] = {
    "synthetic/polarity": ("classify", 0.35),
    "synthetic/relation": ("nli", 0.30),
    "synthetic/lookup": ("mrc", 0.15),
    "synthetic/opposite": ("generate", 0.20),
}
SPLIT_SEEDS = {"train": 0, "eval": 1}
_EVAL_BUCKETS = 5  # one input in five belongs to eval


def split_of(source: str) -> str:
    return "eval" if zlib.crc32(source.encode("utf-8")) % _EVAL_BUCKETS == 0 else "train"


def _phrase(rng: np.random.Generator, num_words: int) -> list[str]:
    """Words from distinct antonym pairs, so a phrase never holds a word and its opposite."""
    pairs = rng.choice(len(ANTONYMS), size=num_words, replace=False)
    return [ANTONYMS[p][rng.integers(2)] for p in pairs]


def _polarity(rng: np.random.Generator) -> tuple[str, str, tuple[str, ...]]:
    words = _phrase(rng, 3)  # odd, so the majority is never tied
    positives = sum(POLARITY[w] == "positive" for w in words)
    label = "positive" if positives >= 2 else "negative"
    return f"polarity: {' '.join(words)}", label, ("negative", "positive")


def _relation(rng: np.random.Generator) -> tuple[str, str, tuple[str, ...]]:
    # Two premise words: three made the rule too slow to learn for a tiny model.
    words = _phrase(rng, 2)
    label = NLI_LABELS[rng.integers(3)]
    if label == "entailment":
        hypothesis = words[rng.integers(2)]
    elif label == "contradiction":
        hypothesis = OPPOSITE[words[rng.integers(2)]]
    else:
        unused = [p for p in ANTONYMS if p[0] not in words and p[1] not in words]
        hypothesis = unused[rng.integers(len(unused))][rng.integers(2)]
    return f"relation: {' '.join(words)} ; {hypothesis}", label, NLI_LABELS


def _lookup(rng: np.random.Generator) -> tuple[str, str, tuple[str, ...]]:
    """Extract the word with the asked first letter: a span of the input, as in MRC."""
    words = _phrase(rng, int(rng.integers(2, 4)))
    while len({w[0] for w in words}) < len(words):  # the letter must name one word
        words = _phrase(rng, len(words))
    answer = words[int(rng.integers(len(words)))]
    return f"lookup: {' '.join(words)} ; {answer[0]}", answer, ()


def _opposite(rng: np.random.Generator) -> tuple[str, str, tuple[str, ...]]:
    words = _phrase(rng, int(rng.integers(1, 4)))
    return f"opposite: {' '.join(words)}", " ".join(OPPOSITE[w] for w in words), ()


_MAKERS = {
    "synthetic/polarity": _polarity,
    "synthetic/relation": _relation,
    "synthetic/lookup": _lookup,
    "synthetic/opposite": _opposite,
}


def task_counts(num_examples: int) -> dict[str, int]:
    """Exact per-task counts (largest remainder) so every seed has the same sizes."""
    shares = np.array([share for _, share in TASKS.values()]) * num_examples
    counts = np.floor(shares).astype(int)
    counts[np.argsort(counts - shares, kind="stable")[: num_examples - counts.sum()]] += 1
    return dict(zip(TASKS, counts.tolist()))


def synthetic_examples(split: str, num_examples: int, seed: int) -> list[dict]:
    """`num_examples` example dicts of the embedded mixture; the same (split, seed), the same list."""
    if split not in SPLIT_SEEDS:
        raise DataError(f"synthetic split {split!r} unknown; expected one of {list(SPLIT_SEEDS)}")
    if num_examples < len(TASKS):
        raise DataError(
            f"config.data.synthetic_{split}_size is {num_examples}; it must be at "
            f"least {len(TASKS)} so that every synthetic task has an example"
        )
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    order = [t for t, n in task_counts(num_examples).items() for _ in range(n)]
    order = [order[i] for i in rng.permutation(num_examples)]
    out = []
    for task in order:
        source, target, choices = _MAKERS[task](rng)
        while split_of(source) != split:
            source, target, choices = _MAKERS[task](rng)
        out.append(
            {
                "input": source,
                "target": target,
                "type": TASKS[task][0],
                "task": task,
                "answer_choices": choices,
            }
        )
    return out
