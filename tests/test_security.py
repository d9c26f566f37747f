"""Secret redaction: key-name rule, known-secret rule, and collecting secrets from configured env-var names."""

from __future__ import annotations

import uuid

import pytest

from lifealign.config.secrets import REDACTED, is_secret_key, known_secrets, redact, redact_text


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "API-KEY",
        "apikey",
        "openai_api_key",
        "hf_token",
        "token",
        "Authorization",
        "db_password",
        "client_secret",
        "access_token_2",
    ],
)
def test_secret_key_names(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "api_key_env",
        "max_new_tokens",
        "min_response_tokens",
        "tokenizer",
        "pad_token_id",
        "token_ids",
        "model",
        "base_url",
        3,
    ],
)
def test_non_secret_key_names(key):
    assert not is_secret_key(key)


def test_redact_by_key_name_and_by_known_secret_in_nested_structures():
    key = f"sk-test-{uuid.uuid4()}"
    obj = {
        "judge": {"api_key_env": "OPENAI_API_KEY", "api_key": 12345, "base_url": "http://h/v1"},
        "headers": [{"Authorization": f"Bearer {key}"}, ("keep", f"error calling with {key} failed")],
        "eval": {"max_new_tokens": 48},
        f"weird-{key}": 1,
        "n": 3.5,
    }
    out = redact(obj, [key])
    assert out == {
        "judge": {"api_key_env": "OPENAI_API_KEY", "api_key": REDACTED, "base_url": "http://h/v1"},
        "headers": [{"Authorization": REDACTED}, ("keep", f"error calling with {REDACTED} failed")],
        "eval": {"max_new_tokens": 48},
        f"weird-{REDACTED}": 1,
        "n": 3.5,
    }
    assert isinstance(out["headers"][1], tuple)
    assert obj["judge"]["api_key"] == 12345  # the input is not modified


def test_redact_text_replaces_every_occurrence_and_ignores_trivial_secrets():
    assert redact_text("a=SECRET123, b=SECRET123", ["SECRET123"]) == f"a={REDACTED}, b={REDACTED}"
    assert redact_text("value 1 and ab", ["1", "ab", ""]) == "value 1 and ab"
    # Overlapping secrets: the longer one is removed whole, not left half-visible.
    assert redact_text("xx-LONGSECRET-99", ["LONGSECRET", "LONGSECRET-99"]) == f"xx-{REDACTED}"


def test_known_secrets_follow_configured_env_names():
    from lifealign.evaluation.judge import JudgeSection

    env = {"OPENAI_API_KEY": "sk-default-000000", "MY_JUDGE_KEY": "sk-mine-1111111", "EMPTY": ""}
    section = JudgeSection(base_url="http://h/v1", model="m", api_key_env="MY_JUDGE_KEY")
    assert known_secrets(env=env) == ["sk-default-000000"]
    assert known_secrets(section, env=env) == ["sk-mine-1111111"]
    nested = {"eval": {"judge": {"api_key_env": "OPENAI_API_KEY"}}, "other": [{"api_key_env": "EMPTY"}]}
    assert known_secrets(nested, section, env=env) == ["sk-default-000000", "sk-mine-1111111"]


def test_known_secrets_read_the_process_environment(monkeypatch):
    key = f"sk-test-{uuid.uuid4()}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    assert known_secrets() == [key]
    assert key not in str(redact({"log": f"request failed for {key}"}, known_secrets()))
