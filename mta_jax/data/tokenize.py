"""Tokenisation to fixed lengths: any T5 tokenizer through transformers, or byte-level ByT5.

Token ids are kept ragged (rows concatenated plus offsets) and padded only when
a batch is built, so memory grows with the tokens, not with rows x max length.
Layout follows Hugging Face T5: EOS ends every sequence (also a truncated one,
as seqio's append-EOS-after-trim does), the decoder starts from the pad id (in training
`config.data.train_decoder_start` may name another start, as the released code's `<e>`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np

from mta_jax import storage
from mta_jax.errors import DataError
from mta_jax.data.registry import task_type_index
from mta_jax.data.report import DataReport

BYT5 = "byt5"
_CHUNK = 1024  # texts per tokenizer call
_SENTINEL = re.compile(r"<extra_id_(\d+)>")
_WEIGHT_FILES = (".safetensors", ".bin", ".h5", ".msgpack", ".ckpt", ".pt", ".pth", ".onnx")


def get_tokenizer(name_or_path: str) -> Any:
    """ "byt5" -> ByT5Tokenizer() (no files); else AutoTokenizer from a path or HF name."""
    import transformers  # pylint: disable=g-import-not-at-top  (slow import)

    if name_or_path == BYT5:
        return transformers.ByT5Tokenizer()
    if storage.is_remote(name_or_path):
        # transformers reads local folders only: copy the tokenizer files (not the weights).
        if not storage.path(name_or_path).is_dir():
            raise DataError(f"tokenizer directory {name_or_path!r} (config.data.tokenizer or "
                            "config.init_from) does not exist")
        name_or_path = storage.local_copy(name_or_path, skip_suffixes=_WEIGHT_FILES)
    expanded = os.path.expanduser(name_or_path)
    looks_local = name_or_path.startswith((os.sep, ".", "~")) or os.path.exists(expanded)
    if looks_local and not os.path.isdir(expanded):
        raise DataError(
            f"tokenizer directory {name_or_path!r} (config.data.tokenizer) does not "
            f"exist; use {BYT5!r}, a local tokenizer directory or a Hugging Face name"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(expanded)
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot load tokenizer {name_or_path!r} (config.data.tokenizer): {e}"
        ) from e
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no pad or EOS token; T5 needs both")
    return tokenizer


def resolve_start_token_id(tokenizer: Any, start_token_id: int) -> int:
    """The [START] id: `start_token_id`, or for -1 the highest-numbered sentinel.

    `<extra_id_N>` with the largest N is the sentinel span-corruption pretraining
    used least, so repurposing it as [START] disturbs the pretrained model least.
    """
    if start_token_id >= 0:
        if start_token_id >= len(tokenizer):
            raise DataError(
                f"config.data.start_token_id {start_token_id} is outside the "
                f"tokenizer's {len(tokenizer)} ids"
            )
        return start_token_id
    sentinels = {
        int(m.group(1)): i
        for tok, i in tokenizer.get_vocab().items()
        if (m := _SENTINEL.fullmatch(tok))
    }
    if not sentinels:
        raise DataError(
            "config.data.start_token_id is -1 but the tokenizer has no <extra_id_N> "
            "sentinels; set an explicit id"
        )
    return sentinels[max(sentinels)]


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
    """Examples as ragged token ids; `features(i)` pads one row to the fixed lengths."""

    source_ids: np.ndarray  # int32[total source tokens]
    source_offsets: np.ndarray  # int64[num_examples + 1]
    target_ids: np.ndarray  # int32[total target tokens]
    target_offsets: np.ndarray  # int64[num_examples + 1]
    type_ids: np.ndarray  # int32[num_examples], index into the run's task types
    max_source_length: int
    max_target_length: int
    pad_id: int
    decoder_start_id: int | None = None  # the decoder's first input; None: pad_id

    def __len__(self) -> int:
        return len(self.type_ids)

    def features(self, row: int) -> dict[str, np.ndarray]:
        """One padded example: the batch layout without the batch axis."""
        s, t = self.max_source_length, self.max_target_length
        source = self.source_ids[self.source_offsets[row] : self.source_offsets[row + 1]]
        target = self.target_ids[self.target_offsets[row] : self.target_offsets[row + 1]]
        input_ids = np.full(s, self.pad_id, np.int32)  # [S]
        input_ids[: len(source)] = source
        labels = np.full(t, self.pad_id, np.int32)  # [T]
        labels[: len(target)] = target
        # Teacher forcing: the decoder reads the labels shifted right behind the
        # start id, which T5 fixes to the pad id.
        start = self.pad_id if self.decoder_start_id is None else self.decoder_start_id
        decoder_input_ids = np.concatenate([[start], labels[:-1]]).astype(np.int32)
        return {
            "input_ids": input_ids,
            "attention_mask": (np.arange(s) < len(source)).astype(np.int32),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "decoder_attention_mask": (np.arange(t) < len(target)).astype(np.int32),
            "task_ids": np.int32(self.type_ids[row]),
        }


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        chunk = list(texts[start : start + _CHUNK])
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = (
        np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
    )
    return flat, offsets


def tokenize_examples(
    examples: Sequence[dict],
    tokenizer: Any,
    *,
    max_source_length: int,
    max_target_length: int,
    task_types: Sequence[str],
    start_token_id: int | None,
    report: DataReport,
    decoder_start_id: int | None = None,
) -> TokenizedExamples:
    """Encodes every example once; truncations are counted per task in `report`.

    start_token_id: prepended to every input (the start_token selector reads it);
      None for no start token.
    decoder_start_id: the decoder's first input (teacher forcing); None for the pad id.
    """
    reserved = 1 + (start_token_id is not None)  # EOS, and [START] when used
    if max_source_length <= reserved:
        raise DataError(
            f"config.data.max_source_length {max_source_length} leaves no room for "
            f"input tokens (EOS{' and [START]' if reserved == 2 else ''} use {reserved})"
        )
    if max_target_length <= 1:
        raise DataError(
            f"config.data.max_target_length {max_target_length} leaves no room for "
            "target tokens next to EOS"
        )
    eos = tokenizer.eos_token_id
    prefix = [] if start_token_id is None else [start_token_id]
    for task_type in {e["type"] for e in examples}:
        task_type_index(task_type, tuple(task_types), f"type of task {task_type}")
    type_index = {t: i for i, t in enumerate(task_types)}
    sources, targets, type_ids = [], [], []
    for example, source, target in zip(
        examples,
        _encode(tokenizer, [e["input"] for e in examples]),
        _encode(tokenizer, [e["target"] for e in examples]),
    ):
        if len(source) > max_source_length - reserved:
            report.truncated_inputs[example["task"]] += 1
        if len(target) > max_target_length - 1:
            report.truncated_targets[example["task"]] += 1
        sources.append(prefix + source[: max_source_length - reserved] + [eos])
        targets.append(target[: max_target_length - 1] + [eos])
        type_ids.append(type_index[example["type"]])
    source_ids, source_offsets = _ragged(sources)
    target_ids, target_offsets = _ragged(targets)
    return TokenizedExamples(
        source_ids,
        source_offsets,
        target_ids,
        target_offsets,
        np.asarray(type_ids, np.int32),
        max_source_length,
        max_target_length,
        tokenizer.pad_token_id,
        decoder_start_id,
    )


def tokenize_with_config(examples: Sequence[dict], tokenizer: Any, data_cfg: Any,
                         task_types: Sequence[str], report: Any, *,
                         inference: bool = False) -> "TokenizedExamples":
    """`tokenize_examples` with the lengths and [START] token of a `config.data` block.

    inference=True (evaluation, prediction): inputs cut at `eval_max_source_length` when set,
    and the decoder starts from pad as decoding does; else `train_decoder_start` applies.
    """
    start_id = configured_start_token_id(tokenizer, data_cfg)
    source_length = data_cfg.max_source_length
    if inference:
        source_length = data_cfg.get("eval_max_source_length", 0) or source_length
    return tokenize_examples(examples, tokenizer, max_source_length=source_length,
                             max_target_length=data_cfg.max_target_length,
                             task_types=tuple(task_types), start_token_id=start_id, report=report,
                             decoder_start_id=None if inference else train_decoder_start_id(
                                 tokenizer, data_cfg))


def train_decoder_start_id(tokenizer: Any, data_cfg: Any) -> int | None:
    """The decoder's first input in training (`config.data.train_decoder_start`); None: pad.

    A token the tokenizer lacks is added to it as a special token (decoding skips it) and takes
    the next free id, as the released code adds `<e>`: the embedding is not resized, so the id
    must stay below the model's vocabulary size (build.py checks). Adding it again is a no-op.
    """
    spec = data_cfg.get("train_decoder_start", "")
    if not spec:
        return None
    if spec.isdigit():
        return int(spec)
    tokenizer.add_tokens([spec], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(spec)


def configured_start_token_id(tokenizer: Any, data_cfg: Any):
    """The [START] id a `config.data` block asks for, or None without one."""
    if not data_cfg.start_token:
        return None
    return resolve_start_token_id(tokenizer, data_cfg.start_token_id)
