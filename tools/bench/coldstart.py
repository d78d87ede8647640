"""Cold-start benchmark of the CNE gateway: a model that is not loaded, first token over HTTP.

One run, one model (random weights of the ~134M preset "deepseek-134m" with a trained byte-level BPE
tokenizer, saved with save_model), three ways to get its first token:

  cold      `deepseek-cne serve` with a warm pool of 1: the model is unloaded before each request (admin
            endpoint) and the pool is full again; time from sending a streaming completion to its first
            token, over HTTP (a new connection each time)
  warm      the same with the model loaded (the floor: queueing, forwarding, one forward pass)
  naive     the serverless path without a warm pool: a fresh Python process that imports torch and the engine,
            loads the model and answers (time from spawning it to its first token; no HTTP server at all,
            so this baseline is a lower bound of that path)

Goals printed: cold p50 < 500 ms, and naive / cold p50 >= 5x.

    python tools/bench/coldstart.py                 # deepseek-134m, 10 cold starts, 3 naive runs
    python tools/bench/coldstart.py --quick         # a small model: a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_summary, print_table  # noqa: E402

TENANT_KEY = "bench-tenant-key"
ADMIN_KEY = "bench-admin-key"
PROMPT = [17, 230, 1041, 77, 900, 12, 3051, 44]  # token ids: no tokenizer work in any of the paths


# ---------------------------------------------------------------------------------------------- setup
def _python_corpus(max_bytes: int) -> list[str]:
    """Text to train the benchmark tokenizer: the standard library's own sources."""
    root = Path(os.__file__).parent
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def build_checkpoint(preset: str, directory: Path, overrides: dict[str, Any]) -> Path:
    """Random weights of `preset` plus a byte-level BPE tokenizer (ids 0/1 = BOS/EOS); reused when present."""
    import torch
    from deepseek_core import ModelConfig, Transformer, save_model
    from deepseek_core.training import train_tokenizer

    if (directory / "config.json").is_file():
        return directory
    config = ModelConfig.from_preset(preset, **overrides)
    print(f"building {preset} ({config.param_count() / 1e6:.0f}M parameters) in {directory} ...", flush=True)
    tokenizer = train_tokenizer(_python_corpus(2_000_000), vocab_size=min(config.vocab_size, 8192))
    torch.manual_seed(0)
    model = Transformer(config.replace(bos_token_id=0, eos_token_id=1))
    # ids the tokenizer lacks decode to "": the requests ask for logprobs, so every token still makes a chunk
    return save_model(model, directory, tokenizer=tokenizer)


def write_config(workdir: Path, checkpoint: Path, threads: int, kv_cache_bytes: int) -> Path:
    """cne.yaml: one shared model that never unloads on its own, one tenant, an admin key, a pool of 1."""
    path = workdir / "cne.yaml"
    path.write_text(
        json.dumps(  # JSON is YAML
            {
                "host": "127.0.0.1",
                "port": 0,
                "warm_pool": 1,
                "worker_threads": threads,
                "admin_api_keys": [hashlib.sha256(ADMIN_KEY.encode()).hexdigest()],
                "models": [
                    {
                        "name": "m",
                        "uri": str(checkpoint),
                        "idle_timeout_s": None,
                        "kv_cache_bytes": kv_cache_bytes,
                        "max_num_seqs": 8,
                    }
                ],
                "tenants": [{"name": "bench", "api_keys": [hashlib.sha256(TENANT_KEY.encode()).hexdigest()]}],
            },
            indent=1,
        )
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """`deepseek-cne serve` in its own process group."""

    def __init__(self, config: Path, log: Path) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "deepseek-cne"
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "deepseek_cne.cli"]
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*launcher, "serve", "--config", str(config), "--port", str(self.port), "--log-level", "warning"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.admin = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )

    def status(self) -> dict[str, Any]:
        response = self.admin.get("/admin/status")
        response.raise_for_status()
        return dict(response.json())

    def wait_pool_full(self, timeout: float = 600) -> None:
        """Until the warm pool holds its idle worker and nothing else is starting."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            try:
                pool = self.status()["pool"]
                if len(pool["idle"]) >= pool["size"] and pool["starting"] == 0:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the warm pool did not fill")

    def unload(self, model: str) -> None:
        deadline = time.monotonic() + 60
        while self.status()["models"][model]["state"] != "unloaded":
            self.admin.post(f"/admin/models/{model}/unload").raise_for_status()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} did not unload")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.admin.close()
        self._log.close()


def time_to_first_token(url: str) -> float:
    """Seconds from sending a streaming completion (new connection) to its first token chunk."""
    import httpx

    body = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 0, "stream": True}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TENANT_KEY}"}, timeout=600) as client:
        start = time.perf_counter()
        with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
            first = None
            for line in response.iter_lines():
                if first is None and line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        first = time.perf_counter() - start
            if first is None:
                raise RuntimeError("the stream carried no token")
            return first


NAIVE = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from deepseek_core.engine import LLM, SamplingParams
llm = LLM(sys.argv[1], kv_cache_bytes=int(sys.argv[3]))
out = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))
print("FIRST", out[0].token_ids[0], flush=True)
""".replace("PROMPT", repr(PROMPT))


