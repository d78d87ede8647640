"""Dask data pipeline: tokens/s against a single-process loop, and peak memory as the corpus grows.

1. Speed. One generated corpus (mixed .txt / .jsonl / .parquet) tokenized two ways, same tokenizer (a
   byte-level BPE trained here), same token stream (checked byte for byte):
   - baseline: the plain single-process loop a user would write -- files in order, one
     `Tokenizer.encode(text, add_special_tokens=False)` call per line / record, tokens appended to one
     array written to one .bin file. (Single-threaded: `encode` of one text does not use the tokenizers
     thread pool.)
   - pipeline: `prepare_dataset` on a 2-worker LocalCluster (one thread per worker, workers run with
     TOKENIZERS_PARALLELISM=false), end to end (cluster start included) and on an already running cluster.
   For reference, two more single-process loops are timed: `encode_batch_fast` on one thread (the call the
   workers make: no character offsets, ~20% less CPU than `encode`) -- the pipeline's speedup over it is
   the parallel part alone -- and `encode_batch` with the tokenizers library's own thread pool (all cores).
   Goal: pipeline >= 1.7x the baseline loop. CPU seconds (all processes of each case) are printed too: on a
   shared machine the wall-clock figures depend on what else runs.
2. Memory. `deepseek-ee data prepare` run as a subprocess on corpora of each --sizes; the RSS of the whole
   process tree (client, scheduler, nannies, workers) is summed and sampled every 0.1 s. Goal: the peak
   stays within 20% across sizes (bounded memory).

    python tools/bench/data.py [--speed-size 48MB] [--sizes 100MB,1GB] [--workers 2] [--workdir DIR] [--keep]
    python tools/bench/data.py --speed-size 8MB --sizes 20MB,200MB     # quick run
"""

from __future__ import annotations

import argparse
import array
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import print_table  # noqa: E402

FILE_BYTES = 4 << 20  # generated files are about this size
CLI = "import sys; from deepseek_ee.cli import main; sys.exit(main())"


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("b").rstrip("i")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------- corpus and tokenizer
class TextGen:
    """Zipf-distributed pseudo-words in sentences: cheap to generate, BPE-friendly like real text."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
        lengths = self.rng.integers(2, 11, size=8000)
        words = ["".join(self.rng.choice(letters, size=n)) for n in lengths]
        words += [str(i) for i in range(100)] + ["über", "café", "数据", "模型", "—", "🙂"]
        self.words = np.array(words)
        ranks = np.arange(1, len(words) + 1)
        self.p = (1 / ranks) / (1 / ranks).sum()
        self.sentences = [self._sentence() for _ in range(20000)]

    def _sentence(self) -> str:
        n = int(self.rng.integers(4, 25))
        words = list(self.rng.choice(self.words, size=n, p=self.p))
        words[0] = words[0].capitalize()
        return " ".join(words) + self.rng.choice([".", ".", ".", "?", "!", ","])

    def documents(self, total_chars: int) -> list[str]:
        docs, size = [], 0
        while size < total_chars:
            k = int(self.rng.integers(1, 12))
            doc = " ".join(self.sentences[i] for i in self.rng.integers(0, len(self.sentences), size=k))
            docs.append(doc)
            size += len(doc) + 1
        return docs


def make_corpus(directory: Path, total_bytes: int, gen: TextGen) -> list[Path]:
    """About total_bytes of .txt / .jsonl / .parquet files (FILE_BYTES each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    files, size, i = [], 0, 0
    while size < total_bytes:
        kind = ("txt", "jsonl", "parquet")[i % 3]
        docs = gen.documents(min(FILE_BYTES, total_bytes - size))
        path = directory / f"part-{i:05d}.{kind}"
        if kind == "txt":
            path.write_text("\n".join(docs) + "\n", encoding="utf-8")
        elif kind == "jsonl":
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        else:
            pq.write_table(pa.table({"text": docs}), path, row_group_size=2048, compression="snappy")
        size += sum(len(d) for d in docs)  # count text, not container bytes (parquet compresses)
        files.append(path)
        i += 1
    return files


def train_tokenizer(directory: Path, gen: TextGen, vocab_size: int = 8192) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(gen.documents(4 << 20), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory


# ---------------------------------------------------------------------- the two sides
def units(path: Path):
    """The pipeline's tokenization contract, read plainly: txt lines, jsonl records, parquet rows."""
    if path.suffix == ".txt":
        with open(path, encoding="utf-8", newline="") as handle:
            yield from handle  # lines keep their "\n"
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)["text"]
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["text"]):
            yield from batch.column(0).to_pylist()


