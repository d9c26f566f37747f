"""FIFOBuffer (selection, eviction, JSON state) and ReplayPlugin (per-stage buffers, deterministic mixing)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lifealign.continual import bind_plugin
from lifealign.continual.buffers import FIFOBuffer, record_from_json, record_to_json
from lifealign.continual.replay import ReplayPlugin, mix_with_buffer
from lifealign.data.records import PreferencePair, Task
from lifealign.training.plugin import PluginContext


def pairs(task: str, n: int) -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt=f"{task} question {i}", chosen=f"good {i}", rejected=f"bad {i}", task=task, id=f"{task}-{i}"
        )
        for i in range(n)
    ]


def ctx_for(task: Task, index: int, stage: str = "pref") -> PluginContext:
    return PluginContext(model=torch.nn.Linear(1, 1), tokenizer=None, task=task, task_index=index, stage=stage)


def ids(records: list[PreferencePair]) -> list[str]:
    return [r.id for r in records]


# ----- FIFOBuffer -----------------------------------------------------------------------------------------------


def test_buffer_takes_twenty_percent_of_each_task():
    """floor(0.2 · 10) = 2, floor(0.2 · 25) = 5, and a 3-record task gives max(1, floor(0.6)) = 1."""
    buf = FIFOBuffer(capacity=100, fraction=0.2, seed=0)
    assert len(buf.add_task(pairs("a", 10), 0, "a")) == 2
    assert len(buf.add_task(pairs("b", 25), 1, "b")) == 5
    assert len(buf.add_task(pairs("c", 3), 2, "c")) == 1
    assert len(buf) == 8
    assert buf.per_task() == [
        {"task_index": 0, "task": "a", "records": 2},
        {"task_index": 1, "task": "b", "records": 5},
        {"task_index": 2, "task": "c", "records": 1},
    ]
    assert len(buf.add_task([], 3, "empty")) == 0


def test_random_selection_is_seeded_reproducible_and_in_task_order():
    records = pairs("a", 50)
    first = FIFOBuffer(100, 0.2, seed=7).add_task(records, 3)
    again = FIFOBuffer(100, 0.2, seed=7).add_task(records, 3)
    assert ids(first) == ids(again)
    # The documented generator: random.Random(f"{seed}:{task_index}").sample, kept in task order.
    expected = sorted(random.Random("7:3").sample(range(50), 10))
    assert ids(first) == [f"a-{i}" for i in expected]
    assert ids(first) != ids(records[:10])  # a sample, not the head
    assert ids(FIFOBuffer(100, 0.2, seed=8).add_task(records, 3)) != ids(first)
    assert ids(FIFOBuffer(100, 0.2, seed=7).add_task(records, 4)) != ids(first)


def test_first_selection_takes_the_head_like_the_authors_code():
    chosen = FIFOBuffer(100, 0.2, selection="first").add_task(pairs("a", 10), 0)
    assert ids(chosen) == ["a-0", "a-1"]


def test_oldest_leave_first_when_full():
    """capacity 5, 2 records per task (first 50% of 4): after tasks 0,1,2 the 6 records overflow by 1 → a-0 leaves."""
    buf = FIFOBuffer(capacity=5, fraction=0.5, selection="first", eviction="oldest")
    for i, name in enumerate("abc"):
        buf.add_task(pairs(name, 4), i, name)
    assert ids(buf.records) == ["a-1", "b-0", "b-1", "c-0", "c-1"]
    buf.add_task(pairs("d", 4), 3, "d")
    assert ids(buf.records) == ["b-1", "c-0", "c-1", "d-0", "d-1"]
    assert [t["records"] for t in buf.per_task()] == [0, 1, 2, 2]


def test_newest_eviction_keeps_the_first_rows_like_the_authors_code():
    """Same stream with eviction=newest: the buffer keeps its first 5 rows; task d never enters."""
    buf = FIFOBuffer(capacity=5, fraction=0.5, selection="first", eviction="newest")
    for i, name in enumerate("abcd"):
        buf.add_task(pairs(name, 4), i, name)
    assert ids(buf.records) == ["a-0", "a-1", "b-0", "b-1", "c-0"]
    assert [t["records"] for t in buf.per_task()] == [2, 2, 1, 0]


def test_adding_a_task_twice_is_an_error():
    buf = FIFOBuffer(10)
    buf.add_task(pairs("a", 5), 0)
    with pytest.raises(ValueError, match="already added"):
        buf.add_task(pairs("a", 5), 0)


def test_buffer_state_round_trips_through_json_and_checks_hashes():
    conv = PreferencePair(prompt=[{"role": "user", "content": "hi"}], chosen="hello", rejected="go away", id="c")
    buf = FIFOBuffer(capacity=4, fraction=1.0, seed=3)
    buf.add_task(pairs("a", 3) + [conv], 0, "a")
    state = json.loads(json.dumps(buf.state_dict()))
    restored = FIFOBuffer(capacity=4, fraction=1.0, seed=3)
    restored.load_state_dict(state)
    assert restored.records == buf.records and restored.tasks_added == [0]
    assert restored.per_task() == buf.per_task()

    state["entries"][1]["record"]["chosen"] = "tampered"
    with pytest.raises(ValueError, match="buffer entry 1: content hash mismatch"):
        FIFOBuffer(capacity=4, fraction=1.0, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="buffer capacity"):
        FIFOBuffer(capacity=8, fraction=1.0, seed=3).load_state_dict(json.loads(json.dumps(buf.state_dict())))


def test_record_json_keeps_every_field():
    r = PreferencePair(prompt="p", chosen="c", rejected="r", task="t", id="x")
    assert record_from_json(record_to_json(r)) == r


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": 5, "fraction": 0.0}, "fraction"),
        ({"capacity": 5, "fraction": 1.5}, "fraction"),
        ({"capacity": 5, "selection": "last"}, "selection"),
        ({"capacity": 5, "eviction": "random"}, "eviction"),
    ],
)
def test_buffer_rejects_bad_settings_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        FIFOBuffer(**kwargs)


# ----- ReplayPlugin ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"buffer_size": -1}, "buffer_size"),
        ({"buffer_size": 2.5}, "buffer_size"),
        ({"fraction": "a lot"}, "fraction"),
        ({"selection": "middle"}, "selection"),
        ({"eviction": "fifo"}, "eviction"),
        ({"stages": ["rl"]}, "stages"),
        ({"stages": []}, "stages"),
        ({"stages": ["pref", "pref"]}, "stages"),
        ({"seed": "zero"}, "seed"),
    ],
)
def test_plugin_rejects_bad_kwargs_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "replay", **kwargs})


def run_task(plugin: ReplayPlugin, task: Task, index: int, sft: list[PreferencePair] | None = None):
    """The runner's calls for one task: train_data per stage (sft optional), then after_task; returns the mixes."""
    ctx = ctx_for(task, index, "sft")
    out = {}
    if sft is not None:
        out["sft"] = plugin.train_data(ctx, sft)
    ctx.stage = "pref"
    out["pref"] = plugin.train_data(ctx, list(task.train))
    plugin.after_task(ctx)
    return out, ctx


