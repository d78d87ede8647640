"""The Dask data pipeline: exact tokens vs a single-process loop, resume after SIGKILL, bad-record reporting,
rank-disjoint windows over the result, and inputs read from an S3-compatible server (moto on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deepseek_core import Tokenizer
from deepseek_core.training.shards import PackedShardDataset, read_index
from deepseek_ee.data import DataError, prepare_dataset
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

pytestmark = pytest.mark.integration

WORDS = [
    "the",
    "of",
    "and",
    "data",
    "token",
    "shard",
    "worker",
    "cluster",
    "pipeline",
    "model",
    "train",
    "text",
    "corpus",
    "quick",
    "brown",
    "fox",
    "lazy",
    "dog",
    "über",
    "café",
    "naïve",
    "数据",
    "管道",
    "模型",
    "🙂",
    "2024",
    "3.14",
    "don't",
    "it's",
    "(x)",
    "[y]",
    "{z}",
    "#tag",
]
CLI = "import sys; from deepseek_ee.cli import main; sys.exit(main())"


def _paragraph(rng: random.Random, n_max: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n_max)))


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE (vocab ~1000) with an EOS token, saved as tokenizer.json."""
    rng = random.Random(1)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_paragraph(rng) for _ in range(2000)], trainer)
    directory = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 files, .txt / .jsonl / .parquet in turn; a few larger ones that get split into chunks."""
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("corpus")
    for i in range(200):
        kind = ("txt", "jsonl", "parquet")[i % 3]
        n_docs = rng.randint(0, 12) if i % 50 else 150  # files 0, 50, 100, 150 are large
        docs = [_paragraph(rng) for _ in range(n_docs)]
        path = directory / f"part-{i:03d}.{kind}"
        if kind == "txt":
            # blank lines, indentation and a missing final newline on some files
            text = "\n".join(d if j % 4 else f"  {d}\n" for j, d in enumerate(docs))
            path.write_text(text + ("\n" if i % 2 else ""), encoding="utf-8")
        elif kind == "jsonl":
            lines = [json.dumps({"id": j, "text": d}, ensure_ascii=j % 2 == 0) for j, d in enumerate(docs)]
            if docs:
                lines.insert(len(lines) // 2, "   ")  # a blank line is not a record
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            pq.write_table(pa.table({"id": list(range(n_docs)), "text": docs}), path, row_group_size=16)
    return directory


@pytest.fixture(scope="module")
def dask_client() -> Iterator[object]:
    """One 2-worker LocalCluster (processes) shared by the in-process tests."""
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


# ---------------------------------------------------------------------- the single-process reference
def _lines(data: bytes) -> list[bytes]:
    return re.findall(rb"[^\n]*\n|[^\n]+$", data)


def reference_tokens(files: list[Path], tok: Tokenizer, append_eos: bool = True) -> np.ndarray:
    """The plain loop: files in order; txt line by line (one document per file), jsonl and parquet per record."""
    eos = [tok.eos_token_id] if append_eos else []
    out: list[int] = []
    for path in files:
        if path.suffix == ".txt":
            for line in _lines(path.read_bytes()):
                out += tok.encode(line.decode("utf-8"), add_special_tokens=False)
            out += eos
        elif path.suffix == ".jsonl":
            for line in _lines(path.read_bytes()):
                if line.strip():
                    out += tok.encode(json.loads(line)["text"], add_special_tokens=False) + eos
        else:
            for text in pq.read_table(path).column("text").to_pylist():
                out += tok.encode(text, add_special_tokens=False) + eos
    return np.array(out, dtype=np.int64)


def stream(directory: Path) -> np.ndarray:
    """The dataset's token stream: shards concatenated in index order."""
    index = read_index(directory)
    dtype = np.uint16 if index.dtype == "uint16" else np.uint32
    parts = [np.fromfile(directory / s.file, dtype=dtype) for s in index.shards]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---------------------------------------------------------------------- tokens
