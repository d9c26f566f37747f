"""The ``eval.judge`` section: where the LLM judge lives; it holds the *name* of the key's variable, never a key."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lifealign.config.secrets import is_secret_key

__all__ = ["JudgeSection"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRETS_MESSAGE = "put secrets in environment variables"


class JudgeSection(BaseModel):
    """Where the judge lives and how hard to try; holds the *name* of the key's environment variable, never a key."""

    # hide_input_in_errors: a refused literal key must not be echoed back inside the validation error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    base_url: str
    """e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended."""
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    """NAME of the environment variable holding the key. Unset = no ``Authorization`` header (local servers)."""
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_concurrency: int = Field(4, ge=1)
    max_retries: int = Field(3, ge=0)
    """Extra attempts after the first, for retryable failures (5xx, 408/429, timeouts, unparsable replies)."""
    backoff_seconds: float = Field(1.0, ge=0.0)
    """Retry k (1-based) waits ``backoff_seconds × 2^(k-1) × U(0.5, 1.5)``, capped at 60 s."""
    timeout_seconds: float = Field(30.0, gt=0)
    """Socket timeout for connecting and for each read of one request."""
    rubric_dir: str | None = None
    """Directory searched before the bundled rubrics for ``<task>.txt`` / ``default.txt``."""
    cache_path: str | None = None
    """JSONL file of finished judgements; a resumed run re-uses them instead of calling the endpoint again."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_literal_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if is_secret_key(key):
                    raise ValueError(
                        f"judge.{key}: {_SECRETS_MESSAGE}; set judge.api_key_env to the NAME of the variable"
                    )
        return data

    @field_validator("api_key_env")
    @classmethod
    def _is_env_name(cls, v: str) -> str:
        if not _ENV_NAME.fullmatch(v):
            raise ValueError(
                f"judge.api_key_env must name an environment variable (e.g. OPENAI_API_KEY): {_SECRETS_MESSAGE}"
            )
        return v

    @field_validator("base_url")
    @classmethod
    def _is_http_url(cls, v: str) -> str:
        parts = urllib.parse.urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("judge.base_url must be an http(s) URL such as https://api.openai.com/v1")
        query_names = [name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
        if parts.username or parts.password or any(is_secret_key(name) for name in query_names):
            raise ValueError(f"judge.base_url must not carry credentials: {_SECRETS_MESSAGE}")
        return v.rstrip("/")
