"""DistributedTrainer with output_dir on S3 (moto's server on loopback, tests/conftest.py): every Lightning
checkpoint and the final export are published to the URL; a trainer on a "fresh machine" (no staging dir, no
object cache) resumes from the bucket and ends on the weights of an uninterrupted run."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import ddp_driver  # tests/ee is on sys.path (pytest's rootdir-relative import of this directory)
import pytest
import torch
from deepseek_core import CheckpointError, ModelNotFoundError, load_model, storage
from deepseek_core.training import TrainingConfig
from deepseek_core.training.output import list_published
from deepseek_ee import DistributedTrainer

pytestmark = pytest.mark.integration

TOLERANCE = 1e-6
# min_lr_ratio=1.0: a constant rate after warmup, so the shorter first run follows the same schedule as the
# full-length reference and only the resume can make the weights differ.
CONFIG = TrainingConfig(
    max_steps=6, batch_size=4, seq_len=ddp_driver.SEQ_LEN, learning_rate=1e-3, warmup_steps=2, min_lr_ratio=1.0,
    save_every=2, keep_last=2, eval_every=0, log_every=1, seed=7, progress_bar=False, max_grad_norm=1.0,
)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model: one intra-op thread is fastest, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(output_dir: str | Path, max_steps: int, **kwargs: object) -> DistributedTrainer:
    return DistributedTrainer(
        model=ddp_driver.tiny_model(), train_data=ddp_driver.token_dataset(),
        config=CONFIG.replace(max_steps=max_steps), output_dir=output_dir, accelerator="cpu", echo=False,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def weights(trainer: DistributedTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def published_steps(url: str) -> list[int]:
    return [step for step, _ in list_published(f"{url}/checkpoints")]


def test_checkpoints_to_s3_and_resume_on_a_fresh_machine(s3_bucket: str, tmp_path: Path) -> None:
    reference = make_trainer(tmp_path / "local", max_steps=6)
    reference.fit(resume=False)
    expected = weights(reference)
    assert max_diff(expected, ddp_driver.tiny_model().state_dict()) > 1e-3  # it did train

    url = f"{s3_bucket}/run"
    cache = tmp_path / "cache"  # DEEPSEEK_CACHE (the s3_bucket fixture): staging dirs and the object cache
    first = make_trainer(url, max_steps=3)
    assert first.output_dir.is_relative_to(cache / "runs")
    r1 = first.fit()
    assert r1.steps == 3 and r1.start_step == 0 and r1.resumed_from is None
    # step 2 by the periodic checkpoint, step 3 by the final one; each complete with its manifest
    assert published_steps(url) == [2, 3]
    assert r1.lightning_checkpoint_url == f"{url}/checkpoints/step-000003"
    assert storage.remote_exists(f"{url}/checkpoints/step-000003/checkpoint.ckpt")
    assert storage.read_manifest(f"{url}/checkpoints/step-000002") is not None
    for name in ("loss_curve.png", "training_config.json", "train.log"):
        assert storage.remote_exists(f"{url}/{name}"), name
    # the Hugging Face-format export, fetched (sha256-verified) from the bucket by load_model
    assert r1.checkpoint_url == f"{url}/final"
    exported = load_model(f"{url}/final").state_dict()
    assert max_diff(exported, weights(first)) == 0.0

    # A prefix that is not a Lightning checkpoint, and one that does not exist, are refused by name.
    with pytest.raises(CheckpointError, match=r"/run/final: not a published Lightning checkpoint"):
        first.fit(resume=f"{url}/final")
    with pytest.raises(ModelNotFoundError, match=r"/run/checkpoints/step-000099"):
        first.fit(resume=f"{url}/checkpoints/step-000099")

    # Another machine: no staging directory, no object cache. Everything must come from the bucket.
    shutil.rmtree(first.output_dir)
    shutil.rmtree(cache / "objects")
    second = make_trainer(url, max_steps=6)
    r2 = second.fit(resume=True)
    assert r2.start_step == 3 and r2.steps == 6 and r2.stopped_by == "max_steps"
    assert r2.resumed_from == f"{url}/checkpoints/step-000003"
    assert published_steps(url) == [4, 6]  # keep_last=2 pruned steps 2 and 3 in the bucket
    log = (second.output_dir / "train.log").read_text()
    assert f"resumed from {url}/checkpoints/step-000003 at step 3" in log
    assert "checkpoint step 2 published" in log  # the first run's log was fetched and continued
    with storage.open_url(f"{url}/train.log") as handle:
        assert handle.read().decode() == log
    assert max_diff(weights(second), expected) < TOLERANCE
    assert max_diff(load_model(f"{url}/final").state_dict(), weights(second)) == 0.0

    # An explicit checkpoint URL (the .ckpt object inside it works too) resumes from exactly there.
    third = make_trainer(url, max_steps=6)
    r3 = third.fit(resume=f"{url}/checkpoints/step-000004/checkpoint.ckpt")
    assert r3.start_step == 4 and r3.steps == 6
    assert max_diff(weights(third), expected) < TOLERANCE


def test_unusable_output_url_fails_naming_output_dir(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(
        ValueError, match=r"output_dir='s3://no-such-bucket/run': bucket 'no-such-bucket' does not"
    ):
        make_trainer("s3://no-such-bucket/run", max_steps=2)
    with pytest.raises(ValueError, match=r"output_dir='ftp://host/run': unsupported URL scheme 'ftp'"):
        make_trainer("ftp://host/run", max_steps=2)
    trainer = make_trainer(tmp_path / "out", max_steps=2)
    with pytest.raises(ValueError, match=r"resume='s3://no-such-bucket/x': bucket 'no-such-bucket'"):
        trainer.fit(resume="s3://no-such-bucket/x")

    # gs:// without gcsfs installed: a missing package, said up front rather than at the first checkpoint.
    from fsspec.registry import _registry  # fsspec's cache of imported filesystem classes

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` now raises ImportError
    for protocol in ("gs", "gcs"):
        monkeypatch.delitem(_registry, protocol, raising=False)
    with pytest.raises(ImportError, match=r"output_dir='gs://bucket/run': .*deepseek-core\[cloud\]"):
        make_trainer("gs://bucket/run", max_steps=2)