def test_first_task_is_unchanged_and_after_task_fills_both_buffers():
    plugin = ReplayPlugin(buffer_size=100, stages=["sft", "pref"])
    task = Task("a", pairs("a", 10))
    out, ctx = run_task(plugin, task, 0, sft=task.train[:5])
    assert out["pref"] == task.train and out["sft"] == task.train[:5]
    report = plugin.report()
    # pref: 20% of 10 = 2; sft trained on 5 records → max(1, floor(1.0)) = 1, drawn from those 5.
    assert report["pref"]["size"] == 2 and report["sft"]["size"] == 1
    assert report["pref"]["per_task"] == [{"task_index": 0, "task": "a", "records": 2}]
    assert set(ids(plugin.buffers["sft"].records)) <= set(ids(task.train[:5]))


def test_stage_buffers_are_separate_and_unconfigured_stages_pass_through():
    plugin = ReplayPlugin(buffer_size=100, stages=("pref",), selection="first")
    a, b = Task("a", pairs("a", 10)), Task("b", pairs("b", 10))
    run_task(plugin, a, 0, sft=a.train)
    out, _ = run_task(plugin, b, 1, sft=b.train)
    assert set(plugin.buffers) == {"pref"}
    assert out["sft"] is b.train  # not touched: sft is not a configured stage
    assert len(out["pref"]) == 12

    both = ReplayPlugin(buffer_size=100, selection="first")
    run_task(both, a, 0, sft=a.train[5:])  # the SFT stage saw a different subset than the preference stage
    assert ids(both.buffers["sft"].records) == ["a-5"]
    assert ids(both.buffers["pref"].records) == ["a-0", "a-1"]
    out, _ = run_task(both, b, 1, sft=b.train)
    assert "a-5" in ids(out["sft"]) and "a-0" not in ids(out["sft"])
    assert "a-0" in ids(out["pref"]) and "a-5" not in ids(out["pref"])


