"""The pipeline's accuracy gate: does a candidate (e.g. INT8) checkpoint lose too much against its baseline?

Both models score the same held-out text (mean next-token cross-entropy over the same token windows); the
candidate passes when its loss exceeds the baseline's by at most `max_loss_increase` (relative: 0.02 = 2 %).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from deepseek_core import Tokenizer, load_model
from deepseek_core.fileio import atomic_write_text
from deepseek_core.storage import is_remote, open_url


@dataclass(frozen=True)
class GateReport:
    """The numbers behind a gate decision (written as the pipeline's accuracy report)."""

    baseline: str
    candidate: str
    baseline_loss: float
    candidate_loss: float
    relative_increase: float
    max_loss_increase: float
    tokens: int
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def read_text(uri: str) -> str:
    """Held-out text from a local path or s3:// / gs:// URL: .jsonl takes each line's "text", else the whole file."""
    if not is_remote(uri) and not Path(uri).is_file():
        raise FileNotFoundError(f"--data: {uri} does not exist")
    with open_url(uri, "rb") as handle:
        raw = handle.read().decode("utf-8")
    if not uri.endswith(".jsonl"):
        return str(raw)
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{uri}:{number}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def token_windows(token_ids: list[int], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets): [num_windows, seq_len + 1]."""
    usable = min(len(token_ids), max_tokens + 1)
    count = (usable - 1) // seq_len
    if count < 1:
        raise ValueError(f"--data: {len(token_ids)} tokens is too few for one window of --seq-len {seq_len}")
    ids = torch.tensor(token_ids[: count * seq_len + 1], dtype=torch.long)
    return torch.stack([ids[i * seq_len : (i + 1) * seq_len + 1] for i in range(count)])


@torch.inference_mode()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per token) of `model` over `windows`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch[:, :-1]).float()  # [B, S, V]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / count


def evaluate_gate(
    baseline: str,
    candidate: str,
    data: str,
    max_loss_increase: float = 0.02,
    tokenizer: str | None = None,
    seq_len: int = 512,
    max_tokens: int = 32768,
    dtype: str | None = None,
    device: str | None = None,
) -> GateReport:
    """Score both checkpoints (local dirs or s3:// / gs:// URLs) on `data` and decide the gate."""
    if not max_loss_increase >= 0:
        raise ValueError(f"--max-loss-increase: must be >= 0, got {max_loss_increase}")
    if seq_len < 1 or max_tokens < seq_len:
        raise ValueError(f"--seq-len ({seq_len}) must be >= 1 and <= --max-tokens ({max_tokens})")
    tok = Tokenizer.from_pretrained(tokenizer or baseline)
    windows = token_windows(tok.encode(read_text(data)), seq_len, max_tokens)
    losses = []
    for uri in (baseline, candidate):
        model = load_model(uri, dtype=dtype, device=device)
        if windows.shape[1] - 1 > model.config.max_position_embeddings:
            raise ValueError(f"--seq-len {seq_len} exceeds {uri}'s max_position_embeddings")
        if int(windows.max()) >= model.config.vocab_size:
            raise ValueError(f"{uri}: the tokenizer produces ids beyond the model's vocab_size")
        losses.append(mean_loss(model, windows))
        del model
    base, cand = losses
    if not (math.isfinite(base) and math.isfinite(cand)):
        raise ValueError(f"loss is not finite (baseline {base}, candidate {cand})")
    increase = (cand - base) / base if base > 0 else (0.0 if cand <= base else math.inf)
    return GateReport(
        baseline=baseline,
        candidate=candidate,
        baseline_loss=base,
        candidate_loss=cand,
        relative_increase=increase,
        max_loss_increase=max_loss_increase,
        tokens=int(windows[:, 1:].numel()),
        passed=increase <= max_loss_increase,
    )


def write_outputs(report: GateReport, report_path: str | None, passed_path: str | None) -> None:
    """Write the report JSON and the 'true'/'false' gate value (the Kubeflow step's outputs)."""
    if report_path:
        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2) + "\n")
    if passed_path:
        os.makedirs(os.path.dirname(os.path.abspath(passed_path)), exist_ok=True)
        atomic_write_text(passed_path, "true" if report.passed else "false")
