"""The deepseek-ce console command: info, train (and its automatic resume), generate, chat, serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from deepseek_ce import Model
from deepseek_ce.cli import main
from deepseek_core import Tokenizer

from .conftest import micro_config

CLI = [sys.executable, "-m", "deepseek_ce.cli"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    Model.from_config(
        micro_config(512), tokenizer=Tokenizer.from_pretrained(tokenizer_dir), seed=0
    ).save_pretrained(out)
    return out


def _run(args: list[str], stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [*CLI, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_info_preset_and_checkpoint(small_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "deepseek-tiny"]) == 0
    out = capsys.readouterr().out
    assert "parameters:  3,950,848 (4.0M)" in out and "bfloat16" in out and "float32   15.1 MiB" in out
    assert main(["info", str(small_checkpoint)]) == 0
    assert "vocabulary:  512 tokens" in capsys.readouterr().out
    assert main(["info", "no-such-thing"]) == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err


def test_train_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert main(["train", "--data", str(bad), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: line 2 is not valid JSON" in err and "Traceback" not in err
    assert main(["train", "--data", str(bad), "--max-steps", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert "TrainingConfig.max_steps: must be >= 1" in capsys.readouterr().err


def test_train_trains_a_tokenizer_then_resumes(corpus_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(corpus_jsonl), "--text-field", "content", "--output-dir", str(out)]
    args += [
        "--vocab-size",
        "400",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--save-every",
        "2",
    ]
    args += ["--eval-steps", "2", "--no-progress"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training a byte-level BPE tokenizer (400 tokens)" in first.stdout
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "checkpoint-000004").is_dir()
    assert "result: steps=4" in first.stdout
    longer = _run([*args[:-3], "--max-steps", "6", "--no-progress"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "training a byte-level BPE tokenizer" not in longer.stdout  # the run's own tokenizer is reused
    assert "resumed from" in longer.stdout and "checkpoint-000004" in longer.stdout
    assert "result: steps=6" in longer.stdout
    model = Model.from_pretrained(out / "checkpoint-000006")
    assert model.config.vocab_size == model.tokenizer.vocab_size == 400


def test_generate_and_chat(small_checkpoint: Path) -> None:
    gen = _run(
        [
            "generate",
            "--model",
            str(small_checkpoint),
            "AI发展的关键因素是",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]
    )
    assert gen.returncode == 0, gen.stderr
    expected = Model.from_pretrained(small_checkpoint).generate(
        "AI发展的关键因素是", max_new_tokens=8, temperature=0.0
    )
    assert gen.stdout == "AI发展的关键因素是" + expected + "\n"
    chat = _run(
        ["chat", "--model", str(small_checkpoint), "--max-new-tokens", "4"],
        stdin="你好\n/reset\nhi\n/exit\nnever read\n",
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2 and "(history cleared)" in chat.stdout


@pytest.mark.integration
def test_serve_delegates_to_the_core_server(small_checkpoint: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--model",
            str(small_checkpoint),
            "--port",
            str(port),
            "--served-model-name",
            "micro",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                    models = json.loads(resp.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["micro"]
        body = json.dumps({"model": "micro", "prompt": "def f(", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            completion = json.loads(resp.read())
        assert completion["usage"]["completion_tokens"] <= 4 and isinstance(
            completion["choices"][0]["text"], str
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