def test_a_stage_that_did_not_run_adds_nothing_to_its_buffer():
    plugin = ReplayPlugin(buffer_size=100)
    run_task(plugin, Task("a", pairs("a", 10)), 0, sft=None)
    assert len(plugin.buffers["sft"]) == 0 and len(plugin.buffers["pref"]) == 2


def test_train_data_mixes_buffer_and_current_deterministically():
    def second_task_mix(seed: int) -> list[PreferencePair]:
        plugin = ReplayPlugin(buffer_size=100, seed=seed, stages=["pref"])
        run_task(plugin, Task("a", pairs("a", 10)), 0)
        return run_task(plugin, Task("b", pairs("b", 10)), 1)[0]["pref"]

    mixed = second_task_mix(0)
    assert len(mixed) == 12
    assert sorted(ids(mixed)) == sorted(
        ids(pairs("b", 10)) + ids(FIFOBuffer(100, 0.2, seed=0).add_task(pairs("a", 10), 0))
    )
    assert ids(mixed) == ids(second_task_mix(0))
    # The documented order: shuffle(current + buffer) with random.Random(f"{seed}:{task_index}:{stage}").
    expected = pairs("b", 10) + FIFOBuffer(100, 0.2, seed=0).add_task(pairs("a", 10), 0)
    random.Random("0:1:pref").shuffle(expected)
    assert ids(mixed) == ids(expected)
    assert ids(mixed) != ids(second_task_mix(1))


def test_duplicates_of_current_records_are_dropped_from_the_replay():
    """Task b repeats a's records 0..9 (same content): every buffered a-record is a duplicate and is dropped."""
    plugin = ReplayPlugin(buffer_size=100, stages=["pref"])
    run_task(plugin, Task("a", pairs("a", 10)), 0)
    repeat = Task(
        "b",
        [PreferencePair(r.prompt, r.chosen, r.rejected, task="b", id=f"b-{i}") for i, r in enumerate(pairs("a", 10))],
    )
    out, ctx = run_task(plugin, repeat, 1)
    assert sorted(ids(out["pref"])) == sorted(ids(repeat.train))
    assert plugin.report()["pref"]["last_mix"] == {
        "task_index": 1,
        "current": 10,
        "replayed": 0,
        "duplicates_dropped": 2,
    }
    mixed, dropped = mix_with_buffer(pairs("x", 2), pairs("x", 3), random.Random(0))
    assert dropped == 2 and sorted(ids(mixed)) == ["x-0", "x-1", "x-2"]


def test_capacity_is_respected_across_a_stream():
    plugin = ReplayPlugin(buffer_size=5, stages=["pref"])
    for i in range(4):
        run_task(plugin, Task(f"t{i}", pairs(f"t{i}", 10)), i)
    report = plugin.report()["pref"]
    assert report["size"] == 5 and report["capacity"] == 5
    # 2 records per task, oldest leave first: t0 gone, t1 keeps one, t2 and t3 keep two.
    assert [t["records"] for t in report["per_task"]] == [0, 1, 2, 2]


def test_plugin_state_round_trip_mid_task_gives_the_same_buffers():
    """Checkpoint after task 1's SFT stage; a restored plugin ends task 1 exactly like the original."""
    a, b = Task("a", pairs("a", 10)), Task("b", pairs("b", 10))
    original = ReplayPlugin(buffer_size=100)
    run_task(original, a, 0, sft=a.train)
    ctx = ctx_for(b, 1, "sft")
    original.train_data(ctx, b.train[:5])
    state = json.loads(json.dumps(original.state_dict()))
    assert state["tensors"] == {}

    restored = ReplayPlugin(buffer_size=100)
    restored.load_state_dict(state)
    for plugin in (original, restored):
        ctx.stage = "pref"
        plugin.train_data(ctx, list(b.train))
        plugin.after_task(ctx)
    assert original.report() == restored.report()
    for stage in ("sft", "pref"):
        assert original.buffers[stage].records == restored.buffers[stage].records
    with pytest.raises(ValueError, match="replay stages"):
        ReplayPlugin(stages=["pref"]).load_state_dict(state)
