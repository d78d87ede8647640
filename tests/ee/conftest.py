# ---------------------------------------------------------------------------------------------------------------
# Compression fixtures (tests/ee/test_compression.py): a small model really trained on real text.
# ---------------------------------------------------------------------------------------------------------------
from __future__ import annotations

import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TrainedLM:
    """A checkpoint trained on Python standard-library source, and held-out text from other files."""

    model_dir: Path
    eval_file: Path
    steps: int
    first_loss: float
    final_loss: float
    seconds: float


def _stdlib_split(train_chars: int) -> tuple[list[str], list[str]]:
    """Every tenth stdlib module is held out for evaluation; the rest (up to `train_chars`) is for training."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train: list[str] = []
    held_out: list[str] = []
    size = 0
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        if i % 10 == 0:
            held_out.append(text)
        elif size < train_chars:
            train.append(text)
            size += len(text)
    return train, held_out


@pytest.fixture(scope="session")
def stdlib_lm(tmp_path_factory: pytest.TempPathFactory) -> TrainedLM:
    """Train a byte-level BPE tokenizer (512 tokens) and a deepseek-tiny-shaped model (~3.2M parameters,
    untied lm_head) for 250 AdamW steps of 16 x 64 tokens on stdlib source (loss ~6.3 -> ~4.2 nats); save it
    with save_model (float32). Built fresh for each session (nothing cached across runs); about a minute on
    2 idle CPU cores (~80 CPU-seconds).
    """
    import torch
    from deepseek_core import ModelConfig, Transformer, save_model
    from deepseek_core.training import build_adamw, causal_lm_loss, train_tokenizer, warmup_cosine_scheduler

    start = time.perf_counter()
    root = tmp_path_factory.mktemp("stdlib-lm")
    train_texts, held_out = _stdlib_split(train_chars=1_500_000)
    eval_file = root / "heldout.txt"
    eval_file.write_text("\n".join(held_out), encoding="utf-8")
    tokenizer = train_tokenizer(train_texts, vocab_size=512)
    data = torch.tensor([t for ids in tokenizer.encode_batch(train_texts) for t in ids], dtype=torch.long)

    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "deepseek-tiny",
        vocab_size=tokenizer.vocab_size,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Transformer(config)
    steps, batch, seq = 250, 16, 64
    optimizer = build_adamw(model, learning_rate=6e-3, weight_decay=0.01)
    schedule = warmup_cosine_scheduler(optimizer, warmup_steps=20, max_steps=steps)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts.tolist()])
        loss = causal_lm_loss(model(ids), ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    model_dir = save_model(model, root / "float", tokenizer=tokenizer)
    return TrainedLM(
        model_dir=model_dir,
        eval_file=eval_file,
        steps=steps,
        first_loss=losses[0],
        final_loss=sum(losses[-10:]) / 10,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------------------------
# A real `deepseek-core serve` process on a free loopback port (its own process group, killed at the end).
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def serve_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: serve_model(model_dir) -> base URL of a ready `deepseek-core serve`; every server is killed after."""
    import contextlib
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    started: list[subprocess.Popen[bytes]] = []

    def start(model_dir: Path) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        script = Path(sys.executable).parent / "deepseek-core"
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "deepseek_core.cli"]
        log = tmp_path / f"serve-{len(started)}.log"
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                [*launcher, "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, (
                "server not ready:\n" + log.read_text(errors="replace")[-3000:]
            )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/ready", timeout=5).status_code == 200:
                    return base
            time.sleep(0.3)

    yield start
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
