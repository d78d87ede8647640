"""TrainingConfig validation, the schedule, AdamW groups, the loss, the batch order, checkpoint selection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from deepseek_core import Transformer
from deepseek_core.errors import CheckpointError
from deepseek_core.training import (
    COMPLETE_MARKER,
    BatchOrder,
    TrainingConfig,
    WarmupCosine,
    capture_rng_state,
    causal_lm_loss,
    chunked_lm_loss,
    latest_checkpoint,
    list_checkpoints,
    lm_loss,
    load_trainer_state,
    parameter_groups,
    prune_checkpoints,
    remove_stale_temp_dirs,
    restore_rng_state,
    save_checkpoint,
)

from .conftest import micro_config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_steps", 0),
        ("batch_size", -1),
        ("seq_len", 1),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("weight_decay", -0.1),
        ("min_lr_ratio", 1.5),
        ("grad_accum_steps", 0),
        ("max_grad_norm", -1.0),
        ("keep_last", -1),
        ("precision", "fp16"),
        ("eval_fraction", 1.0),
        ("seq_len", "512"),
        ("max_steps", 10.5),
        ("max_time_s", 0.0),
        ("text_field", ""),
    ],
)
def test_training_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"TrainingConfig\.{field}"):
        TrainingConfig(**{field: value})


def test_training_config_round_trip_and_unknown_keys() -> None:
    cfg = TrainingConfig(max_steps=7, learning_rate=1e-3, precision="fp32")
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainingConfig.from_dict({"learning_rate": 1}).learning_rate == 1.0
    with pytest.raises(ValueError, match="unknown field.*max_step"):
        TrainingConfig.from_dict({"max_step": 3})
    with pytest.raises(ValueError, match="TrainingConfig.batch_size"):
        cfg.replace(batch_size=0)
    assert cfg.tokens_per_step == cfg.batch_size * cfg.seq_len


def test_warmup_cosine_schedule_shape() -> None:
    sched = WarmupCosine(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert sched(0) == pytest.approx(0.1)
    assert sched(9) == pytest.approx(1.0)
    assert sched(10) == pytest.approx(1.0)
    assert sched(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert sched(110) == pytest.approx(0.1)
    assert sched(500) == pytest.approx(0.1)
    values = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert WarmupCosine(50, 20)(19) == pytest.approx(1.0)  # a warmup longer than the run is capped


def test_parameter_groups_decay_matrices_only() -> None:
    model = Transformer(micro_config(128))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_losses_agree_with_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert torch.allclose(causal_lm_loss(logits, ids), expected)
    assert torch.allclose(lm_loss(logits[:, :-1], ids[:, 1:]), expected)

    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    full = lm_loss(hidden @ weight.T, ids)
    full.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = chunked_lm_loss(hidden, weight, ids, chunk_size=5)
    chunked.backward()
    assert torch.allclose(chunked, full, atol=1e-6)
    assert torch.allclose(hidden.grad, grads[0], atol=1e-6) and torch.allclose(
        weight.grad, grads[1], atol=1e-6
    )


def test_batch_order_is_seeded_resumable_and_covers_epochs() -> None:
    order = BatchOrder(10, 4, seed=3)
    batches = [order.next_batch() for _ in range(5)]  # 20 indices = two full epochs
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert flat[:10].tolist() != flat[10:].tolist()  # each epoch is shuffled anew

    first = BatchOrder(10, 4, seed=3)
    for _ in range(2):
        first.next_batch()
    resumed = BatchOrder(10, 4, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.next_batch().tolist() for _ in range(3)] == [b.tolist() for b in batches[2:]]
    with pytest.raises(ValueError, match="seed"):
        BatchOrder(10, 4, seed=4).load_state_dict(first.state_dict())
    assert len(BatchOrder(3, 8, seed=0).next_batch()) == 8  # a batch larger than the dataset wraps around


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_latest_checkpoint_skips_half_written_ones(tmp_path: Path) -> None:
    model = Transformer(micro_config(64))
    save_checkpoint(tmp_path, 10, model, {"note": "a"})
    save_checkpoint(tmp_path, 20, model, {"note": "b"})
    # A run killed while saving step 30 leaves its temp dir; a copy without the marker is also not complete.
    (tmp_path / ".tmp-checkpoint-000030-999").mkdir()
    (tmp_path / ".tmp-checkpoint-000030-999" / "model.safetensors").write_bytes(b"partial")
    unmarked = tmp_path / "checkpoint-000040"
    unmarked.mkdir()
    (unmarked / "trainer_state.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000020"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_trainer_state(unmarked)
    state = load_trainer_state(tmp_path / "checkpoint-000020")
    assert state["step"] == 20 and state["note"] == "b"
    removed = remove_stale_temp_dirs(tmp_path)
    assert [p.name for p in removed] == [".tmp-checkpoint-000030-999"]
    assert unmarked.exists()  # never deleted: it is not ours to judge
    prune_checkpoints(tmp_path, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20]
    assert not (tmp_path / "checkpoint-000010").exists()
    assert (tmp_path / "checkpoint-000020" / COMPLETE_MARKER).is_file()


def test_failed_save_leaves_no_checkpoint(tmp_path: Path) -> None:
    model = Transformer(micro_config(64))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot save this")

    with pytest.raises(Exception, match="cannot save this"):
        save_checkpoint(tmp_path, 5, model, {"bad": Unpicklable()})
    assert latest_checkpoint(tmp_path) is None
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert not os.path.exists(tmp_path / "checkpoint-000005")
