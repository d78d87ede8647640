"""The CE Trainer with output_dir on S3 (moto's server on loopback): checkpoints, loss curve and log are
published to the URL; a second Trainer resumes from the bucket and ends on the exact weights of an
uninterrupted local run; deepseek_core.load_model reads the published checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from deepseek_ce import Model, Trainer, TrainingConfig
from deepseek_core import load_model, storage
from deepseek_core.training import list_remote_checkpoints

from .conftest import micro_config

pytestmark = pytest.mark.integration

# min_lr_ratio=1.0: a constant rate after warmup, so the first (shorter) run follows the same schedule as the
# full-length reference and only the resume can make the weights differ.
CONFIG = TrainingConfig(
    max_steps=6,
    batch_size=4,
    seq_len=32,
    learning_rate=3e-3,
    warmup_steps=2,
    min_lr_ratio=1.0,
    eval_every=0,
    save_every=2,
    keep_last=2,
    log_every=2,
    eval_fraction=0.0,
    seed=11,
    progress_bar=False,
)


def _model(tokenizer) -> Model:
    return Model.from_config(micro_config(tokenizer.vocab_size), tokenizer=tokenizer, seed=3)


def test_train_to_s3_resume_from_s3_matches_local_run(
    s3_bucket: str, tokenizer, corpus_file: Path, tmp_path: Path
) -> None:
    reference = _model(tokenizer)
    Trainer(reference, corpus_file, config=CONFIG, output_dir=tmp_path / "local", echo=False).fit()

    url = f"{s3_bucket}/run"
    first = Trainer(
        _model(tokenizer), corpus_file, config=CONFIG.replace(max_steps=4), output_dir=url, echo=False
    )
    assert first.output_dir.is_relative_to(tmp_path / "cache")  # staging under DEEPSEEK_CACHE
    r1 = first.fit()
    first.close()
    assert r1.steps == 4 and r1.checkpoint_url == f"{url}/checkpoint-000004"
    assert [s for s, _ in list_remote_checkpoints(url)] == [2, 4]
    assert storage.remote_exists(f"{url}/loss_curve.png") and storage.remote_exists(f"{url}/train.log")

    # A fresh staging dir (another machine): everything must come from the bucket.
    shutil.rmtree(first.output_dir)
    model = _model(tokenizer)
    second = Trainer(model, corpus_file, config=CONFIG, output_dir=url, echo=False)
    r2 = second.fit()
    second.close()
    assert r2.steps == 6 and r2.stopped_by == "max_steps"
    assert r2.checkpoint_url == f"{url}/checkpoint-000006"
    assert [s for s, _ in list_remote_checkpoints(url)] == [4, 6]  # keep_last=2 pruned step 2 remotely
    log = (second.output_dir / "train.log").read_text()
    assert "resumed from" in log and "checkpoint step 2 " in log  # the first run's log was carried over
    with storage.open_url(f"{url}/train.log") as handle:
        assert handle.read().decode() == log

    ref_state = reference.module.state_dict()
    got_state = model.module.state_dict()
    assert ref_state.keys() == got_state.keys()
    for name, tensor in ref_state.items():
        assert torch.equal(tensor, got_state[name]), name

    loaded = load_model(f"{url}/checkpoint-000006")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name

    # Already done: a third fit resumes at step 6 and trains nothing.
    third = Trainer(_model(tokenizer), corpus_file, config=CONFIG, output_dir=url, echo=False)
    assert third.fit().stopped_by == "already_done"
    third.close()


def test_output_dir_url_errors(tokenizer, corpus_file: Path) -> None:
    with pytest.raises(ValueError, match=r"output_dir='ftp://x/y': unsupported URL scheme 'ftp'"):
        Trainer(_model(tokenizer), corpus_file, config=CONFIG, output_dir="ftp://x/y")
