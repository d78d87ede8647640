"""Fixtures of the deepseek-ce tests: a small corpus, a byte-level BPE tokenizer trained on it, tiny models."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from deepseek_core import ModelConfig
from deepseek_core.training import train_tokenizer

# Code plus some Chinese, so the tokenizer has merges for both (byte-level BPE covers any text anyway).
CHINESE = "人工智能发展的关键因素是数据、算力和算法。AI发展的关键因素是人才与开放的研究环境。\n"


def _stdlib_text(max_chars: int) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenized-data cache in a temp dir, never the user's ~/.cache."""
    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "deepseek-cache"))


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """About 200 KB of Python source and some Chinese."""
    return _stdlib_text(200_000) + CHINESE * 20


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """The corpus as one .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """The corpus as .jsonl, one record per ~2 KB chunk, text under "content"."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    chunks = [corpus_text[i : i + 2000] for i in range(0, len(corpus_text), 2000)]
    path.write_text(
        "\n".join(json.dumps({"content": c, "id": i}) for i, c in enumerate(chunks)) + "\n", encoding="utf-8"
    )
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A 512-token byte-level BPE tokenizer trained on the corpus, saved as tokenizer.json + config."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_file, vocab_size=512, output_dir=out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """The session tokenizer (deepseek_core.Tokenizer)."""
    from deepseek_core import Tokenizer

    return Tokenizer.from_pretrained(tokenizer_dir)


def micro_config(vocab_size: int, **overrides) -> ModelConfig:
    """A deepseek-tiny-shaped model small enough for many CPU training steps in a test."""
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    shape.update(overrides)
    return ModelConfig.from_preset("deepseek-tiny", **shape)