def naive_first_token(checkpoint: Path, threads: int, kv_cache_bytes: int) -> tuple[float, float]:
    """(seconds from spawning a fresh process to its first token, seconds of `import torch` alone)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", NAIVE, str(checkpoint), str(threads), str(kv_cache_bytes)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.wait(timeout=120)
    if not line.startswith("FIRST"):
        raise RuntimeError(f"the naive process failed (status {proc.returncode})")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=env)
    return elapsed, time.perf_counter() - start


def quantiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p90 (inclusive method)."""
    if len(samples) == 1:
        return samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), cuts[8]


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="deepseek-134m")
    parser.add_argument("--runs", type=int, default=10, help="cold starts (default 10)")
    parser.add_argument("--warm-runs", type=int, default=10)
    parser.add_argument("--naive-runs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads"
    )
    parser.add_argument("--kv-cache-mib", type=int, default=32)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deepseek-bench-coldstart"
    )
    parser.add_argument("--quick", action="store_true", help="a small model and 3 runs: a smoke run")
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    if args.quick:
        args.preset, args.runs, args.warm_runs, args.naive_runs = "deepseek-tiny", 3, 3, 1
        overrides = {"vocab_size": 8192}
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.preset, args.workdir / args.preset, overrides)
    weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    kv_bytes = args.kv_cache_mib * 1024**2
    config = write_config(args.workdir, checkpoint, args.threads, kv_bytes)
    print(
        f"machine: {machine_summary()}, {os.cpu_count()} CPUs; model {args.preset}, {weights / 1e6:.0f} MB of weights"
    )

    gateway = Gateway(config, args.workdir / "gateway.log")
    cold: list[float] = []
    loads: list[dict[str, Any]] = []
    warm: list[float] = []
    try:
        gateway.wait_pool_full()
        for i in range(args.runs):
            gateway.unload("m")
            gateway.wait_pool_full()
            time.sleep(0.5)  # let the refilled worker settle
            cold.append(time_to_first_token(gateway.url))
            loads.append(gateway.status()["models"]["m"]["last_load"])
            print(f"  cold start {i + 1}/{args.runs}: {cold[-1] * 1000:.0f} ms  {loads[-1]}", flush=True)
        gateway.wait_pool_full()
        for _ in range(args.warm_runs):
            warm.append(time_to_first_token(gateway.url))
    finally:
        gateway.stop()

    naive, torch_import = [], []
    for i in range(args.naive_runs):
        total, imp = naive_first_token(checkpoint, args.threads, kv_bytes)
        naive.append(total)
        torch_import.append(imp)
        print(
            f"  naive {i + 1}/{args.naive_runs}: {total * 1000:.0f} ms (import torch alone {imp * 1000:.0f} ms)"
        )

    cold50, cold90 = quantiles(cold)
    warm50, warm90 = quantiles(warm)
    naive50, naive90 = quantiles(naive)
    rows = [
        {"path": "cold (gateway, warm pool)", "runs": len(cold), "p50 ms": f"{cold50 * 1000:.0f}",
         "p90 ms": f"{cold90 * 1000:.0f}", "naive p50 / p50": f"{naive50 / cold50:.1f}x"},
        {"path": "warm (model loaded)", "runs": len(warm), "p50 ms": f"{warm50 * 1000:.0f}",
         "p90 ms": f"{warm90 * 1000:.0f}", "naive p50 / p50": f"{naive50 / warm50:.1f}x"},
        {"path": "naive (fresh process)", "runs": len(naive), "p50 ms": f"{naive50 * 1000:.0f}",
         "p90 ms": f"{naive90 * 1000:.0f}", "naive p50 / p50": "1.0x"},
    ]  # fmt: skip
    print()
    print_table(rows)
    keys = ("fetch_s", "wait_worker_s", "engine_s", "app_s", "worker_load_s", "total_s")
    breakdown = {k: statistics.median(float(x.get(k, 0.0)) for x in loads) for k in keys}
    print("cold load breakdown (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items()))
    print(f"import torch alone (fresh process, median): {statistics.median(torch_import) * 1000:.0f} ms")
    print(f"goal: cold p50 < 500 ms: {'PASS' if cold50 < 0.5 else 'FAIL'} ({cold50 * 1000:.0f} ms)")
    print(
        f"goal: naive / cold p50 >= 5x: {'PASS' if naive50 / cold50 >= 5 else 'FAIL'} ({naive50 / cold50:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
