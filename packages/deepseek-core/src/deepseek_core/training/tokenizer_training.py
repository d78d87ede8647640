"""Train a byte-level BPE tokenizer on a data file (or texts) with the `tokenizers` library.

Byte-level means every UTF-8 byte is in the base alphabet, so any text (code, Chinese, emoji) encodes
without unknown tokens. The result saves as tokenizer.json + tokenizer_config.json that both
deepseek_core.Tokenizer and transformers' AutoTokenizer read, with BOS added by the post-processor.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ..tokenizer import Tokenizer
from .data import iter_documents

BOS_TOKEN = "<|begin_of_sentence|>"
EOS_TOKEN = "<|end_of_sentence|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: bos=0, eos=1 as the deepseek-tiny preset expects, pad=2.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def _texts(source: str | os.PathLike[str] | Iterable[str], text_field: str) -> Iterator[str]:
    if isinstance(source, (str, os.PathLike)):
        yield from iter_documents(Path(source), text_field)
    else:
        for i, text in enumerate(source):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(text).__name__}")
            yield text


def train_tokenizer(
    source: str | os.PathLike[str] | Iterable[str],
    vocab_size: int = 4096,
    output_dir: str | os.PathLike[str] | None = None,
    min_frequency: int = 2,
    text_field: str = "text",
    model_max_length: int = 4096,
    show_progress: bool = False,
) -> Tokenizer:
    """Train byte-level BPE on a data file (.txt/.jsonl/.parquet) or an iterable of texts.

    `vocab_size` counts the 256 byte symbols and the special tokens (bos, eos, pad); the result can be
    smaller when the text has too few distinct merges. Saved to `output_dir` when given.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size: must be >= {minimum} (256 bytes + special tokens), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency: must be >= 1, got {min_frequency}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in _texts(source, text_field):
            seen += len(text)
            yield text

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise ValueError(f"{source}: no text to train a tokenizer on")
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    config = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        # The post-processor adds BOS; the flags stay False so no layer adds a second one.
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    tokenizer = Tokenizer(backend, config)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer
