"""Tokenizer: tokenizer.json (the `tokenizers` library) plus tokenizer_config.json's special tokens and chat template."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError

# Used when a tokenizer_config.json has no chat_template: DeepSeek's plain User/Assistant format.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _token_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # AddedToken serialized as {"content": ...}
        return str(value.get("content"))
    return str(value)


class Tokenizer:
    """encode / decode / apply_chat_template over a tokenizer.json."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config: dict[str, Any] = dict(config or {})
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        self.chat_template: str = self.config.get("chat_template") or DEFAULT_CHAT_TEMPLATE

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from a directory or model id."""
        from .hub import resolve_model_dir

        directory = resolve_model_dir(str(path_or_id), allow_patterns=["tokenizer*", "*.json"])
        tok_path = directory / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{tok_path}: missing tokenizer.json in {directory}")
        try:
            tokenizer = _HFTokenizer.from_file(str(tok_path))
        except Exception as exc:
            raise CheckpointError(f"{tok_path}: cannot read tokenizer ({exc})") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
        return cls(tokenizer, config)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        config.setdefault("chat_template", self.chat_template)
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str | None) -> int | None:
        """Id of a token string, or None."""
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token."""
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token."""
        return self.token_to_id(self.eos_token)

    @property
    def special_ids(self) -> set[int]:
        """Ids of all special (added, special) tokens."""
        decoder = self._tok.get_added_tokens_decoder()
        return {i for i, tok in decoder.items() if tok.special}

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; adds BOS when tokenizer_config.json asks for it."""
        ids = list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_special_tokens:
            bos = self.bos_token_id
            if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
                ids.insert(0, bos)
            eos = self.eos_token_id
            if self.add_eos_token and eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() for many texts, in parallel inside the tokenizers library."""
        if self.add_bos_token or self.add_eos_token:
            return [self.encode(t, add_special_tokens) for t in texts]
        return [
            list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` with the chat template; token ids when `tokenize`."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}]: each message needs 'role' and 'content'")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder that turns a growing id list into text deltas, never splitting a UTF-8 character."""
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Streaming detokenization: emits only text that later tokens cannot change."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # end of the ids whose text was already emitted

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever text remains at the end of the stream (a dangling partial character becomes U+FFFD)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]