def baseline_loop(files: list[Path], tok_dir: Path, out: Path) -> int:
    """Plain single-process loop; returns the token count."""
    from deepseek_core import Tokenizer

    tok = Tokenizer.from_pretrained(tok_dir)
    tokens = array.array("H")
    for path in files:
        for text in units(path):
            tokens.extend(tok.encode(text, add_special_tokens=False))
    out.write_bytes(tokens.tobytes())
    return len(tokens)


def encode_batch_loop(files: list[Path], tok_dir: Path, fast: bool = False) -> int:
    """Single process over batches of 4096 units: `encode_batch` (the tokenizers library's own thread
    pool) or, with `fast`, `encode_batch_fast` on one thread (no offsets: what the pipeline's workers call)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    count = 0
    for path in files:
        batch: list[str] = []
        for text in units(path):
            batch.append(text)
            if len(batch) == 4096:
                count += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
                batch = []
        if batch:
            count += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
    return count


def stream_sha256(directory: Path) -> str:
    from deepseek_core.training.shards import read_index

    digest = hashlib.sha256()
    for shard in read_index(directory).shards:
        digest.update((directory / shard.file).read_bytes())
    return digest.hexdigest()


def _tree_cpu(dead_children: bool = False) -> float:
    """CPU seconds (user + system) of this process and its live descendants (workers); with
    `dead_children`, also of descendants that have exited (a LocalCluster that was closed)."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
            if dead_children and proc.pid == os.getpid():
                total += times.children_user + times.children_system
    return total


