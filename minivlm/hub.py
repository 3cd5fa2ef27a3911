"""Downloads live here, and only here: pretrained GPT-2 weights and tokenizers from the Hugging Face hub.

The rule (house style, practice 10): look in the local cache first, go to the network only when the
cache lacks the files, and when there is no network say so at once — with what to do instead — rather
than let `huggingface_hub` retry for half a minute and end in a traceback from deep inside it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["OfflineError", "hub_reachable", "load_hf_gpt2", "load_hf_tokenizer"]

HUB_NAMES = ("gpt2", "distilgpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
OFFLINE_HINT = (
    "To work offline, use the course's own small GPT-2 (pretrained on first use, no network needed), "
    "or copy a GPT-2 saved with `save_pretrained(...)` to this machine and pass its directory."
)


class OfflineError(RuntimeError):
    """Raised when something must come from the network and the network cannot be reached."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub can be reached: False at once when HF_HUB_OFFLINE is set, else one TCP connect."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cache_or_hub(load, name_or_path: str | Path, what: str):
    """load(name, **kwargs) from a directory, else the local hub cache, else the hub; OfflineError at once if unreachable."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load(path)
    name = str(name_or_path)
    if path.suffix or os.sep in name or name.startswith("."):
        raise FileNotFoundError(f"no directory at {path} (looking for {what}): expected a folder written by save_pretrained()")
    try:
        return load(name, local_files_only=True)  # the cache first
    except OSError:
        pass
    if not hub_reachable():
        raise OfflineError(
            f"{what} {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(no network, or HF_HUB_OFFLINE is set). {OFFLINE_HINT}"
        )
    return load(name)


def load_hf_gpt2(name_or_path: str | Path):
    """A `transformers.GPT2LMHeadModel` from a save_pretrained directory, the local hub cache, or the hub."""
    from transformers import GPT2LMHeadModel

    return _cache_or_hub(GPT2LMHeadModel.from_pretrained, name_or_path, "GPT-2")


def load_hf_tokenizer(name_or_path: str | Path):
    """A hub model's tokenizer, by the same rule: directory, local cache, hub, or OfflineError at once."""
    from transformers import AutoTokenizer

    return _cache_or_hub(AutoTokenizer.from_pretrained, name_or_path, "the tokenizer of")
