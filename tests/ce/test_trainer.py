"""The CE Trainer on CPU: learning, exact in-process resume, accumulation, NaN stop, data kinds, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from deepseek_ce import Model, Trainer, TrainingConfig, TrainingDivergedError
from deepseek_core import Transformer
from deepseek_core.training import latest_checkpoint, list_checkpoints
from safetensors.torch import load_file

from .conftest import micro_config

BASE = TrainingConfig(
    max_steps=12,
    batch_size=4,
    seq_len=32,
    learning_rate=3e-3,
    warmup_steps=2,
    eval_every=6,
    eval_steps=4,
    save_every=6,
    keep_last=0,
    log_every=3,
    eval_fraction=0.05,
    seed=7,
    progress_bar=False,
)


def _model(tokenizer, seed: int = 0) -> Model:
    return Model.from_config(micro_config(tokenizer.vocab_size), tokenizer=tokenizer, seed=seed)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_fit_learns_and_writes_logs_curve_and_checkpoints(
    tokenizer, corpus_file: Path, tmp_path: Path
) -> None:
    model = _model(tokenizer)
    config = BASE.replace(
        max_steps=60,
        batch_size=8,
        learning_rate=5e-3,
        eval_every=30,
        save_every=30,
        keep_last=1,
        log_every=10,
    )
    trainer = Trainer(model, corpus_file, config=config, output_dir=tmp_path, echo=False)
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.steps == 60 and result.tokens == 60 * 8 * 32 and result.stopped_by == "max_steps"
    assert result.eval_loss is not None and result.eval_loss < before["eval_loss"] - 0.75
    assert result.eval_perplexity == pytest.approx(np.exp(result.eval_loss))
    assert result.checkpoint == tmp_path / "checkpoint-000060" == latest_checkpoint(tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [60]  # keep_last=1 pruned step 30
    png = result.loss_curve.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    log = (tmp_path / "train.log").read_text()
    for needle in (
        "step 10/60 | loss",
        "step 60/60",
        "eval step 30 | loss",
        "checkpoint step 60",
        "lr ",
        "tok/s",
    ):
        assert needle in log
    # The facade's weights were trained in place and the checkpoint holds them.
    saved = _weights(result.checkpoint)
    assert torch.equal(
        saved["model.layers.0.mlp.down_proj.weight"], model.module.model.layers[0].mlp.down_proj.weight
    )
    assert json.loads((result.checkpoint / "training_config.json").read_text())["max_steps"] == 60


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    tokenizer, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = Trainer(
        _model(tokenizer), corpus_file, config=BASE, output_dir=tmp_path / "a", echo=False
    ).fit()

    original = Trainer.save_checkpoint

    def crash_after_step_6(self, *args, **kwargs):
        path = original(self, *args, **kwargs)
        if self.step == 6:
            raise RuntimeError("simulated crash")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_model(tokenizer), corpus_file, config=BASE, output_dir=tmp_path / "b", echo=False).fit()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    # A fresh process would build a freshly initialized model: use another seed to prove the weights come back.
    resumed = Trainer(
        _model(tokenizer, seed=123), corpus_file, config=BASE, output_dir=tmp_path / "b", echo=False
    )
    result = resumed.fit()
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()
    a, b = _weights(straight.checkpoint), _weights(result.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert result.eval_loss == straight.eval_loss
    # The loss history (for the curve) is continuous across the resume.
    state = torch.load(result.checkpoint / "trainer_state.pt", weights_only=True)
    assert [s for s, _ in state["history"]["train"]] == list(range(1, 13))
    # Running again finds the finished run and trains nothing more.
    again = Trainer(
        _model(tokenizer, seed=5), corpus_file, config=BASE, output_dir=tmp_path / "b", echo=False
    ).fit()
    assert again.stopped_by == "already_done" and again.steps == 12


def test_gradient_accumulation_matches_one_big_batch(tokenizer, corpus_file: Path, tmp_path: Path) -> None:
    config = BASE.replace(max_steps=4, batch_size=8, eval_every=0, save_every=0)
    big = Trainer(
        _model(tokenizer), corpus_file, config=config, output_dir=tmp_path / "big", echo=False
    ).fit()
    accum_cfg = config.replace(batch_size=4, grad_accum_steps=2)
    small = Trainer(
        _model(tokenizer), corpus_file, config=accum_cfg, output_dir=tmp_path / "acc", echo=False
    ).fit()
    a, b = _weights(big.checkpoint), _weights(small.checkpoint)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    assert big.tokens == small.tokens == 4 * 8 * 32


def test_non_finite_loss_stops_with_the_step_number(tokenizer, corpus_file: Path, tmp_path: Path) -> None:
    model = _model(tokenizer)
    trainer = Trainer(model, corpus_file, config=BASE, output_dir=tmp_path, echo=False)
    with torch.no_grad():
        model.module.model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"^step 1: loss is nan"):
        trainer.fit()
    assert latest_checkpoint(tmp_path) is None


def test_a_transformer_with_a_tokenizer_and_bf16_autocast(
    tokenizer, corpus_jsonl: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = Transformer(micro_config(tokenizer.vocab_size))
    config = BASE.replace(max_steps=3, precision="bf16", text_field="content", eval_every=0, save_every=0)
    with pytest.raises(ValueError, match="train_data: a text file needs a tokenizer"):
        Trainer(module, corpus_jsonl, config=config, output_dir=tmp_path)
    trainer = Trainer(
        module, corpus_jsonl, config=config, output_dir=tmp_path, tokenizer=tokenizer, echo=False
    )
    assert trainer.precision == "bf16"
    result = trainer.fit()
    assert result.steps == 3 and np.isfinite(result.eval_loss)
    assert module.lm_head.weight.dtype == torch.float32  # master weights stay fp32 under autocast


def test_prebuilt_datasets_and_packed_shards(tokenizer, corpus_text: str, tmp_path: Path) -> None:
    from deepseek_core.training.shards import INDEX_NAME, DatasetIndex, ShardInfo

    ids = np.array(tokenizer.encode(corpus_text[:40_000]), dtype=np.uint16)
    # A Dataset of plain token sequences: labels are the next tokens.
    sequences = [torch.from_numpy(ids[i : i + 32].astype(np.int64)) for i in range(0, 32 * 40, 32)]
    config = BASE.replace(max_steps=3, eval_every=0, save_every=0)
    plain = Trainer(
        _model(tokenizer),
        sequences,
        eval_data=sequences[:8],
        config=config,
        output_dir=tmp_path / "p",
        echo=False,
    )
    assert np.isfinite(plain.fit().eval_loss)
    # Packed shards (the EE data pipeline's output): two shard files plus index.json.
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    half = len(ids) // 2
    ids[:half].tofile(shard_dir / "shard-00000.bin")
    ids[half:].tofile(shard_dir / "shard-00001.bin")
    index = DatasetIndex(
        dtype="uint16",
        shards=[ShardInfo("shard-00000.bin", half), ShardInfo("shard-00001.bin", len(ids) - half)],
    )
    (shard_dir / INDEX_NAME).write_text(json.dumps(index.to_dict()))
    trainer = Trainer(_model(tokenizer), shard_dir, config=config, output_dir=tmp_path / "s", echo=False)
    assert trainer.seq_len == 32 and trainer.eval_dataset is not None
    assert len(trainer.train_dataset) + len(trainer.eval_dataset) == (len(ids) - 1) // 32
    assert np.isfinite(trainer.fit().eval_loss)


def test_output_dir_url_and_missing_eval_data_are_clear_errors(
    tokenizer, corpus_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"output_dir='ftp://bucket/run': unsupported URL scheme"):
        Trainer(_model(tokenizer), corpus_file, config=BASE, output_dir="ftp://bucket/run")
    trainer = Trainer(
        _model(tokenizer),
        corpus_file,
        config=BASE.replace(eval_fraction=0.0),
        output_dir=tmp_path,
        echo=False,
    )
    with pytest.raises(ValueError, match="evaluate: no eval data"):
        trainer.evaluate()
    with pytest.raises(TypeError, match="model: expected"):
        Trainer(object(), corpus_file, config=BASE, output_dir=tmp_path)