# ---------------------------------------------------------------------- memory sampling
class TreeSampler(threading.Thread):
    """Peak summed RSS of a process and all its descendants, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.peak_processes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += proc.memory_info().rss
            if total > self.peak:
                self.peak, self.peak_processes = total, len(procs)
            self.stop.wait(self.interval)


def run_cli_measured(corpus: Path, out: Path, tok_dir: Path, workers: int) -> tuple[float, int, int]:
    """(seconds, peak tree RSS, processes at the peak) of one `deepseek-ee data prepare` run."""
    cmd = [sys.executable, "-c", CLI, "data", "prepare", "--input", str(corpus), "--output", str(out),
           "--tokenizer", str(tok_dir), "--workers", str(workers), "--quiet"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=7200)
    finally:
        sampler.stop.set()
        sampler.join()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    if proc.returncode != 0:
        raise RuntimeError(f"data prepare failed ({proc.returncode}):\n{stderr[-3000:]}")
    return time.perf_counter() - start, sampler.peak, sampler.peak_processes


# ---------------------------------------------------------------------- main
def speed(work: Path, tok_dir: Path, size: int, workers: int, gen: TextGen) -> list[dict[str, object]]:
    from deepseek_ee.data import prepare_dataset
    from distributed import Client, LocalCluster

    files = make_corpus(work / "speed-corpus", size, gen)
    nbytes = sum(f.stat().st_size for f in files)
    print(f"speed corpus: {len(files)} files, {human(nbytes)}", flush=True)

    t, c = time.perf_counter(), time.process_time()
    n_base = baseline_loop(files, tok_dir, work / "baseline.bin")
    t_base, c_base = time.perf_counter() - t, time.process_time() - c
    base_sha = hashlib.sha256((work / "baseline.bin").read_bytes()).hexdigest()
    print(f"  baseline loop: {t_base:.1f}s", flush=True)

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    t, c = time.perf_counter(), time.process_time()
    n_fast = encode_batch_loop(files, tok_dir, fast=True)
    t_fast, c_fast = time.perf_counter() - t, time.process_time() - c
    print(f"  encode_batch_fast, one thread: {t_fast:.1f}s", flush=True)

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t, c = time.perf_counter(), time.process_time()
    n_batch = encode_batch_loop(files, tok_dir)
    t_batch, c_batch = time.perf_counter() - t, time.process_time() - c
    print(f"  encode_batch (thread pool): {t_batch:.1f}s", flush=True)

    t, c = time.perf_counter(), _tree_cpu(dead_children=True)
    index = prepare_dataset([str(f) for f in files], work / "e2e", tok_dir, n_workers=workers, progress=False)
    t_e2e, c_e2e = time.perf_counter() - t, _tree_cpu(dead_children=True) - c
    print(f"  pipeline end to end: {t_e2e:.1f}s", flush=True)
    same_e2e = index.total_tokens == n_base and stream_sha256(work / "e2e") == base_sha

    import dask
    from deepseek_ee.data.pipeline import _LOCAL_CLUSTER_CONFIG

    dask.config.set(_LOCAL_CLUSTER_CONFIG)  # as prepare_dataset's own LocalCluster
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.CRITICAL, env={"TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    with Client(cluster) as client:
        client.run(__import__, "deepseek_ee.data.worker")  # warm: imports done, as on a long-lived cluster
        t, c = time.perf_counter(), _tree_cpu()
        index = prepare_dataset(
            [str(f) for f in files], work / "warm", tok_dir, client=client, progress=False
        )
        t_warm, c_warm = time.perf_counter() - t, _tree_cpu() - c
    cluster.close()
    print(f"  pipeline on a running cluster: {t_warm:.1f}s", flush=True)
    same_warm = index.total_tokens == n_base and stream_sha256(work / "warm") == base_sha

    rows = []
    for name, seconds, cpu, count, same in (
        ("baseline: single-process encode() loop", t_base, c_base, n_base, True),
        ("single-process encode_batch_fast, 1 thread", t_fast, c_fast, n_fast, n_fast == n_base),
        ("single-process encode_batch (all cores)", t_batch, c_batch, n_batch, n_batch == n_base),
        (f"pipeline {workers} workers, end to end", t_e2e, c_e2e, n_base, same_e2e),
        (f"pipeline {workers} workers, running cluster", t_warm, c_warm, n_base, same_warm),
    ):
        rows.append({
            "case": name,
            "seconds": f"{seconds:.1f}",
            "CPU s": f"{cpu:.1f}",
            "tokens/s": f"{count / seconds:,.0f}",
            "MB/s": f"{nbytes / seconds / 1e6:.2f}",
            "vs baseline": f"{t_base / seconds:.2f}x",
            "same tokens": "yes" if same else "NO",
        })  # fmt: skip
    shutil.rmtree(work / "speed-corpus", ignore_errors=True)
    for name in ("e2e", "warm"):
        shutil.rmtree(work / name, ignore_errors=True)
    return rows


def memory(
    work: Path, tok_dir: Path, sizes: list[int], workers: int, gen: TextGen
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    first_peak = None
    for size in sizes:
        corpus, out = work / f"corpus-{size}", work / f"out-{size}"
        t = time.perf_counter()
        files = make_corpus(corpus, size, gen)
        nbytes = sum(f.stat().st_size for f in files)
        print(f"memory corpus {human(size)}: {len(files)} files, {human(nbytes)} "
              f"(generated in {time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
        seconds, peak, nprocs = run_cli_measured(corpus, out, tok_dir, workers)
        from deepseek_core.training.shards import read_index

        tokens = read_index(out).total_tokens
        first_peak = first_peak or peak
        rows.append({
            "corpus": human(nbytes),
            "files": len(files),
            "tokens": f"{tokens:,}",
            "seconds": f"{seconds:.0f}",
            "MB/s": f"{nbytes / seconds / 1e6:.2f}",
            "peak RSS (tree)": human(peak),
            "processes": nprocs,
            "vs first size": f"{peak / first_peak:.2f}x",
        })  # fmt: skip
        print(f"  {rows[-1]}", flush=True)
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--speed-size", default="48MB", help="corpus size of the speed comparison ('0' skips it)"
    )
    parser.add_argument(
        "--sizes", default="100MB,1GB", help="corpus sizes of the memory comparison ('' skips it)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", help="where corpora are generated (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    import psutil

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {psutil.cpu_count()} CPUs, {human(psutil.virtual_memory().total)} RAM; "
          f"load average {os.getloadavg()[0]:.1f}; work dir {work}", flush=True)  # fmt: skip
    try:
        gen = TextGen(0)
        tok_dir = train_tokenizer(work / "tokenizer", gen)
        speed_rows = memory_rows = []
        if parse_size(args.speed_size) > 0:
            speed_rows = speed(work, tok_dir, parse_size(args.speed_size), args.workers, gen)
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        if sizes:
            memory_rows = memory(work, tok_dir, sizes, args.workers, gen)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
        if speed_rows:
            print("\nSpeed (goal: pipeline >= 1.7x the baseline loop)")
            print_table(speed_rows)
        if memory_rows:
            print("\nPeak memory of `deepseek-ee data prepare` (goal: same within 20% across sizes)")
            print_table(memory_rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
