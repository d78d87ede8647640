"""The quickstart's checkpoint loads in transformers with the same logits and greedy completion; loss falls."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepseek_ce import Model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`deepseek-ce quickstart` for a fixed, short number of steps on half a megabyte of the stdlib."""
    out = tmp_path_factory.mktemp("quickstart")
    args = [sys.executable, "-m", "deepseek_ce.cli", "quickstart", "--output-dir", str(out)]
    args += ["--max-steps", "30", "--corpus-mb", "0.5", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return out, text


def test_quickstart_reports_a_falling_loss_and_its_outputs(quickstart_run: tuple[Path, str]) -> None:
    out, text = quickstart_run
    match = re.search(
        r"eval perplexity: ([\d,.]+) before -> ([\d,.]+) after 30 steps \(loss ([\d.]+) -> ([\d.]+)", text
    )
    assert match, text
    loss_before, loss_after = float(match.group(3)), float(match.group(4))
    assert loss_before > 7.5  # random init over a 4096-token vocabulary: about ln(4096) = 8.3
    assert loss_after < loss_before - 1.0
    assert f"checkpoint: {out / 'checkpoint-000030'}" in text
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert ">>> def fibonacci(n):" in text
    assert "eval step 30 | loss" in (out / "train.log").read_text()


def test_quickstart_checkpoint_matches_transformers(quickstart_run: tuple[Path, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = quickstart_run
    checkpoint = out / "checkpoint-000030"
    ours = Model.from_pretrained(checkpoint)
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(checkpoint)
    prompts = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main():\n    "]
    for prompt in prompts:
        ids = ours.tokenizer.encode(prompt)
        assert hf_tok(prompt)["input_ids"] == ids
        assert ids[0] == ours.tokenizer.bos_token_id == hf_tok.bos_token_id
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits
            actual = ours.module(torch.tensor([ids]))
        assert torch.allclose(actual, expected, atol=1e-4, rtol=0), (actual - expected).abs().max()

        with torch.no_grad():
            hf_ids = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
        hf_text = hf_tok.decode(hf_ids, skip_special_tokens=True)
        assert ours.generate(prompt, max_new_tokens=24, temperature=0.0) == hf_text
