"""MLflow experiment tracking for the DistributedTrainer (only global rank 0 talks to MLflow).

What a run records:

- params: the training config (``training.*``), the model's shape and size (``model.*``), the layout
  (``world_size``, ``num_nodes``, ``devices_per_node``, ``strategy``, ``backend``, ``precision``,
  ``global_batch_size``, ``tokens_per_step``);
- metrics per optimizer step: ``train_loss``, ``learning_rate``, ``tokens_per_s``, ``grad_norm``, ``tokens``;
  ``eval_loss`` / ``eval_perplexity`` where evaluated;
- artifacts: the final Hugging Face-format checkpoint (``model/``), the configs (``config/``) and the
  loss-curve PNG; and a version of a registered model pointing at ``model/``.

Where: ``tracking_uri`` when set, else ``$MLFLOW_TRACKING_URI``, else an embedded sqlite store
``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``.

Tracking never stops training: once the run is open, a failing store or server is reported once on
stderr and the rest of the run is not tracked. Against a server, MLflow's HTTP retries default here to
3 attempts with a short backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT override it),
instead of MLflow's several minutes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from .config import TrackingConfig

__all__ = ["MLflowCallback", "MLflowTracker", "default_tracking_uri", "resolve_tracking_uri"]

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
RUN_FILE = "mlflow_run.json"  # in output_dir: lets a resumed job continue the same MLflow run
_MAX_BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call
_MAX_PARAMS = 100  # ... and 100 params
_MAX_PARAM_CHARS = 6000


def default_tracking_uri() -> str:
    """The embedded default: a sqlite database in the working directory."""
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).as_posix()}"


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else default_tracking_uri()."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _local_sqlite_dir(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).expanduser().resolve().parent


def _best_effort(method: Callable[..., Any]) -> Callable[..., Any]:
    """After the run is open, an MLflow failure disables tracking (with one warning) instead of raising."""

    @functools.wraps(method)
    def wrapper(self: MLflowTracker, *args: Any, **kwargs: Any) -> Any:
        if self.broken is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.broken = exc
            print(
                f"deepseek-ee: warning: MLflow {method.__name__} failed at {self.tracking_uri} "
                f"({type(exc).__name__}: {str(exc)[:300]}); the rest of this run is not tracked",
                file=sys.stderr,
                flush=True,
            )
            return None

    return wrapper


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        out[prefix] = text[:_MAX_PARAM_CHARS]


class MLflowTracker:
    """One MLflow run through MlflowClient (no fluent global state, so several trainers may coexist)."""

    def __init__(self, settings: TrackingConfig, output_dir: str | os.PathLike[str] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.settings = settings
        self.tracking_uri = resolve_tracking_uri(settings.tracking_uri)
        if self.tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        self.broken: Exception | None = None  # set by the first failure after start()
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._pending: list[Any] = []

    # ------------------------------------------------------------------ run lifecycle
    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.settings.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = getattr(self.settings, "artifact_location", None)
        if location is None and (db_dir := _local_sqlite_dir(self.tracking_uri)) is not None:
            location = (db_dir / DEFAULT_ARTIFACTS).as_uri()
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except MlflowException:  # created meanwhile by another job
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def start(self, params: dict[str, Any], tags: dict[str, str] | None = None, resume: bool = True) -> str:
        """Create the run (or reopen the one this output_dir's previous, interrupted job used) and log params."""
        self.experiment_id = self._experiment()
        previous = self._previous_run() if resume else None
        if previous is not None:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.settings.run_name, tags=tags or {})
            self.run_id = run.info.run_id
            self._log_params(params)
            if self.output_dir is not None:
                from deepseek_core.fileio import atomic_write_text

                record = {
                    "run_id": self.run_id,
                    "tracking_uri": self.tracking_uri,
                    "experiment_id": self.experiment_id,
                }
                atomic_write_text(self.output_dir / RUN_FILE, json.dumps(record) + "\n")
        return self.run_id

    def _previous_run(self) -> str | None:
        if self.output_dir is None:
            return None
        try:
            record = json.loads((self.output_dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if record.get("tracking_uri") != self.tracking_uri or not record.get("run_id"):
            return None
        try:
            run = self.client.get_run(record["run_id"])
        except Exception:  # deleted, or another store
            return None
        if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED":
            return None
        return str(run.info.run_id)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flatten("", params, flat)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self._need_run(), params=items[i : i + _MAX_PARAMS])

    def _need_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MLflowTracker: start() was not called")
        return self.run_id

    @_best_effort
    def end(self, status: str = "FINISHED") -> None:
        """Flush metrics and close the run with `status` (FINISHED, FAILED or KILLED)."""
        if self.run_id is None:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------ metrics
    @_best_effort
    def log_metrics(self, metrics: dict[str, float | None], step: int, flush: bool = False) -> None:
        """Queue finite metrics of `step`; they are sent in batches (flush() or every 1000)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                self._pending.append(Metric(key, float(value), now, step))
        if flush or len(self._pending) >= _MAX_BATCH:
            self.flush()

    @_best_effort
    def flush(self) -> None:
        """Send queued metrics."""
        while self._pending:
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            self.client.log_batch(self._need_run(), metrics=batch)

    # ------------------------------------------------------------------ artifacts and registry
    @_best_effort
    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file (or, for a directory, its contents) under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._need_run(), str(path), artifact_path)
        else:
            self.client.log_artifact(self._need_run(), str(path), artifact_path)

    @_best_effort
    def register_model(self, name: str, artifact_path: str = "model", description: str | None = None) -> Any:
        """Register (creating the registered model if needed) a new version pointing at this run's `artifact_path`."""
        from mlflow.exceptions import MlflowException

        run_id = self._need_run()
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        return self.client.create_model_version(name, source, run_id=run_id, description=description)


class MLflowCallback(pl.Callback):
    """Streams the CausalLMModule's per-step metrics (and eval results) to an MLflowTracker, on rank 0 only."""

    def __init__(self, tracker: MLflowTracker | None, log_every: int = 10) -> None:
        self.tracker = tracker
        self.log_every = max(1, log_every)
        self._sent = 0
        self._sent_eval = 0

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.tracker is not None and self.tracker.run_id is not None and trainer.is_global_zero

    def _drain(self, pl_module: Any) -> int:
        assert self.tracker is not None
        last_step = -1
        for m in pl_module.step_metrics[self._sent :]:
            self.tracker.log_metrics(
                {"train_loss": m.loss, "learning_rate": m.learning_rate, "tokens_per_s": m.tokens_per_s,
                 "grad_norm": m.grad_norm, "tokens": float(m.tokens)},
                step=m.step,
            )  # fmt: skip
            last_step = m.step
        self._sent = len(pl_module.step_metrics)
        for step, loss in pl_module.eval_history[self._sent_eval :]:
            self.tracker.log_metrics(
                {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}, step=step
            )
        self._sent_eval = len(pl_module.eval_history)
        return last_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Queue new step metrics; send them every log_every steps."""
        if not self._active(trainer):
            return
        step = self._drain(pl_module)
        if step >= 0 and step % self.log_every == 0:
            self.tracker.flush()  # type: ignore[union-attr]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Send eval results."""
        if self._active(trainer):
            self._drain(pl_module)
            self.tracker.flush()  # type: ignore[union-attr]

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """Send what is left."""
        if self._active(trainer):
            self._drain(pl_module)
            self.tracker.flush()  # type: ignore[union-attr]

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        """Keep what was measured; the trainer marks the run FAILED."""
        if self._active(trainer):
            try:
                self._drain(pl_module)
                self.tracker.flush()  # type: ignore[union-attr]
            except Exception:  # the tracking server may be the thing that failed
                pass


def log_files(tracker: MLflowTracker, files: Iterable[tuple[Path | None, str | None]]) -> None:
    """Upload each existing (path, artifact_path)."""
    for path, artifact_path in files:
        if path is not None and Path(path).exists():
            tracker.log_artifact(path, artifact_path)
