"""DistributedTrainer: data sharding, equivalence across layouts, and a lost rank (CPU, gloo, loopback).

The multi-process tests run tests/ee/ddp_driver.py: as 1 node x 2 processes (Lightning's own launcher
starts the second) and as 2 "nodes" x 1 process (two copies with NODE_RANK=0/1 on 127.0.0.1). Each rank
saves its final weights; they must agree with each other and with one process training on the same
global batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ddp_driver  # tests/ee is on sys.path (pytest's rootdir-relative import of this file)
import pytest
import torch
from deepseek_core.training import (
    BatchOrder,
    TrainingConfig,
    build_adamw,
    lm_loss,
    warmup_cosine_scheduler,
)
from deepseek_ee.trainer.data import EvalBatches, RankBatches, fetch_batch
from deepseek_ee.trainer.watchdog import PeerWatchdog

DRIVER = Path(ddp_driver.__file__)
MAX_STEPS = 6
GLOBAL_BATCH = 8
TOLERANCE = 1e-5
PROCESS_TIMEOUT_S = 420  # start-up (imports) dominates; generous for a loaded 2-core CI machine


# ---------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def driver_env(**extra: str) -> dict[str, str]:
    """The test's environment without any distributed variables pytest may run under, one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in {
        "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "PL_GLOBAL_SEED", "MLFLOW_TRACKING_URI",
    }}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def start_driver(out: Path, *args: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """One copy of the driver in its own process group (so the test can end it and its children)."""
    handle = open(log, "wb")  # noqa: SIM115 - closed by the OS when the child exits; kept for the test to read
    return subprocess.Popen(
        [sys.executable, str(DRIVER), "--out", str(out), *args],
        env=driver_env(**env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group of `proc` (the driver and anything it started) if still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_ok(proc: subprocess.Popen[bytes], log: Path) -> None:
    try:
        code = proc.wait(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        pytest.fail(
            f"driver did not finish in {PROCESS_TIMEOUT_S}s:\n{log.read_text(errors='replace')[-4000:]}"
        )
    assert code == 0, f"driver exited {code}:\n{log.read_text(errors='replace')[-4000:]}"


def run_two_nodes(out: Path, *args: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start 2 "nodes" of one process each on loopback; returns (process, log) per node rank."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        log = out / f"node{node}.log"
        common = ("--num-nodes", "2", "--gpus-per-node", "1", "--batch-size", str(GLOBAL_BATCH // 2))
        procs.append((start_driver(out, *common, *args, log=log, NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                                   MASTER_PORT=port), log))  # fmt: skip
    return procs


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["weights"]


def load_eval_loss(path: Path) -> float | None:
    return torch.load(path, weights_only=True)["eval_loss"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def driver_args(max_steps: int = MAX_STEPS, eval_every: int = 3) -> list[str]:
    """Steps, plus evaluation on 10 held-out sequences (uneven over 2 ranks) every `eval_every` steps and at
    the end (inside fit when the last step is an eval step, else by a validate() run after fit)."""
    return ["--max-steps", str(max_steps), "--eval", "--eval-every", str(eval_every)]


# ---------------------------------------------------------------------------------------------- reference
def plain_loop_weights(config: TrainingConfig) -> dict[str, torch.Tensor]:
    """One process, written with core's primitives only (the CE Trainer's loop): AdamW groups, schedule,
    seeded BatchOrder, lm_loss, clipping."""
    model = ddp_driver.tiny_model()
    data = ddp_driver.token_dataset()
    optimizer = build_adamw(
        model,
        config.learning_rate,
        config.weight_decay,
        (config.adam_beta1, config.adam_beta2),
        config.adam_eps,
    )
    scheduler = warmup_cosine_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    order = BatchOrder(len(data), config.batch_size, seed=config.seed)
    for _ in range(config.max_steps):
        for _ in range(config.grad_accum_steps):
            input_ids, labels = fetch_batch(data, order.next_batch())
            (lm_loss(model(input_ids), labels) / config.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def driver_config(batch_size: int, max_steps: int = MAX_STEPS) -> TrainingConfig:
    args = ddp_driver.build_parser().parse_args(
        ["--out", "-", "--batch-size", str(batch_size), "--max-steps", str(max_steps)]
    )
    return ddp_driver.training_config(args)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process (in this pytest process) training on the whole global batch; its output directory."""
    out = tmp_path_factory.mktemp("single")
    assert ddp_driver.main(["--out", str(out), "--batch-size", str(GLOBAL_BATCH), *driver_args()]) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> dict[str, torch.Tensor]:
    """Weights of the single-process run."""
    return load_weights(reference_run / "weights-rank0.pt")


# ---------------------------------------------------------------------------------------------- unit tests
def test_ranks_read_disjoint_slices_of_the_single_process_order() -> None:
    data = ddp_driver.token_dataset()
    single = RankBatches(data, 8, rank=0, world_size=1, seed=3).indices(0)
    halves = [RankBatches(data, 4, rank=r, world_size=2, seed=3).indices(0) for r in (0, 1)]
    for _ in range(20):  # more than one epoch of 64 sequences
        whole = next(single)
        parts = [next(h) for h in halves]
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        assert torch.equal(torch.cat(parts), whole)
    # resuming at a position continues the same stream
    resumed = RankBatches(data, 4, rank=1, world_size=2, seed=3).indices(5 * 8)
    again = RankBatches(data, 4, rank=1, world_size=2, seed=3).indices(0)
    for _ in range(5):
        next(again)
    assert torch.equal(next(resumed), next(again))
    batch = next(iter(RankBatches(data, 4, rank=0, world_size=2, seed=3)))
    assert batch["input_ids"].shape == (4, ddp_driver.SEQ_LEN) and torch.equal(
        batch["input_ids"][:, 1:], batch["labels"][:, :-1]
    )


def test_eval_batches_cover_every_sequence_once() -> None:
    data = ddp_driver.token_dataset(num_sequences=11)
    seen: list[list[int]] = []
    counts = set()
    for rank in range(3):
        loader = EvalBatches(data, batch_size=2, rank=rank, world_size=3)
        counts.add(len(loader))
        for batch in loader:
            for row, weight in zip(batch["input_ids"], batch["weight"], strict=True):
                if weight:
                    seen.append(row.tolist())
    assert counts == {2}  # same number of batches on every rank
    assert sorted(seen) == sorted(data[i]["input_ids"].tolist() for i in range(11))


def test_single_process_matches_core_primitives_loop(
    reference: dict[str, torch.Tensor], reference_run: Path
) -> None:
    """The Lightning module trains exactly as a loop over core's primitives (= the CE Trainer's loop)."""
    plain = plain_loop_weights(driver_config(GLOBAL_BATCH))
    untrained = ddp_driver.tiny_model().state_dict()
    assert max_diff(reference, untrained) > 1e-3  # it did train
    assert max_diff(reference, plain) < 1e-6
    # evaluated at step 3 (eval_every) and after the last step, on all 10 held-out sequences
    log = (reference_run / "train.log").read_text()
    assert "eval step 3 |" in log and f"eval step {MAX_STEPS} |" in log
    model = ddp_driver.tiny_model()
    model.load_state_dict(plain)
    held_out = ddp_driver.token_dataset(num_sequences=10, seed=9)
    input_ids, labels = fetch_batch(held_out, torch.arange(10))
    with torch.no_grad():
        expected = float(lm_loss(model(input_ids), labels))
    assert abs(load_eval_loss(reference_run / "weights-rank0.pt") - expected) < 1e-5


def test_invalid_arguments_name_the_parameter() -> None:
    from deepseek_ee import DistributedTrainer

    model, data = ddp_driver.tiny_model(), ddp_driver.token_dataset()
    with pytest.raises(ValueError, match="backend"):
        DistributedTrainer(model, data, accelerator="cpu", backend="nccl")
    with pytest.raises(ValueError, match="strategy"):
        DistributedTrainer(model, data, strategy="zero3")
    with pytest.raises(ValueError, match="strategy: 'fsdp' needs GPUs"):
        DistributedTrainer(model, data, strategy="fsdp", accelerator="cpu")
    with pytest.raises(ValueError, match="gpus_per_node"):
        DistributedTrainer(model, data, gpus_per_node=0)
    with pytest.raises(ValueError, match="precision"):
        DistributedTrainer(model, data, precision="fp8")
    with pytest.raises(Exception, match="train_data"):
        DistributedTrainer(model, "/nonexistent/corpus.txt")


def test_fsdp_export_writes_the_gathered_full_state_dict(tmp_path: Path) -> None:
    """FSDP gathers a full state dict on rank 0 ("transformer."-prefixed); it is exported without a model copy."""
    from deepseek_core import load_model
    from deepseek_ee import DistributedTrainer

    source = ddp_driver.tiny_model(seed=5)
    trainer = DistributedTrainer(ddp_driver.tiny_model(), ddp_driver.token_dataset(), output_dir=tmp_path)
    gathered = {f"transformer.{k}": v.clone() for k, v in source.state_dict().items()}
    exported = trainer._export(gathered)
    loaded = load_model(exported, dtype=torch.float32, device="cpu").state_dict()
    assert max_diff(loaded, source.state_dict()) == 0.0


def test_watchdog_names_a_rank_whose_heartbeat_stopped() -> None:
    from datetime import timedelta

    port = free_port()
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    reported: list[str] = []
    dogs = [
        PeerWatchdog(
            r, 3, "127.0.0.1", port, interval_s=0.2, timeout_s=1.5, namespace="t", on_lost=reported.append
        ).start()
        for r in range(3)
    ]
    try:
        time.sleep(0.6)
        dogs[2].stop(finished=True)  # a rank that finished on purpose is never reported
        time.sleep(2.0)
        assert reported == []
        assert dogs[0].find_lost(grace_s=0.6)[0] == []
        dogs[1].stop(finished=False)  # rank 1 "dies": its heartbeat stops without a goodbye
        lost, detail = dogs[0].find_lost(grace_s=0.6)
        assert lost == [1] and "heartbeat" in detail
        deadline = time.monotonic() + 10
        while not reported and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reported and "rank 0 of 3: lost rank 1" in reported[0]
    finally:
        for dog in dogs:
            dog.stop()
        del store


def test_watchdog_names_rank_0_when_the_rendezvous_store_goes_away() -> None:
    """Rank 0 hosts the store: when it dies, the others see the store stop answering and name rank 0."""
    import gc
    from datetime import timedelta

    port = free_port()
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    reported: list[str] = []
    dog = PeerWatchdog(
        1, 2, "127.0.0.1", port, interval_s=0.2, timeout_s=1.5, namespace="t", on_lost=reported.append
    )
    dog.start()
    try:
        time.sleep(0.5)
        del store  # the master's server stops with it, as when rank 0's process dies
        gc.collect()
        lost, detail = dog.find_lost(grace_s=0.4)
        assert lost == [0] and "hosted by rank 0" in detail
        deadline = time.monotonic() + 15
        while not reported and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reported and "rank 1 of 2: lost rank 0" in reported[0]
    finally:
        dog.stop()


# ---------------------------------------------------------------------------------------------- multi-process
@pytest.mark.integration
def test_one_node_two_processes_matches_single_process(
    tmp_path: Path, reference: dict[str, torch.Tensor], reference_run: Path
) -> None:
    """devices=2 on CPU: Lightning's launcher starts rank 1; both ranks end with the single-process weights."""
    log = tmp_path / "driver.log"
    proc = start_driver(
        tmp_path, "--gpus-per-node", "2", "--batch-size", str(GLOBAL_BATCH // 2), *driver_args(), log=log
    )
    try:
        wait_ok(proc, log)
    finally:
        stop_group(proc)
    ranks = [load_weights(tmp_path / f"weights-rank{r}.pt") for r in (0, 1)]
    assert max_diff(ranks[0], ranks[1]) == 0.0  # DDP keeps replicas identical
    assert max_diff(ranks[0], reference) < TOLERANCE
    # eval: each rank a disjoint share (5 + 5 of 10, padded batches), summed over ranks = one process's loss
    assert (
        abs(
            load_eval_loss(tmp_path / "weights-rank0.pt") - load_eval_loss(reference_run / "weights-rank0.pt")
        )
        < TOLERANCE
    )
    assert (tmp_path / "final" / "model.safetensors").is_file()  # rank 0 exported the HF checkpoint
    assert "2 process(es) (1 node(s) x 2 cpu)" in (tmp_path / "train.log").read_text()


@pytest.mark.integration
def test_two_nodes_one_process_each_matches_single_process(
    tmp_path: Path, reference: dict[str, torch.Tensor], reference_run: Path
) -> None:
    """num_nodes=2 x gpus_per_node=1: two processes rendezvous over MASTER_ADDR/MASTER_PORT/NODE_RANK."""
    procs = run_two_nodes(tmp_path, *driver_args(eval_every=4))  # the final eval runs after fit, distributed
    try:
        for proc, log in procs:
            wait_ok(proc, log)
    finally:
        for proc, _ in procs:
            stop_group(proc)
    ranks = [load_weights(tmp_path / f"weights-rank{r}.pt") for r in (0, 1)]
    assert max_diff(ranks[0], ranks[1]) == 0.0
    assert max_diff(ranks[0], reference) < TOLERANCE
    log = (tmp_path / "train.log").read_text()
    assert "eval step 4 |" in log and f"eval step {MAX_STEPS} |" in log
    final_eval = load_eval_loss(reference_run / "weights-rank0.pt")
    for r in (0, 1):  # every rank got the reduced result
        assert abs(load_eval_loss(tmp_path / f"weights-rank{r}.pt") - final_eval) < TOLERANCE


@pytest.mark.integration
def test_killed_rank_fails_the_job_by_name_and_resume_completes(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """SIGKILL of rank 1 (the process Lightning's launcher started) mid-run: rank 0 exits non-zero within a
    bounded time naming rank 1; a rerun (here as 2 nodes x 1: same world size) resumes from last.ckpt and
    reaches the weights of an uninterrupted run."""
    import psutil

    slow = ("--save-every", "2", "--step-delay", "0.4", "--peer-timeout", "10", "--collective-timeout", "60")
    log0 = tmp_path / "first.log"
    rank0 = start_driver(
        tmp_path,
        "--gpus-per-node",
        "2",
        "--batch-size",
        str(GLOBAL_BATCH // 2),
        *driver_args(),
        *slow,
        log=log0,
    )
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        progress = tmp_path / "progress-rank1.txt"
        while time.monotonic() < deadline:
            reached = progress.read_text().strip() if progress.exists() else ""
            if reached and int(reached) >= 3 and (tmp_path / "checkpoints" / "last.ckpt").exists():
                break
            assert rank0.poll() is None, log0.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail("training did not reach step 3 in time")
        (rank1,) = psutil.Process(rank0.pid).children()
        rank1.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = rank0.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 hung after rank 1 was killed")
        took = time.monotonic() - killed_at
    finally:
        stop_group(rank0)
    output = log0.read_text(errors="replace")
    assert code != 0
    assert took < 60
    assert f"lost rank 1 (pid {rank1.pid}, killed by SIGKILL)" in output, output[
        -3000:
    ]  # the launcher's report
    assert "rank 0 of 2: lost rank 1" in output, output[-3000:]  # rank 0's own diagnosis (heartbeats)
    assert "resume from" in output and "last.ckpt" in output
    assert not (tmp_path / "weights-rank0.pt").exists()

    # The rerun resumes (not from step 0) and completes.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    resumed_from = int(ckpt["global_step"])
    assert 2 <= resumed_from < MAX_STEPS
    procs = run_two_nodes(tmp_path, *driver_args(), "--save-every", "2")
    try:
        for proc, log in procs:
            wait_ok(proc, log)
    finally:
        for proc, _ in procs:
            stop_group(proc)
    train_log = (tmp_path / "train.log").read_text()
    assert f"steps {resumed_from}->{MAX_STEPS}" in train_log
    final = [load_weights(tmp_path / f"weights-rank{r}.pt") for r in (0, 1)]
    assert max_diff(final[0], final[1]) == 0.0
    assert max_diff(final[0], reference) < TOLERANCE  # exact resume: same as never interrupted
    assert math.isfinite(float(next(iter(final[0].values())).sum()))
