"""Serving benchmark: the engine over HTTP against the engine in-process and a hand-written FastAPI server.

One run, one workload (the engine benchmark's mixed workload: 64 requests, prompts 16-512 tokens, outputs
16-256 tokens, seeded; random weights of the ~134M preset "deepseek-134m"), three ways:

  in-process   AsyncLLM (the engine the server wraps) in a worker process, all requests at once, no HTTP: the
               ceiling (`--with-llm-generate` also times the offline LLM.generate)
  http         `deepseek-core serve` in a subprocess, all requests at once from the openai async client,
               streaming (TTFT = first text chunk)
  hand-written a plain FastAPI app that calls transformers' generate per request, one at a time under a lock
               (as such servers usually do), streaming through a token streamer

Goals printed as ratios: http / in-process throughput >= 0.90; http / hand-written throughput >= 3x at an
equal or lower p99 latency. Every request sets ignore_eos (min_new_tokens for transformers), so all three
generate exactly the same number of tokens.

    python tools/bench/serve.py            # deepseek-134m, 64 requests
    python tools/bench/serve.py --quick    # a small model and workload: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: the baseline's route annotations resolve against these globals

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_summary, print_table  # noqa: E402

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]


# ---------------------------------------------------------------------------------------------- setup
def mixed_workload(
    num: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int = 0
) -> list[tuple[list[int], int, int]]:
    """(prompt token ids, output tokens, seed) per request; ids avoid the special tokens 0 and 1."""
    rng = random.Random(seed)
    work = []
    for i in range(num):
        plen = rng.randint(*prompt_range)
        work.append(
            ([rng.randrange(2, vocab) for _ in range(plen)], rng.randint(*output_range), seed * 1000 + i)
        )
    return work


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


def build_checkpoint(preset: str, directory: Path) -> Path:
    """Random weights of `preset` plus a byte-level BPE tokenizer with the preset's vocabulary size."""
    import torch
    from deepseek_core import ModelConfig, Tokenizer, Transformer, save_model
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if (directory / "config.json").is_file():
        return directory
    config = ModelConfig.from_preset(preset)
    print(
        f"building {preset}: {config.param_count() / 1e6:.0f}M parameters, training a "
        f"{config.vocab_size}-token tokenizer ...",
        flush=True,
    )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(_python_corpus(24_000_000 if config.vocab_size > 8000 else 4_000_000), trainer)
    tokenizer = Tokenizer(hf, {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "add_bos_token": True})
    if tokenizer.vocab_size < config.vocab_size:  # a small corpus: the model keeps its size, ids decode as ""
        print(f"  tokenizer reached {tokenizer.vocab_size} tokens", flush=True)
    torch.manual_seed(0)
    model = Transformer(config.replace(bos_token_id=0, eos_token_id=1))
    return save_model(model, directory, tokenizer=tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- runs
class InProcess:
    """The engine without HTTP: LLM.generate (offline) or AsyncLLM (what the server wraps).

    Each run happens in a fresh worker process (`--in-process-worker`), like the servers, so no two engines
    share a process (and its thread pools) with each other or with the benchmark's client.
    """

    def __init__(self, model_dir: Path, max_num_seqs: int, device: str | None, kind: str) -> None:
        from deepseek_core.engine import LLM, AsyncLLM

        if kind == "llm":
            self.llm = LLM(str(model_dir), max_num_seqs=max_num_seqs, device=device)
        else:
            self.async_llm = AsyncLLM(str(model_dir), max_num_seqs=max_num_seqs, device=device)

    @staticmethod
    def _params(work: list) -> list:
        from deepseek_core.engine import SamplingParams

        return [
            SamplingParams(max_tokens=out, temperature=1.0, seed=seed, ignore_eos=True)
            for _, out, seed in work
        ]

    def run_llm(self, work: list) -> dict[str, Any]:
        from deepseek_core.engine import SamplingParams

        self.llm.generate([w[0] for w in work[:2]], SamplingParams(max_tokens=4, ignore_eos=True))
        start = time.perf_counter()
        outs = self.llm.generate([w[0] for w in work], self._params(work))
        wall = time.perf_counter() - start
        return {"wall": wall, "tokens": sum(len(o.token_ids) for o in outs), "ttft": [], "e2e": []}

    def run_async(self, work: list) -> dict[str, Any]:
        """All requests submitted at once to AsyncLLM, as the server does; TTFT = first token."""

        async def one(prompt: list[int], params: Any) -> tuple[float, float, int]:
            start = time.perf_counter()
            first, tokens = None, 0
            async for out in self.async_llm.generate(prompt, params):
                if first is None and out.token_ids_delta:
                    first = time.perf_counter()
                tokens = len(out.token_ids)
            end = time.perf_counter()
            return (first or end) - start, end - start, tokens

        async def main() -> dict[str, Any]:
            await one(work[0][0][:16], self._params(work[:1])[0])  # warm-up
            start = time.perf_counter()
            results = await asyncio.gather(*(one(w[0], p) for w, p in zip(work, self._params(work))))
            wall = time.perf_counter() - start
            return _result(wall, results)

        return asyncio.run(main())

    def close(self) -> None:
        if hasattr(self, "async_llm"):
            self.async_llm.shutdown()


def in_process_worker(
    model_dir: Path, work_file: Path, max_num_seqs: int, device: str | None, kind: str
) -> None:
    """Worker mode: one in-process run; prints its result as JSON on the last line."""
    work = [(w[0], w[1], w[2]) for w in json.loads(work_file.read_text())]
    engine = InProcess(model_dir, max_num_seqs, device, kind)
    try:
        result = engine.run_llm(work) if kind == "llm" else engine.run_async(work)
    finally:
        engine.close()
    print(json.dumps(result))


def run_in_process(
    model_dir: Path, work_file: Path, max_num_seqs: int, device: str | None, kind: str
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--in-process-worker",
        kind,
        "--model-dir",
        str(model_dir),
        "--work-file",
        str(work_file),
        "--max-num-seqs",
        str(max_num_seqs),
    ]
    done = subprocess.run(
        cmd + (["--device", device] if device else []),
        capture_output=True,
        text=True,
        timeout=7200,
        start_new_session=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"in-process worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _result(wall: float, results: list[tuple[float, float, int]]) -> dict[str, Any]:
    return {
        "wall": wall,
        "tokens": sum(r[2] for r in results),
        "ttft": [r[0] for r in results],
        "e2e": [r[1] for r in results],
    }


async def _client_run(base_url: str, work: list, model: str) -> dict[str, Any]:
    """All requests at once from the openai async client, streaming; per-request TTFT and latency."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=len(work) + 8, max_keepalive_connections=len(work) + 8)
    client = openai.AsyncOpenAI(
        base_url=base_url + "/v1",
        api_key="bench",
        max_retries=0,
        timeout=3600,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits),
    )

    async def one(prompt: list[int], out: int, seed: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        first = None
        tokens = 0
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=out,
            temperature=1.0,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if first is None and chunk.choices and (chunk.choices[0].text or chunk.choices[0].finish_reason):
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return (first or end) - start, end - start, tokens

    # Warm-up: one short request (first-call costs are not serving throughput).
    await one(work[0][0][:16], 2, 0)
    start = time.perf_counter()
    results = await asyncio.gather(*(one(*w) for w in work))
    wall = time.perf_counter() - start
    await client.close()
    return _result(wall, results)


class Served:
    """A server subprocess (own process group) and the client run against it."""

    def __init__(self, cmd: list[str], port: int, ready_path: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            wait_ready(self.url, self.proc, ready_path)
        except BaseException:
            stop(self.proc)
            raise

    def run(self, work: list) -> dict[str, Any]:
        return asyncio.run(_client_run(self.url, work, "bench"))

    def close(self) -> None:
        stop(self.proc)


def start_ours(model_dir: Path, max_num_seqs: int, device: str | None) -> Served:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "deepseek_core.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--max-num-seqs",
        str(max_num_seqs),
        "--log-level",
        "warning",
    ]
    return Served(cmd + (["--device", device] if device else []), port, "/ready")


def start_hand_written(model_dir: Path, device: str | None) -> Served:
    port = free_port()
    cmd = [sys.executable, __file__, "--baseline-server", "--model-dir", str(model_dir), "--port", str(port)]
    return Served(cmd + (["--device", device] if device else []), port, "/health")


# ---------------------------------------------------------------------------------------------- the baseline
def baseline_server(model_dir: Path, port: int, device: str | None) -> None:
    """The hand-written server: FastAPI + transformers' generate, one request at a time under a lock."""
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lock = threading.Lock()
    app = FastAPI()

    class QueueStreamer(BaseStreamer):
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.skip_prompt = loop, queue, True

        def put(self, value: Any) -> None:
            if self.skip_prompt:  # generate() first hands over the prompt
                self.skip_prompt = False
                return
            for token in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def generate(
        ids: list[int], max_tokens: int, temperature: float, seed: int | None, streamer: Any
    ) -> None:
        with lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            model.generate(
                torch.tensor([ids], device=dev),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=temperature > 0,
                temperature=temperature or None,
                top_k=0,
                top_p=1.0,
                streamer=streamer,
                pad_token_id=0,
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        task = loop.run_in_executor(
            None,
            generate,
            ids,
            int(body.get("max_tokens", 16)),
            float(body.get("temperature", 1.0)),
            body.get("seed"),
            QueueStreamer(loop, queue),
        )

        async def events():  # type: ignore[no-untyped-def]
            count = 0
            base = {
                "id": "cmpl-x",
                "object": "text_completion",
                "created": int(time.time()),
                "model": "bench",
            }
            while (token := await queue.get()) is not None:
                count += 1
                text = tokenizer.decode([token])
                chunk = {
                    **base,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            await task
            last = {
                **base,
                "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}],
            }
            yield f"data: {json.dumps(last)}\n\n"
            usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------- report
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="deepseek-tiny, 24 requests, shorter prompts/outputs"
    )
    parser.add_argument(
        "--preset", default=None, help="model preset (default deepseek-134m; quick: deepseek-tiny)"
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="number of requests (default 64; quick 24)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="where the random checkpoint is kept between runs")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the hand-written server")
    parser.add_argument(
        "--with-llm-generate",
        action="store_true",
        help="also time the offline LLM.generate (the in-process ceiling is AsyncLLM, which the server wraps)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds, best counts (default 2; quick 3)"
    )
    parser.add_argument(
        "--baseline-rounds", type=int, default=1, help="rounds of the (slow) hand-written server"
    )
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--in-process-worker", choices=["llm", "async"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        baseline_server(Path(args.model_dir), args.port, args.device)
        return 0
    if args.in_process_worker:
        in_process_worker(
            Path(args.model_dir), Path(args.work_file), args.max_num_seqs, args.device, args.in_process_worker
        )
        return 0

    preset = args.preset or ("deepseek-tiny" if args.quick else "deepseek-134m")
    num = args.requests or (24 if args.quick else 64)
    args.rounds = args.rounds or (3 if args.quick else 2)
    prompt_range, output_range = ((16, 256), (16, 128)) if args.quick else ((16, 512), (16, 256))
    cache = Path(args.cache_dir or Path(tempfile.gettempdir()) / "deepseek-bench-serve")
    model_dir = build_checkpoint(preset, cache / preset)
    from deepseek_core import ModelConfig

    config = ModelConfig.from_pretrained(model_dir)
    work = mixed_workload(num, prompt_range, output_range, config.vocab_size, args.seed)
    total_out = sum(w[1] for w in work)
    print(machine_summary())
    print(
        f"workload: {num} requests, prompts {prompt_range[0]}-{prompt_range[1]} tokens "
        f"(total {sum(len(w[0]) for w in work)}), outputs {output_range[0]}-{output_range[1]} tokens "
        f"(total {total_out}), preset {preset}",
        flush=True,
    )

    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: figures are noisy")
    best: dict[str, dict[str, Any]] = {}
    per_round: dict[int, dict[str, float]] = {}
    work_file = cache / f"work-{preset}-{num}-{args.seed}.json"
    work_file.write_text(json.dumps(work))
    ours = start_ours(model_dir, args.max_num_seqs, args.device)
    base = None if args.skip_baseline else start_hand_written(model_dir, args.device)
    runners: dict[str, Any] = {}
    if args.with_llm_generate:
        runners["in-process LLM.generate"] = lambda w: run_in_process(
            model_dir, work_file, args.max_num_seqs, args.device, "llm"
        )
    runners["in-process AsyncLLM"] = lambda w: run_in_process(
        model_dir, work_file, args.max_num_seqs, args.device, "async"
    )
    runners["http (deepseek-core serve)"] = ours.run
    if base is not None:
        runners["hand-written (FastAPI+generate)"] = base.run
    try:
        # Rounds alternate between the configurations (in reversed order every other round) so machine noise
        # hits them alike; the table shows each one's best round, the ratios are medians of same-round pairs.
        for r in range(args.rounds):
            order = list(runners.items()) if r % 2 == 0 else list(reversed(runners.items()))
            for name, run in order:
                if name == "hand-written (FastAPI+generate)" and r >= args.baseline_rounds:
                    continue
                print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
                result = run(work)
                print(
                    f"  {result['tokens']} tokens in {result['wall']:.1f}s = {result['tokens'] / result['wall']:.1f} tok/s"
                    + (f", p99 latency {_pct(result['e2e'], 0.99):.2f}s" if result["e2e"] else ""),
                    flush=True,
                )
                per_round.setdefault(r, {})[name] = result["tokens"] / result["wall"]
                if name not in best or result["wall"] < best[name]["wall"]:
                    best[name] = result
    finally:
        ours.close()
        if base is not None:
            base.close()
    runs = best

    rows = []
    for name, r in runs.items():
        rows.append(
            {
                "server": name,
                "tokens": r["tokens"],
                "wall s": f"{r['wall']:.2f}",
                "tok/s": f"{r['tokens'] / r['wall']:.1f}",
                "TTFT p50 s": f"{_pct(r['ttft'], 0.5):.3f}" if r["ttft"] else "-",
                "TTFT p99 s": f"{_pct(r['ttft'], 0.99):.3f}" if r["ttft"] else "-",
                "latency p50 s": f"{_pct(r['e2e'], 0.5):.3f}" if r["e2e"] else "-",
                "latency p99 s": f"{_pct(r['e2e'], 0.99):.3f}" if r["e2e"] else "-",
            }
        )
        if r["tokens"] != total_out:
            print(f"warning: {name} generated {r['tokens']} tokens, expected {total_out}")
    print_table(rows)
    http_name, async_name, base_name = (
        "http (deepseek-core serve)",
        "in-process AsyncLLM",
        "hand-written (FastAPI+generate)",
    )

    def paired(other: str) -> list[float]:
        return [t[http_name] / t[other] for t in per_round.values() if other in t and http_name in t]

    ratios = paired(async_name)
    ratio = statistics.median(ratios)
    print(
        f"http / in-process AsyncLLM throughput, median of {len(ratios)} same-round pairs "
        f"{[round(x, 2) for x in ratios]}: {ratio:.2f} (goal >= 0.90) {'OK' if ratio >= 0.9 else 'BELOW GOAL'}"
    )
    baseline = runs.get(base_name)
    if baseline is not None:
        speedups = paired(base_name)
        speedup = statistics.median(speedups)
        p99_ours, p99_base = _pct(runs[http_name]["e2e"], 0.99), _pct(baseline["e2e"], 0.99)
        print(
            f"http / hand-written throughput: {speedup:.2f}x (goal >= 3x) {'OK' if speedup >= 3 else 'BELOW GOAL'}; "
            f"p99 latency {p99_ours:.2f}s vs {p99_base:.2f}s ({'equal or lower' if p99_ours <= p99_base else 'HIGHER'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
