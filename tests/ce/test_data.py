"""Single-file datasets: each kind of bad data fails before training with a clear error; good files pack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from deepseek_ce import DataError, Model, Trainer, TrainingConfig
from deepseek_core.training import load_text_dataset, tokenize_file

from .conftest import micro_config

SMALL = TrainingConfig(max_steps=2, batch_size=2, seq_len=32, eval_fraction=0.1, progress_bar=False)


def _trainer(tokenizer, data: Path, tmp_path: Path, config: TrainingConfig = SMALL) -> Trainer:
    model = Model.from_config(micro_config(tokenizer.vocab_size), tokenizer=tokenizer, seed=0)
    return Trainer(model, data, config=config, output_dir=tmp_path / "run", echo=False)


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", r"empty\.txt: file is empty"),
        ("blank.txt", "   \n\n  ", r"blank\.txt: file is empty"),
        (
            "image.txt",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
            r"image\.txt: looks like a binary file",
        ),
        ("latin1.txt", "caf\xe9 ".encode("latin-1") * 100, r"latin1\.txt: .*not UTF-8"),
        (
            "bad.jsonl",
            '{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n',
            r"bad\.jsonl:3: line 3 is not valid JSON",
        ),
        (
            "nofield.jsonl",
            '{"text": "a"}\n\n{"body": "b"}\n',
            r"nofield\.jsonl:3: line 3 has no text field 'text' \(its keys: body\)",
        ),
        ("number.jsonl", '{"text": 5}\n', r"number\.jsonl:1: line 1 field 'text' is int"),
        ("list.jsonl", '["text"]\n', r"list\.jsonl:1: line 1 is a JSON list"),
        (
            "short.txt",
            "def f(): pass\n",
            r"short\.txt: too short: \d+ tokens, fewer than two sequences .* seq_len=32",
        ),
        (
            "data.csv",
            "text\nhello\n",
            r"data\.csv: unsupported extension '\.csv'; use one of \.txt, \.jsonl, \.parquet",
        ),
        ("noext", "hello world\n", r"noext: unsupported extension '\(none\)'"),
    ],
)
def test_bad_data_fails_before_training(tokenizer, tmp_path: Path, name: str, content, message: str) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        _trainer(tokenizer, path, tmp_path)
    assert not (tmp_path / "run").exists()  # nothing was started, nothing written


def test_missing_file_and_directory_without_index(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.txt: data file does not exist"):
        _trainer(tokenizer, tmp_path / "nothere.txt", tmp_path)
    (tmp_path / "notshards").mkdir()
    with pytest.raises(DataError, match=r"notshards.*index\.json"):
        _trainer(tokenizer, tmp_path / "notshards", tmp_path)


def test_parquet_missing_column_and_nulls(tokenizer, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x" * 50] * 3}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols\.parquet: no column 'text' \(columns: body\)"):
        _trainer(tokenizer, tmp_path / "cols.parquet", tmp_path)
    pq.write_table(pa.table({"text": ["some text here", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls\.parquet: row 1 column 'text' is NoneType"):
        _trainer(tokenizer, tmp_path / "nulls.parquet", tmp_path)
    _write(tmp_path / "fake.parquet", "not parquet at all")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable parquet file"):
        _trainer(tokenizer, tmp_path / "fake.parquet", tmp_path)


def test_token_ids_beyond_the_model_vocabulary_are_refused(
    tokenizer, corpus_file: Path, tmp_path: Path
) -> None:
    model = Model.from_config(micro_config(64), seed=0)  # far fewer ids than the tokenizer produces
    with pytest.raises(DataError, match=r"token id \d+ is outside the model's vocabulary \(vocab_size=64\)"):
        Trainer(
            model, corpus_file, tokenizer=tokenizer, config=SMALL, output_dir=tmp_path / "run", echo=False
        )


def test_text_jsonl_parquet_give_the_same_stream_layout(tokenizer, corpus_text: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [corpus_text[:3000], corpus_text[3000:6000]]
    _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"body": d}) for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    a = tokenize_file(tmp_path / "d.jsonl", tokenizer, text_field="body", cache_dir=tmp_path / "c")
    b = tokenize_file(tmp_path / "d.parquet", tokenizer, text_field="body", cache_dir=tmp_path / "c")
    assert np.array_equal(a, b)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first = tokenizer.encode(docs[0], add_special_tokens=False)
    assert a[0] == bos and list(a[1 : 1 + len(first)]) == first and a[1 + len(first)] == eos
    assert (a == bos).sum() == 2 and (a == eos).sum() == 2


def test_tokenized_once_then_cached(
    tokenizer, corpus_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deepseek_core.training.data as data

    cache = tmp_path / "cache"
    first = load_text_dataset(corpus_jsonl, tokenizer, 64, 0.1, text_field="content", cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the file was tokenized again despite a cache entry")

    monkeypatch.setattr(data, "read_documents", must_not_run)
    second = load_text_dataset(corpus_jsonl, tokenizer, 32, 0.1, text_field="content", cache_dir=cache)
    assert first.num_tokens == second.num_tokens  # new seq_len, same cached stream
    # A different text field is a different key: it would need tokenizing (and here fails loudly).
    with pytest.raises(AssertionError, match="tokenized again"):
        load_text_dataset(corpus_jsonl, tokenizer, 32, 0.1, text_field="id", cache_dir=cache)


def test_packing_and_split(tokenizer, corpus_file: Path, tmp_path: Path) -> None:
    split = load_text_dataset(corpus_file, tokenizer, 64, eval_fraction=0.1, cache_dir=tmp_path)
    windows = (split.num_tokens - 1) // 64
    assert len(split.train) + len(split.eval) == windows
    assert len(split.eval) == -(-windows // 10)
    item = split.train[3]
    assert item["input_ids"].shape == (64,) and torch.equal(item["input_ids"][1:], item["labels"][:-1])
    nxt = split.train[4]
    assert (
        item["labels"][-1] == nxt["input_ids"][0]
    )  # consecutive windows share one token: every token is a label
    x, y = split.train.get_batch(torch.tensor([3, 4]))
    assert torch.equal(x[0], item["input_ids"]) and torch.equal(y[1], nxt["labels"]) and x.dtype == torch.long
    # The eval part starts where the train part's labels end: no token is in both as a label.
    assert split.eval[0]["input_ids"][0] == split.train[len(split.train) - 1]["labels"][-1]
