# ---------------------------------------------------------------------------------------------------------------
# Engine fixtures (deepseek_core.engine tests: tests/core/test_engine_*.py)
# ---------------------------------------------------------------------------------------------------------------
from typing import Any  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def engine_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """kind -> (checkpoint dir, transformers model): tiny random models of tests/core/hf_tiny.py, saved once.

    Matrices are scaled x2 so greedy decoding wanders over many tokens instead of repeating one.
    """
    import torch

    from .hf_tiny import hf_model

    saved: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in saved:
            directory = tmp_path_factory.mktemp(f"engine-{kind}")
            model = hf_model(kind)
            with torch.no_grad():
                for param in model.parameters():
                    if param.dim() >= 2:
                        param.mul_(2.0)
            model.save_pretrained(directory)
            saved[kind] = (directory, model)
        return saved[kind]

    return get


def _byte_tokenizer() -> Any:
    """A byte-level tokenizer whose tokens are single bytes (ids 0..255) plus <s>=256 and </s>=257."""
    from deepseek_core import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False})


class ChainModel:
    """A Transformer that greedily follows a chosen chain of tokens (a bigram table), with its tokenizer.

    Attention and MLP outputs are zeroed, embeddings are one-hot and lm_head maps token i to next[i], so greedy
    decoding is fully known in advance: tests of text, stop strings and UTF-8 streaming need no training.
    """

    def __init__(self, text: str, then: str = "eos", default: str = "x") -> None:
        import torch
        from deepseek_core import ModelConfig, Transformer

        self.tokenizer = _byte_tokenizer()
        self.eos_id = 257
        vocab = 258
        self.config = ModelConfig(
            model_type="llama",
            vocab_size=vocab,
            hidden_size=272,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=256,
            eos_token_id=self.eos_id,
        )
        self.model = Transformer(self.config).eval()
        ids = self.encode(text)
        assert len(set(ids)) == len(ids), "chain text must not repeat a byte"
        default_id = self.encode(default)[0]
        nxt = {i: default_id for i in range(vocab)}
        for a, b in zip(ids, ids[1:]):
            nxt[a] = b
        nxt[ids[-1]] = self.eos_id if then == "eos" else ids[0]
        self.chain_ids = ids
        with torch.no_grad():
            for layer in self.model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            self.model.model.embed_tokens.weight.zero_()
            self.model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
            self.model.lm_head.weight.zero_()
            for a, b in nxt.items():
                self.model.lm_head.weight[b, a] = 1.0

    def encode(self, text: str) -> list[int]:
        """Byte token ids of `text`."""
        return self.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture
def chain_model() -> Any:
    """Factory: ChainModel(text, then="eos"|"loop")."""
    return ChainModel


# ---------------------------------------------------------------------------------------------------------
# Serving fixtures: a tiny random model with a small trained byte-level BPE tokenizer, and real
# `deepseek-core serve` processes on free loopback ports (each in its own process group).
# ---------------------------------------------------------------------------------------------------------
import contextlib as _srv_contextlib  # noqa: E402
import os as _srv_os  # noqa: E402
import signal as _srv_signal  # noqa: E402
import socket as _srv_socket  # noqa: E402
import subprocess as _srv_subprocess  # noqa: E402
import sys as _srv_sys  # noqa: E402
import time as _srv_time  # noqa: E402
from pathlib import Path as _SrvPath  # noqa: E402

import pytest as _srv_pytest  # noqa: E402

SERVING_BOS = "<｜begin▁of▁sentence｜>"
SERVING_EOS = "<｜end▁of▁sentence｜>"
_SERVING_TEXT = (
    "the model reads a token and writes the next one while the cache keeps keys and values of every layer "
    "for each sequence in the batch so that a server can answer many clients at once with low latency and "
    "high throughput ; prompts come in , completions go out , and metrics count them all . "
    "def main ( ) : return 42 # comments are text too , numbers 0 1 2 3 4 5 6 7 8 9 and unicode é ü 中文"
)


def _serving_corpus(lines: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    words = _SERVING_TEXT.split(" ")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 24))) for _ in range(lines)]


def train_serving_tokenizer(vocab_size: int = 512):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained on a small generated corpus (BOS id 0, EOS id 1)."""
    from deepseek_core import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SERVING_BOS, SERVING_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_serving_corpus(), trainer)
    return Tokenizer(hf, {"bos_token": SERVING_BOS, "eos_token": SERVING_EOS, "add_bos_token": True})


@_srv_pytest.fixture(scope="session")
def serving_model_dir(tmp_path_factory: _srv_pytest.TempPathFactory) -> _SrvPath:
    """A tiny random llama (2 layers, hidden 64, context 512) saved with save_model, with its tokenizer."""
    import torch
    from deepseek_core import ModelConfig, Transformer, save_model

    tokenizer = train_serving_tokenizer()
    config = ModelConfig.from_preset(
        "deepseek-tiny",
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = Transformer(config)
    return save_model(model, tmp_path_factory.mktemp("serving") / "tiny", tokenizer=tokenizer)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with _srv_socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A `deepseek-core serve` subprocess in its own process group."""

    def __init__(self, args: list[str], log_path: _SrvPath, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # The console command, as users run it (python -m when the venv has no script).
        script = _SrvPath(_srv_sys.executable).parent / "deepseek-core"
        launcher = [str(script)] if script.exists() else [_srv_sys.executable, "-m", "deepseek_core.cli"]
        cmd = [*launcher, "serve", "--port", str(self.port), *args]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = _srv_subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=_srv_subprocess.STDOUT,
            start_new_session=True,
            env={**_srv_os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /ready until it answers 200 (bounded)."""
        import httpx

        deadline = _srv_time.monotonic() + timeout
        while _srv_time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            _srv_time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        """Send `sig` to the server process only."""
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """Kill the whole process group (idempotent)."""
        if self.proc.poll() is None:
            with _srv_contextlib.suppress(ProcessLookupError):
                _srv_os.killpg(self.proc.pid, _srv_signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()


@_srv_pytest.fixture
def start_server(tmp_path: _SrvPath, serving_model_dir: _SrvPath):  # type: ignore[no-untyped-def]
    """Factory: start_server(*extra_args) -> a ready ServerProcess serving the tiny model; all killed after."""
    started: list[ServerProcess] = []

    def start(*extra: str, ready: bool = True, env: dict[str, str] | None = None) -> ServerProcess:
        args = [
            "--model",
            str(serving_model_dir),
            "--served-model-name",
            "tiny",
            "--log-level",
            "warning",
            *extra,
        ]
        server = ServerProcess(args, tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@_srv_pytest.fixture(scope="session")
def live_server(tmp_path_factory: _srv_pytest.TempPathFactory, serving_model_dir: _SrvPath):  # type: ignore[no-untyped-def]
    """One shared server (key 'test-key', audit log) for the client-facing tests."""
    tmp = tmp_path_factory.mktemp("live-server")
    audit = tmp / "audit.jsonl"
    server = ServerProcess(
        [
            "--model",
            str(serving_model_dir),
            "--served-model-name",
            "tiny",
            "--api-key",
            "test-key",
            "--audit-log",
            str(audit),
            "--log-level",
            "warning",
            "--max-num-seqs",
            "32",
        ],
        tmp / "server.log",
    )
    server.audit_path = audit  # type: ignore[attr-defined]
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
