"""A training process killed with SIGKILL after a checkpoint resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from deepseek_core.training import COMPLETE_MARKER, latest_checkpoint, list_checkpoints
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

DRIVER = """
import sys
from deepseek_ce import Model, Trainer, TrainingConfig
from deepseek_core import ModelConfig, Tokenizer

corpus, tokenizer_dir, output_dir = sys.argv[1:4]
tok = Tokenizer.from_pretrained(tokenizer_dir)
shape = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# The seed of the random init is an argument: a resumed process starts from other weights and must load them.
model = Model.from_config(ModelConfig.from_preset("deepseek-tiny", **shape), tokenizer=tok, seed=int(sys.argv[4]))
config = TrainingConfig(max_steps=40, batch_size=8, seq_len=32, learning_rate=3e-3, warmup_steps=10,
                        save_every=10, keep_last=2, eval_every=20, eval_steps=2, log_every=10, seed=3,
                        progress_bar=False)
Trainer(model, corpus, config=config, output_dir=output_dir).fit()
"""


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, None)


def test_sigkill_then_resume_equals_uninterrupted(
    corpus_file: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    base = [sys.executable, str(driver), str(corpus_file), str(tokenizer_dir)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    # The run to be killed: SIGKILL as soon as its first complete checkpoint exists (mid-run, maybe mid-save).
    proc = subprocess.Popen(
        [*base, str(killed), "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(killed) is None:
            assert proc.poll() is None, "the training process ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    steps_at_kill = [s for s, _ in list_checkpoints(killed)]
    assert steps_at_kill and max(steps_at_kill) < 40, steps_at_kill  # it really was killed mid-run

    _run([*base, str(killed), "2"])  # resumes from the latest complete checkpoint
    _run([*base, str(straight), "1"])  # uninterrupted, from the killed run's initial weights

    log = (killed / "train.log").read_text()
    assert "resumed from" in log
    end_a, end_b = straight / "checkpoint-000040", killed / "checkpoint-000040"
    assert (end_a / COMPLETE_MARKER).is_file() and (end_b / COMPLETE_MARKER).is_file()
    a, b = load_file(str(end_a / "model.safetensors")), load_file(str(end_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Optimizer moments match too (the next step would be identical as well).
    state_a = torch.load(end_a / "trainer_state.pt", weights_only=True)
    state_b = torch.load(end_b / "trainer_state.pt", weights_only=True)
    for key, moments in state_a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], state_b["optimizer"]["state"][key]["exp_avg_sq"])
    assert not any(
        p.name.startswith(".tmp-") for p in killed.iterdir()
    )  # a temp dir of the killed save is gone
