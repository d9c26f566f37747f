"""The LLM-judge client against a real OpenAI-style HTTP server on 127.0.0.1, the rubrics, and the judge scorer."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from lifealign.evaluation.judge import (
    RUBRIC_DIR,
    JudgeCache,
    JudgeClient,
    JudgeItem,
    JudgeSection,
    UnparsableScore,
    judge_cache_key,
    judge_task_score,
    judge_user_message,
    load_rubric,
    parse_judge_score,
    prompt_as_text,
)

TASK_RUBRICS = ["hh-rlhf-harmless-base", "hh-rlhf-helpful-base", "safe-rlhf", "TruthfulQA", "HC3", "Capybara"]


# ------------------------------------------------------------------------------------------------ the fake endpoint


class FakeJudgeServer:
    """Chat-completions endpoint whose reply depends on the item's prompt.

    ``script[prompt]`` is a list of actions consumed one per request (the last one repeats); an action is
    ``("reply", text)``, ``("status", code)``, ``("slow", seconds, text)``, ``("raw", bytes)`` or
    ``("redirect", location)``. Prompts without a script get the reply ``"7"``.
    """

    def __init__(self) -> None:
        self.script: dict[str, list[tuple]] = {}
        self.requests: list[dict] = []
        self.per_prompt: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown: slow handlers stop waiting at once
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, client_address: None  # client gone after a timeout: fine
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def action_for(self, prompt: str) -> tuple:
        with self.lock:
            n = self.per_prompt[prompt]
            self.per_prompt[prompt] += 1
        actions = self.script.get(prompt, [("reply", "7")])
        return actions[min(n, len(actions) - 1)]


def _handler_for(server: FakeJudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _leave(self) -> None:
            """Count this request out *before* the client can see its reply, so the next one never overlaps it."""
            if getattr(self, "_counted", False):
                self._counted = False
                with server.lock:
                    server.in_flight -= 1

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self._leave()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            server.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": None})
            self._send(200, _completion("5"))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = json.loads(raw)
            with server.lock:
                server.requests.append(
                    {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body, "raw": raw}
                )
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self._counted = True
            try:
                self._act(server.action_for(_prompt_of(body)))
            finally:
                self._leave()

        def _act(self, action: tuple) -> None:
            kind = action[0]
            if kind == "reply":
                self._send(200, _completion(action[1]))
            elif kind == "status":
                self._send(action[1], b'{"error": {"message": "nope"}}')
            elif kind == "slow":
                server.release.wait(action[1])
                self._send(200, _completion(action[2]))
            elif kind == "raw":
                self._send(200, action[1])
            elif kind == "redirect":
                self._send(302, b"", {"Location": action[1]})

    return Handler


def _completion(text: str) -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        }
    ).encode()


def _prompt_of(body: dict) -> str:
    user = body["messages"][1]["content"]
    return user.split("\n", 1)[0].removeprefix("Prompt: ")


@pytest.fixture
def server():
    srv = FakeJudgeServer()
    srv.thread.start()
    yield srv
    srv.release.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def api_key(monkeypatch) -> str:
    key = f"sk-test-{uuid.uuid4()}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    return key


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def make_client(server: FakeJudgeServer, sleeps: list[float] | None = None, **overrides) -> JudgeClient:
    cfg = JudgeSection(**{"base_url": server.base_url, "model": "judge-model", "max_retries": 2, **overrides})
    recorded = sleeps if sleeps is not None else []
    return JudgeClient(cfg, sleep=recorded.append, rng=FixedRandom(0.5))


def items_for(*prompts: str, task: str = "HC3") -> list[JudgeItem]:
    return [JudgeItem(task=task, prompt=p, response=f"answer to {p}", reference=f"reference for {p}") for p in prompts]


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("7", 7),
        ("Score: 7", 7),
        ("7/10", 7),
        ("7 / 10", 7),
        ("**10**", 10),
        ("1", 1),
        ("Score: 8 out of 10.", 8),
        ("  9\n", 9),
        ("Rating:10/10", 10),
        ("The answer from Qwen2 deserves 6", 6),
    ],
)
def test_parse_accepts_one_integer_in_range(reply, expected):
    assert parse_judge_score(reply) == expected


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("7 or 8", "ambiguous_score"),
        ("1-10 scale: 7", "ambiguous_score"),
        ("11", "out_of_range"),
        ("0", "out_of_range"),
        ("-3", "out_of_range"),
        ("7.5", "not_an_integer"),
        ("good answer", "no_score"),
        ("", "no_score"),
        ("Score: 70/100", "ambiguous_score"),
    ],
)
def test_parse_rejects_everything_else(reply, reason):
    with pytest.raises(UnparsableScore) as err:
        parse_judge_score(reply)
    assert err.value.reason == reason


def test_task_score_is_ten_times_the_mean():
    assert judge_task_score([7, 8, 9, 10]) == pytest.approx(85.0)
    assert judge_task_score([1]) == 10.0
    assert math.isnan(judge_task_score([]))


# ------------------------------------------------------------------------------------------------ rubrics & message


def test_every_task_has_its_own_rubric_asking_for_one_integer():
    texts = {task: load_rubric(task) for task in [*TASK_RUBRICS, "default"]}
    assert len(set(texts.values())) == len(texts)
    for task, text in texts.items():
        assert "single integer from 1 to 10" in text, task
        assert "reference" in text.lower(), task
        assert (RUBRIC_DIR / f"{task}.txt").is_file()


def test_rubric_lookup_by_dataset_name_and_default():
    assert load_rubric("Capybara-Preferences") == load_rubric("Capybara")
    assert load_rubric("PKU-SafeRLHF") == load_rubric("safe-rlhf")
    assert load_rubric("truthfulqa") == load_rubric("TruthfulQA")
    assert load_rubric("hh-rlhf-helpful-base") != load_rubric("hh-rlhf-harmless-base")
    assert load_rubric("synthetic_sentiment") == load_rubric("default")
    with pytest.raises(ValueError, match="plain name"):
        load_rubric("../secrets")


def test_rubric_dir_overrides_bundled(tmp_path):
    (tmp_path / "HC3.txt").write_text("custom hc3 rubric\n")
    (tmp_path / "default.txt").write_text("custom default\n")
    assert load_rubric("HC3", tmp_path) == "custom hc3 rubric"
    assert load_rubric("synthetic_x", tmp_path) == "custom default"
    assert load_rubric("TruthfulQA", tmp_path) == load_rubric("TruthfulQA")  # not overridden: bundled


def test_user_message_and_prompt_rendering():
    item = JudgeItem(task="HC3", prompt="Why?", response="Because.", reference="Since.")
    assert judge_user_message(item) == "Prompt: Why?\nResponse: Because.\nReference Answer: Since.\nScore:"
    assert prompt_as_text([{"role": "user", "content": "hi"}]) == "hi"
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert prompt_as_text(convo) == "User: a\nAssistant: b\nUser: c"


# ------------------------------------------------------------------------------------------------ config


def test_config_refuses_literal_keys_without_echoing_them():
    key = f"sk-test-{uuid.uuid4()}"
    for bad in ({"api_key": key}, {"openai_api_key": key}, {"api_key_env": key}):
        with pytest.raises(ValidationError, match="put secrets in environment variables") as err:
            JudgeSection(base_url="http://127.0.0.1:1/v1", model="m", **bad)
        assert key not in str(err.value) and key not in repr(err.value)


def test_config_rejects_unknown_keys_and_non_http_urls():
    with pytest.raises(ValidationError, match="extra"):
        JudgeSection(base_url="http://h/v1", model="m", temperture=0.0)
    with pytest.raises(ValidationError, match="http"):
        JudgeSection(base_url="file:///etc/passwd", model="m")
    for leaky in ["https://user:pw@h/v1", "https://h/v1?api-key=abc123456"]:
        with pytest.raises(ValidationError, match="credentials") as err:
            JudgeSection(base_url=leaky, model="m")
        assert "pw@" not in str(err.value) and "abc123456" not in str(err.value)
    assert JudgeSection(base_url="http://h/v1/", model="m").base_url == "http://h/v1"


# ------------------------------------------------------------------------------------------------ client vs server


def test_request_shape_and_score_math(server, api_key):
    for prompt, reply in [("a", "7"), ("b", "Score: 8"), ("c", "9/10"), ("d", "**10**")]:
        server.script[prompt] = [("reply", reply)]
    results = make_client(server).score_many(items_for("a", "b", "c", "d"))
    assert results.scores == [7, 8, 9, 10]
    assert results.score == pytest.approx(85.0)
    assert (results.n_scored, results.n_failed, results.failures) == (4, 0, {})
    body = server.requests[0]["body"]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": load_rubric("HC3")}
    assert body["messages"][1]["role"] == "user"
    assert body["messages"][1]["content"].endswith("\nReference Answer: reference for " + _prompt_of(body) + "\nScore:")


def test_failures_are_counted_by_reason_and_never_fatal(server, api_key):
    server.script.update(
        {
            "unauthorised": [("status", 401)],
            "down": [("status", 500)],
            "garbage": [("reply", "what a lovely answer")],
            "eleven": [("reply", "11")],
            "torn": [("reply", "7 or 8")],
            "not-json": [("raw", b"<html>oops</html>")],
            "good": [("reply", "6")],
        }
    )
    sleeps: list[float] = []
    prompts = ["unauthorised", "down", "garbage", "eleven", "torn", "not-json", "good"]
    results = make_client(server, sleeps, max_retries=2).score_many(items_for(*prompts))
    assert results.scores == [None] * 6 + [6]
    assert results.score == pytest.approx(60.0)
    assert (results.n_scored, results.n_failed) == (1, 6)
    assert results.failures == {
        "ambiguous_score": 1,
        "bad_response": 1,
        "http_401": 1,
        "http_500": 1,
        "no_score": 1,
        "out_of_range": 1,
    }
    assert server.per_prompt["unauthorised"] == 1  # a 4xx is not retried
    for retried in ["down", "garbage", "eleven", "torn", "not-json"]:
        assert server.per_prompt[retried] == 3  # 1 + max_retries
    assert len(sleeps) == 5 * 2


def test_retry_after_server_errors_with_exponential_backoff(server, api_key):
    server.script["flaky"] = [("status", 500), ("status", 503), ("reply", "8")]
    sleeps: list[float] = []
    results = make_client(server, sleeps, max_retries=3, backoff_seconds=1.5).score_many(items_for("flaky"))
    assert results.scores == [8] and results.n_failed == 0
    assert server.per_prompt["flaky"] == 3
    assert sleeps == [1.5, 3.0]  # backoff × 2^(k-1) × (0.5 + u), u = 0.5


def test_backoff_jitter_bounds_and_cap():
    cfg = JudgeSection(base_url="http://h/v1", model="m", backoff_seconds=2.0)
    assert JudgeClient(cfg, rng=FixedRandom(0.0)).backoff_delay(3) == pytest.approx(2.0 * 4 * 0.5)
    assert JudgeClient(cfg, rng=FixedRandom(0.999)).backoff_delay(1) == pytest.approx(2.0 * 1.499)
    assert JudgeClient(cfg, rng=FixedRandom(0.5)).backoff_delay(20) == 60.0


def test_slow_reply_times_out(server, api_key):
    server.script["slow"] = [("slow", 5.0, "9")]
    start = time.monotonic()
    results = make_client(server, max_retries=1, timeout_seconds=0.25).score_many(items_for("slow", "fast"))
    assert time.monotonic() - start < 2.0
    assert results.scores == [None, 7]
    assert results.failures == {"timeout": 1}


def test_concurrency_is_bounded(server, api_key):
    prompts = [f"p{i}" for i in range(9)]
    server.script.update({p: [("slow", 0.15, "5")] for p in prompts})
    results = make_client(server, max_concurrency=3).score_many(items_for(*prompts))
    assert results.scores == [5] * 9
    assert server.max_in_flight == 3


def test_cache_resumes_without_paying_twice(server, api_key, tmp_path):
    cache = tmp_path / "judge" / "cache.jsonl"
    server.script.update({"a": [("reply", "3")], "b": [("reply", "4")], "bad": [("reply", "no idea")]})
    first = make_client(server, cache_path=str(cache), max_retries=0).score_many(items_for("a", "b", "bad"))
    assert first.scores == [3, 4, None] and first.n_cached == 0
    assert len(server.requests) == 3
    assert len(cache.read_text().splitlines()) == 2  # failures are not cached

    second = make_client(server, cache_path=str(cache), max_retries=0).score_many(items_for("a", "b", "bad"))
    assert second.scores == [3, 4, None] and second.cached == [True, True, False]
    assert len(server.requests) == 4  # only "bad" was asked again

    other_model = make_client(server, cache_path=str(cache), model="other").score_many(items_for("a"))
    assert other_model.cached == [False] and len(server.requests) == 5


def test_cache_ignores_a_torn_last_line_and_appends_after_it(tmp_path, server, api_key):
    cache = tmp_path / "cache.jsonl"
    key = judge_cache_key("judge-model", load_rubric("HC3"), "a", "answer to a", "reference for a")
    cache.write_text(json.dumps({"key": key, "score": 9}) + "\n" + '{"key": "deadbeef", "sco')
    results = make_client(server, cache_path=str(cache)).score_many(items_for("a", "b"))
    assert results.scores == [9, 7] and results.cached == [True, False]
    lines = cache.read_text().split("\n")
    assert lines[1] == '{"key": "deadbeef", "sco'  # the torn line stays on its own line
    assert json.loads(lines[2])["score"] == 7
    assert len(JudgeCache(cache).load()) == 2
    again = make_client(server, cache_path=str(cache)).score_many(items_for("a", "b"))
    assert again.cached == [True, True]


def test_key_reaches_only_the_authorization_header(server, api_key, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache.jsonl"
    server.script.update(
        {"ok": [("reply", "8")], "denied": [("status", 403)], "boom": [("status", 500)], "junk": [("reply", "eh")]}
    )
    results = make_client(server, cache_path=str(cache)).score_many(items_for("ok", "denied", "boom", "junk"))
    assert results.scores == [8, None, None, None]
    assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {api_key}"}
    assert all(api_key.encode() not in r["raw"] for r in server.requests)
    secret_part = api_key.removeprefix("sk-test-")
    for text in [repr(results), str(results.summary()), cache.read_text(), caplog.text]:
        assert secret_part not in text


def test_invalid_key_is_reported_without_a_request_or_an_echo(server, monkeypatch, caplog):
    secret = str(uuid.uuid4())
    monkeypatch.setenv("OPENAI_API_KEY", f"sk-{secret}\r\nX-Injected: 1")
    caplog.set_level(logging.DEBUG)
    results = make_client(server).score_many(items_for("a"))
    assert results.failures == {"invalid_api_key": 1} and server.requests == []
    assert secret not in caplog.text


def test_no_key_means_no_authorization_header(server, monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    results = make_client(server).score_many(items_for("a"))
    assert results.scores == [7]
    assert "Authorization" not in server.requests[0]["headers"]
    assert "OPENAI_API_KEY is not set" in caplog.text


def test_redirect_does_not_carry_the_key(server, api_key):
    server.script["moved"] = [("redirect", "/elsewhere")]
    make_client(server, max_retries=0).score_many(items_for("moved"))
    followed = [r for r in server.requests if r["method"] == "GET"]
    assert followed and "Authorization" not in followed[0]["headers"]


def test_identical_items_are_judged_once(server, api_key):
    results = make_client(server).score_many(items_for("same", "same"))
    assert results.scores == [7, 7] and len(server.requests) == 1


def test_results_split_by_task(server, api_key):
    server.script.update({"x": [("reply", "2")], "y": [("reply", "4")]})
    items = items_for("x", task="HC3") + items_for("y", task="TruthfulQA")
    results = make_client(server).score_many(items)
    assert results.for_task("HC3").score == pytest.approx(20.0)
    assert results.for_task("TruthfulQA").score == pytest.approx(40.0)


# ------------------------------------------------------------------------------------------------ scorer


def test_judge_scorer_scores_generations_against_chosen(server, api_key):
    base = pytest.importorskip("lifealign.evaluation.scorers.base", reason="scorers/base.py dependencies missing")
    from lifealign.config.schema import DataSection, EvalSection
    from lifealign.data.records import PreferencePair, Task
    from lifealign.evaluation.scorers.judge import JudgeScorer, judge_section_from

    server.script.update({"q1": [("reply", "9")], "q2": [("reply", "3")]})
    task = Task(name="HC3", train=[], test=[PreferencePair("q1", "c1", "r1"), PreferencePair("q2", "c2", "r2")])
    ctx = base.EvalContext(model=None, tokenizer=None, data=DataSection(), eval=EvalSection())
    ctx.generations["HC3"] = base.Generations(
        ids=["1", "2"],
        prompts=["q1", [{"role": "user", "content": "q2"}]],
        completions=["g1", "g2"],
        references=["c1", "c2"],
    )
    cfg = JudgeSection(base_url=server.base_url, model="m")
    out = JudgeScorer(cfg).score(ctx, task)
    assert out == {"judge": pytest.approx(60.0), "judge/n_scored": 2.0, "judge/n_failed": 0.0}
    users = sorted(r["body"]["messages"][1]["content"] for r in server.requests)
    assert users == [
        "Prompt: q1\nResponse: g1\nReference Answer: c1\nScore:",
        "Prompt: q2\nResponse: g2\nReference Answer: c2\nScore:",
    ]
    with pytest.raises(ValueError, match="eval.judge"):
        judge_section_from(EvalSection())


def _judge_ctx(base, prompts: list[str]):
    from lifealign.config.schema import DataSection, EvalSection
    from lifealign.data.records import PreferencePair, Task

    task = Task(name="HC3", train=[], test=[PreferencePair(p, f"c-{p}", "r", id=f"id-{p}") for p in prompts])
    ctx = base.EvalContext(model=None, tokenizer=None, data=DataSection(), eval=EvalSection())
    ctx.generations["HC3"] = base.Generations(
        ids=[f"id-{p}" for p in prompts],
        prompts=prompts,
        completions=["g"] * len(prompts),
        references=["c"] * len(prompts),
    )
    return task, ctx


def test_judge_items_are_ten_times_the_scores_with_nan_for_failures(server, api_key, caplog):
    """Replies 9, unparsable, 4 -> items [90, NaN, 40]; score (90 + 40) / 2 = 65, n_scored 2, n_failed 1."""
    base = pytest.importorskip("lifealign.evaluation.scorers.base", reason="scorers/base.py dependencies missing")
    from lifealign.evaluation.scorers.judge import JudgeScorer

    server.script.update({"q1": [("reply", "9")], "q2": [("reply", "no idea")], "q3": [("reply", "4")]})
    task, ctx = _judge_ctx(base, ["q1", "q2", "q3"])
    scorer = JudgeScorer(JudgeSection(base_url=server.base_url, model="m", max_retries=0))
    items = scorer.score_items(ctx, task)["judge"]
    assert items.ids == ["id-q1", "id-q2", "id-q3"] and items.values[0] == 90.0 and items.values[2] == 40.0
    assert math.isnan(items.values[1]) and items.failures == {"no_score": 1}
    assert scorer.summarize({"judge": items}) == {"judge": 65.0, "judge/n_scored": 2.0, "judge/n_failed": 1.0}
    with caplog.at_level(logging.WARNING, logger="lifealign.evaluation.scorers.base"):
        base.check_failures("HC3", "judge", items)
    assert "1 of 3 items failed (no_score: 1)" in caplog.text


def test_judge_failing_on_every_item_is_a_scorer_error(server, api_key, monkeypatch):
    """Unparsable replies everywhere, or an exception inside every request (here a KeyError), leave no score:
    check_failures raises instead of letting a NaN through."""
    base = pytest.importorskip("lifealign.evaluation.scorers.base", reason="scorers/base.py dependencies missing")
    from lifealign.evaluation import judge as judge_module
    from lifealign.evaluation.scorers.judge import JudgeScorer

    server.script.update({"q1": [("reply", "great answer")], "q2": [("reply", "7 or 8")]})
    task, ctx = _judge_ctx(base, ["q1", "q2"])
    cfg = JudgeSection(base_url=server.base_url, model="m", max_retries=0)
    items = JudgeScorer(cfg).score_items(ctx, task)["judge"]
    assert items.n_failed == items.n == 2 and math.isnan(items.mean())
    with pytest.raises(base.ScorerError, match=r"'judge' failed on all 2 items of task 'HC3'.*ambiguous_score: 1"):
        base.check_failures("HC3", "judge", items)

    def broken(*args, **kwargs):
        raise KeyError("choices")

    monkeypatch.setattr(judge_module, "_post_chat", broken)
    items = JudgeScorer(cfg).score_items(ctx, task)["judge"]
    assert items.failures == {"error_KeyError": 2}
    with pytest.raises(base.ScorerError, match="error_KeyError: 2"):
        base.check_failures("HC3", "judge", items)


def test_cache_file_path_is_created(tmp_path):
    cache = JudgeCache(tmp_path / "deep" / "c.jsonl")
    cache.append("k", 5, "HC3", "m")
    assert cache.load() == {"k": 5}
    assert Path(tmp_path / "deep" / "c.jsonl").read_text().endswith("\n")