def test_pipeline_matches_single_process_loop(
    corpus: Path, tokenizer_dir: Path, tokenizer: Tokenizer, dask_client: object, tmp_path: Path
) -> None:
    files = sorted(corpus.iterdir())
    assert len(files) == 200 and {p.suffix for p in files} == {".txt", ".jsonl", ".parquet"}
    expected = reference_tokens(files, tokenizer)

    # whole files packed into tasks of <= 4 KiB; the large files are split into byte / row-group ranges
    out = tmp_path / "ds"
    index = prepare_dataset(
        str(corpus / "*"),
        out,
        tokenizer_dir,
        client=dask_client,
        append_eos=True,
        chunk_bytes=4096,
        shard_tokens=3000,
        progress=False,
    )
    assert index.complete and index.dtype == "uint16"
    assert len(index.shards) > 20 and max(s.tokens for s in index.shards) <= 3000
    np.testing.assert_array_equal(stream(out), expected)
    assert index.total_tokens == len(expected) == read_index(out).total_tokens

    # the index names every source with its size, sha256 and token count, and the tokenizer's hash
    assert [s["path"] for s in index.sources] == [str(p) for p in files]
    for src, path in zip(index.sources, files):
        data = path.read_bytes()
        assert src["size"] == len(data) and src["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(s["tokens"] for s in index.sources) == len(expected)
    tok_json = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert json.loads(tok_json)["model"]["type"] == "BPE" and len(index.tokenizer["sha256"]) == 64
    assert index.skipped == []

    # a default run (one task for the whole small corpus, one shard) gives the same stream
    whole = prepare_dataset(
        str(corpus), tmp_path / "whole", tokenizer_dir, client=dask_client, append_eos=True, progress=False
    )
    assert len(whole.shards) == 1
    np.testing.assert_array_equal(stream(tmp_path / "whole"), expected)


def test_packed_dataset_ranks_over_pipeline_output(
    corpus: Path, tokenizer_dir: Path, tokenizer: Tokenizer, dask_client: object, tmp_path: Path
) -> None:
    files = sorted(corpus.iterdir())[:60]
    prepare_dataset(
        [str(f) for f in files],
        tmp_path,
        tokenizer_dir,
        client=dask_client,
        chunk_bytes=2048,
        append_eos=True,
        progress=False,
    )
    tokens = reference_tokens(files, tokenizer)
    seq_len = 32
    ranks = [PackedShardDataset(tmp_path, seq_len, rank=r, world_size=2, seed=7) for r in range(2)]
    ids = [{ds.window_id(i) for i in range(len(ds))} for ds in ranks]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(range((len(tokens) - 1) // seq_len))
    item = ranks[1][3]
    w = ranks[1].window_id(3)
    np.testing.assert_array_equal(item["input_ids"].numpy(), tokens[w * seq_len : (w + 1) * seq_len])
    np.testing.assert_array_equal(item["labels"].numpy(), tokens[w * seq_len + 1 : (w + 1) * seq_len + 1])


# ---------------------------------------------------------------------- resume
def test_killed_run_resumes_without_redoing_finished_shards(
    corpus: Path, tokenizer_dir: Path, tokenizer: Tokenizer, dask_client: object, tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    args = ["data", "prepare", "--input", str(corpus / "*.txt"), str(corpus / "*.jsonl"),
            str(corpus / "*.parquet"), "--output", str(out), "--tokenizer", str(tokenizer_dir),
            "--workers", "2", "--chunk-bytes", "2KB", "--shard-tokens", "300", "--max-in-flight", "2",
            "--append-eos"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    done_dir = out / ".done"
    finished: dict[str, tuple[int, int]] = {}
    try:
        deadline = time.monotonic() + 180
        while len(list(done_dir.glob("task-*.json"))) < 8:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no shards were finished in time"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    markers = sorted(done_dir.glob("task-*.json"))
    for marker in markers:
        for shard in json.loads(marker.read_text())["shards"]:
            st = (out / shard["file"]).stat()
            finished[shard["file"]] = (st.st_ino, st.st_mtime_ns)
    assert finished, "the killed run left no finished shards"
    partial = json.loads((out / "index.json").read_text()) if (out / "index.json").exists() else None
    assert partial is None or not partial["complete"]

    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr
    m = re.search(r"(\d+) already done, (\d+) to run", result.stderr)
    assert m and int(m.group(1)) >= len(markers) and int(m.group(2)) > 0, result.stderr
    for name, stamp in finished.items():
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp, f"{name} was rewritten"

    # identical to an uninterrupted run with the same settings, and to the single-process loop
    fresh = tmp_path / "fresh"
    expected_index = prepare_dataset(
        [str(corpus / f"*{ext}") for ext in (".txt", ".jsonl", ".parquet")],
        fresh,
        tokenizer_dir,
        client=dask_client,
        chunk_bytes=2048,
        shard_tokens=300,
        append_eos=True,
        progress=False,
    )
    resumed_index = read_index(out)
    assert resumed_index.complete
    assert [(s.file, s.tokens) for s in resumed_index.shards] == [
        (s.file, s.tokens) for s in expected_index.shards
    ]
    np.testing.assert_array_equal(stream(out), stream(fresh))
    files = [
        *sorted(corpus.glob("*.txt")),
        *sorted(corpus.glob("*.jsonl")),
        *sorted(corpus.glob("*.parquet")),
    ]
    np.testing.assert_array_equal(stream(out), reference_tokens(files, tokenizer))
    assert not list(out.glob(".shard-*.tmp"))


def test_rerun_redoes_only_changed_inputs_and_damaged_shards(
    corpus: Path, tokenizer_dir: Path, tokenizer: Tokenizer, dask_client: object, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(3)
    for i in range(8):  # 700-900 bytes each: with chunk_bytes=1000 every file is a task of its own
        records = [json.dumps({"text": _paragraph(rng, 12)[:70].ljust(70, ".")}) for _ in range(10)]
        (src / f"f{i}.jsonl").write_text("\n".join(records) + "\n")
    out = tmp_path / "ds"
    kwargs = {"client": dask_client, "chunk_bytes": 1024, "progress": False}
    first = prepare_dataset(str(src), out, tokenizer_dir, **kwargs)
    assert len(first.shards) == 8
    stamps = {s.file: (out / s.file).stat().st_mtime_ns for s in first.shards}
    by_source = {s.sources[0]: s.file for s in first.shards}
    files = sorted(src.iterdir())
    changed, damaged = files[2], by_source[str(files[5])]
    with changed.open("a") as handle:
        handle.write(json.dumps({"text": "one more record"}) + "\n")
    with (out / damaged).open("r+b") as handle:
        handle.truncate(2)

    second = prepare_dataset(str(src), out, tokenizer_dir, **kwargs)
    rewritten = {s.file for s in second.shards if (out / s.file).stat().st_mtime_ns != stamps.get(s.file)}
    assert rewritten == {by_source[str(changed)], damaged}
    np.testing.assert_array_equal(stream(out), reference_tokens(files, tokenizer, append_eos=False))


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def bad_corpus(tmp_path: Path) -> Path:
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "a_good.txt").write_text("first line\nsecond line\n")
    (directory / "b_bad_utf8.txt").write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\nlast\n")
    lines = [
        json.dumps({"text": "one"}),
        "{not json",
        json.dumps({"text": "three"}),
        json.dumps({"body": "x"}),
        json.dumps({"text": 5}),
        json.dumps({"text": "six"}),
    ]
    (directory / "c_bad.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_on_error_skip_lists_bad_records_and_keeps_the_rest(
    bad_corpus: Path, tokenizer_dir: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    result = _run_cli(
        "data",
        "prepare",
        "--input",
        str(bad_corpus / "*"),
        "--output",
        str(out),
        "--tokenizer",
        str(tokenizer_dir),
        "--on-error",
        "skip",
        "--workers",
        "2",
    )
    assert result.returncode == 0, result.stderr
    bad_txt, bad_jsonl = str(bad_corpus / "b_bad_utf8.txt"), str(bad_corpus / "c_bad.jsonl")
    for location in (f"{bad_txt}:3", f"{bad_jsonl}:2", f"{bad_jsonl}:4", f"{bad_jsonl}:5"):
        assert location in result.stderr, result.stderr
    assert "invalid UTF-8" in result.stderr and "invalid JSON" in result.stderr
    assert "skipped 4 bad records in 2 files" in result.stderr

    index = read_index(out)
    skipped = {(s["path"], s["line"]) for s in index.skipped}
    assert skipped == {(bad_txt, 3), (bad_jsonl, 2), (bad_jsonl, 4), (bad_jsonl, 5)}
    assert all(s["error"] for s in index.skipped)
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    expected = enc("first line\n") + enc("second line\n") + enc("fine\n") + enc("also fine\n") + enc("last\n")
    expected += enc("one") + enc("three") + enc("six")
    np.testing.assert_array_equal(stream(out), expected)


def test_on_error_fail_exits_nonzero_naming_file_and_line(
    bad_corpus: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    result = _run_cli(
        "data",
        "prepare",
        "--input",
        str(bad_corpus / "c_bad.jsonl"),
        "--output",
        str(tmp_path / "ds"),
        "--tokenizer",
        str(tokenizer_dir),
        "--on-error",
        "fail",
    )
    assert result.returncode == 1
    assert f"{bad_corpus / 'c_bad.jsonl'}:2: invalid JSON" in result.stderr, result.stderr
    assert not json.loads((tmp_path / "ds" / "index.json").read_text())["complete"]


def test_fail_mode_reports_invalid_utf8_with_path_and_line(
    bad_corpus: Path, tokenizer_dir: Path, dask_client: object, tmp_path: Path
) -> None:
    path = bad_corpus / "b_bad_utf8.txt"
    with pytest.raises(DataError) as info:
        prepare_dataset(str(path), tmp_path, tokenizer_dir, client=dask_client, progress=False)
    assert (info.value.path, info.value.line) == (str(path), 3)
    assert str(info.value).startswith(f"{path}:3: invalid UTF-8")


def test_line_numbers_are_absolute_in_split_files(
    tokenizer_dir: Path, dask_client: object, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"record number {i}"}) for i in range(1, 301)]
    lines[236] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:  # 300 lines in ~1 KiB chunks: line 237 is deep in a later chunk
        prepare_dataset(
            str(path), tmp_path / "fail", tokenizer_dir, client=dask_client, chunk_bytes=1024, progress=False
        )
    assert info.value.line == 237
    index = prepare_dataset(
        str(path),
        tmp_path / "skip",
        tokenizer_dir,
        client=dask_client,
        chunk_bytes=1024,
        on_error="skip",
        progress=False,
    )
    assert [(s["line"], s["path"]) for s in index.skipped] == [(237, str(path))]
    assert index.sources[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_parquet_nulls_and_missing_columns_are_reported(
    tokenizer_dir: Path, dask_client: object, tmp_path: Path
) -> None:
    nulls, other = tmp_path / "nulls.parquet", tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), nulls)
    pq.write_table(pa.table({"body": ["a"]}), other)
    index = prepare_dataset(
        [str(nulls), str(other)],
        tmp_path / "ds",
        tokenizer_dir,
        client=dask_client,
        on_error="skip",
        progress=False,
    )
    assert {(s["path"], s.get("row")) for s in index.skipped} == {(str(nulls), 2), (str(other), None)}
    assert any("no column 'text'" in s["error"] for s in index.skipped)


def test_bad_arguments_are_refused(tokenizer_dir: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset(str(tmp_path / "missing.txt"), tmp_path / "a", tokenizer_dir, progress=False)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="notes.csv: unsupported file type"):
        prepare_dataset(str(tmp_path / "notes.csv"), tmp_path / "b", tokenizer_dir, progress=False)
    with pytest.raises(ValueError, match="on_error"):
        prepare_dataset(str(corpus), tmp_path / "c", tokenizer_dir, on_error="ignore")
    with pytest.raises(ValueError, match="chunk_bytes"):
        prepare_dataset(str(corpus), tmp_path / "d", tokenizer_dir, chunk_bytes=10)
    assert not any((tmp_path / name).exists() for name in "abcd")  # nothing written for refused arguments


# ---------------------------------------------------------------------- object storage
def test_reads_inputs_from_s3(
    moto_endpoint: str,
    corpus: Path,
    tokenizer_dir: Path,
    tokenizer: Tokenizer,
    dask_client: object,
    tmp_path: Path,
) -> None:
    import s3fs

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("corpus")
    files = sorted(corpus.iterdir())[:9]
    for path in files:
        fs.put_file(str(path), f"corpus/in/{path.name}")
    index = prepare_dataset(
        "s3://corpus/in/*",
        tmp_path,
        tokenizer_dir,
        client=dask_client,
        append_eos=True,
        storage_options=options,
        chunk_bytes=2048,
        progress=False,
    )
    assert [s["path"] for s in index.sources] == [f"s3://corpus/in/{p.name}" for p in files]
    assert [s["sha256"] for s in index.sources] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    np.testing.assert_array_equal(stream(tmp_path), reference_tokens(files, tokenizer))
