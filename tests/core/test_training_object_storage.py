"""Training checkpoints on object storage (moto's S3 server on loopback): train a few steps with checkpoints
published to s3://, then resume from the bucket and end exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from deepseek_core import CheckpointError, ModelConfig, Transformer, storage
from deepseek_core.training import (
    COMPLETE_MARKER,
    build_adamw,
    capture_rng_state,
    causal_lm_loss,
    fetch_remote_checkpoint,
    latest_remote_checkpoint,
    list_remote_checkpoints,
    load_trainer_state,
    load_weights_into,
    publish_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    warmup_cosine_scheduler,
)

pytestmark = pytest.mark.integration

TOTAL_STEPS = 6
SAVE_EVERY = 2


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """A tiny model: one intra-op thread is fastest, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config() -> ModelConfig:
    return ModelConfig.from_preset(
        "deepseek-tiny",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _batch(step: int) -> torch.Tensor:
    # The data position is the step: a resumed run sees the same batches as an uninterrupted one.
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 128, (2, 16), generator=generator)


class Run:
    """A minimal trainer over core's primitives, writing checkpoints to `output_url` through a scratch dir."""

    def __init__(self, output_url: str, scratch: Path) -> None:
        seed_everything(0)
        self.model = Transformer(_config())
        self.optimizer = build_adamw(self.model, learning_rate=1e-2)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, warmup_steps=2, max_steps=TOTAL_STEPS)
        self.output_url, self.scratch, self.step = output_url, scratch, 0

    def resume(self) -> str | None:
        url = latest_remote_checkpoint(self.output_url)
        if url is None:
            return None
        directory = fetch_remote_checkpoint(url)
        state = load_trainer_state(directory)
        load_weights_into(self.model, directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        return url

    def train(self, until: int) -> None:
        while self.step < until:
            loss = causal_lm_loss(self.model(_batch(self.step)), _batch(self.step))
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            if self.step % SAVE_EVERY == 0:
                state: dict[str, Any] = {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": capture_rng_state(),
                }
                local = save_checkpoint(self.scratch, self.step, self.model, state, keep_last=1)
                publish_checkpoint(local, self.output_url)


def test_checkpoints_to_s3_and_resume_from_there(s3_bucket: str, tmp_path: Path) -> None:
    reference = Run(f"{s3_bucket}/reference", tmp_path / "ref-scratch")
    reference.train(TOTAL_STEPS)

    output = f"{s3_bucket}/run"
    first = Run(output, tmp_path / "scratch-1")
    assert first.resume() is None  # nothing there yet: start from scratch
    first.train(4)  # "killed" after step 4: checkpoints 2 and 4 are in the bucket
    assert [step for step, _ in list_remote_checkpoints(output)] == [2, 4]

    # A later checkpoint whose upload died half-way (no manifest) is never resumed from.
    broken = storage.url_join(output, "checkpoint-000006")
    with storage.open_url(storage.url_join(broken, "model.safetensors"), "wb") as handle:
        handle.write(b"partial")

    second = Run(output, tmp_path / "scratch-2")  # a new machine: empty scratch directory
    resumed_from = second.resume()
    assert resumed_from is not None and resumed_from.endswith("checkpoint-000004")
    assert second.step == 4
    second.train(TOTAL_STEPS)
    assert [step for step, _ in list_remote_checkpoints(output)] == [2, 4, 6]

    for name, expected in reference.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], expected), name


def test_only_complete_checkpoints_are_published_or_resumed(s3_bucket: str, tmp_path: Path) -> None:
    incomplete = tmp_path / "checkpoint-000009"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=COMPLETE_MARKER):
        publish_checkpoint(incomplete, f"{s3_bucket}/run")
    # Uploaded by other means without the marker: listed nowhere, and refused if fetched by name.
    url = storage.upload_directory(incomplete, f"{s3_bucket}/run/checkpoint-000009")
    assert (
        list_remote_checkpoints(f"{s3_bucket}/run") == []
        and latest_remote_checkpoint(f"{s3_bucket}/run") is None
    )
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        fetch_remote_checkpoint(url)
