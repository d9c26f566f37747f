"""Secret redaction for everything lifealign writes: config snapshots, reports, JSONL, log lines, error messages.

Two rules (RELIABILITY.md §4.5):

1. the value under any mapping key whose name matches ``(?i)(api[_-]?key|token|secret|password|authorization)``
   becomes ``<REDACTED>``, whatever its type. ``token`` followed by ``s``, ``izer`` or ``id`` is a count or a
   tokenizer field (``max_new_tokens``, ``tokenizer``, ``pad_token_id``), not a credential, and is kept;
2. every occurrence of a known secret (the value of an environment variable named by a configured
   ``api_key_env``) inside any string becomes ``<REDACTED>``, wherever the string sits.

Configs only ever hold the *name* of the environment variable, so ``api_key_env`` itself is exempt from rule 1:
redacting ``OPENAI_API_KEY`` the name would hide where the key comes from without protecting anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<REDACTED>"
SECRET_KEY_PATTERN = re.compile(r"(?i)(api[_-]?key|secret|password|authorization|token(?!s|izer|_?id))")
_NAME_OF_SECRET_KEYS = frozenset({"api_key_env"})
# Shorter values are not treated as secrets: replacing every "1" or "ab" in a report would garble it and a key
# that short protects nothing anyway.
_MIN_SECRET_LENGTH = 8


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a secret (``api_key``, ``hf_token``, ``Authorization`` ...)."""
    return isinstance(key, str) and key not in _NAME_OF_SECRET_KEYS and bool(SECRET_KEY_PATTERN.search(key))


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret (longest first, so overlaps are fully covered) redacted."""
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact(obj: Any, secrets: Iterable[str]) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples, strings, scalars) with secrets removed by the two rules.

    Mapping keys are also scrubbed of known secrets; objects of other types are returned unchanged.
    """
    secrets = list(secrets)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, Mapping):
        return {
            (redact_text(k, secrets) if isinstance(k, str) else k): (
                REDACTED if is_secret_key(k) else redact(v, secrets)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v, secrets) for v in obj)
    return obj


def _api_key_env_names(obj: Any) -> list[str]:
    """Values of every ``api_key_env`` field found anywhere in a nested config (dicts, lists, pydantic models)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    if isinstance(obj, Mapping):
        names = [obj["api_key_env"]] if isinstance(obj.get("api_key_env"), str) else []
        for v in obj.values():
            names.extend(_api_key_env_names(v))
        return names
    if isinstance(obj, list | tuple):
        return [name for v in obj for name in _api_key_env_names(v)]
    return []


def known_secrets(*configs: Any, env: Mapping[str, str] | None = None) -> list[str]:
    """The values of the environment variables named by the ``api_key_env`` fields of the given configs.

    With no config, ``OPENAI_API_KEY`` (the judge's default) is assumed. Unset or empty variables are skipped.
    """
    env = os.environ if env is None else env
    names = [name for cfg in configs for name in _api_key_env_names(cfg)] if configs else ["OPENAI_API_KEY"]
    return [env[name] for name in dict.fromkeys(names) if env.get(name)]
