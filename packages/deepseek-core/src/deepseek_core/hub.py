"""Model-id resolution: a local directory first, then the Hugging Face cache, then the hub when online."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError
from .storage import fetch_checkpoint, is_remote

# Short names users type, mapped to real DeepSeek repositories on the hub.
MODEL_ALIASES: dict[str, str] = {
    "deepseek-base": "deepseek-ai/deepseek-llm-7b-base",
    "deepseek-chat": "deepseek-ai/deepseek-llm-7b-chat",
    "deepseek-llm-7b-base": "deepseek-ai/deepseek-llm-7b-base",
    "deepseek-llm-7b-chat": "deepseek-ai/deepseek-llm-7b-chat",
    "deepseek-coder-1.3b-base": "deepseek-ai/deepseek-coder-1.3b-base",
    "deepseek-coder-6.7b-base": "deepseek-ai/deepseek-coder-6.7b-base",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v2-lite-chat": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
}

_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]


def resolve_model_dir(path_or_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory for `path_or_id`, downloading from the hub only when it is not local.

    An ``s3://`` or ``gs://`` URL is fetched into the local cache and verified (deepseek_core.storage).
    Order: an existing local directory; an alias or hub id already in the Hugging Face cache; a download
    through huggingface_hub (skipped when HF_HUB_OFFLINE=1). The error lists everything that was tried.
    """
    if is_remote(path_or_id):
        return fetch_checkpoint(path_or_id, patterns=allow_patterns or _CHECKPOINT_PATTERNS)
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    repo_id = MODEL_ALIASES.get(path_or_id, path_or_id)
    tried = [f"local directory {local} (does not exist)"]
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise ModelNotFoundError(
            f"model {path_or_id!r} not found: tried {tried[0]}; it is not a hub id (owner/name) "
            f"nor a known alias ({', '.join(sorted(MODEL_ALIASES))})"
        )
    patterns = allow_patterns or _CHECKPOINT_PATTERNS
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFoundError(
            f"model {path_or_id!r}: not local and huggingface_hub is not installed"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        tried.append(f"the Hugging Face cache for {repo_id}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        tried.append("the hub (skipped: HF_HUB_OFFLINE=1)")
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as exc:  # network errors come in many types
            tried.append(f"the hub for {repo_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    raise ModelNotFoundError(f"model {path_or_id!r} not found; tried: " + "; ".join(tried))
