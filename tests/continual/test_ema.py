"""EMA adapters (I-LoRA): the update and the consistency loss by hand, the closed form after k real loop steps
(one of them skipped), the slow adapter written per task, the consistency term on the tiny model, resume."""

import json

import pytest
import torch

from lifealign.continual import bind_plugin
from lifealign.continual.ema import EMAPlugin, consistency_loss, ema_decay, ema_update, optimizer_steps
from lifealign.data.collate import collate_pairs
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.models.lora import lora_state
from lifealign.training.forward import batch_logps
from lifealign.training.plugin import Plugin, PluginContext
from tests.helpers import perturb_lora_b, synthetic_tasks, tiny_config


# ----- pure functions --------------------------------------------------------------------------------------------
def test_decay_with_and_without_the_warmup():
    """min(n / (n + 1), decay): 1/2, 2/3, 3/4, ... until it reaches decay (0.7 from n = 3: 3/4 > 0.7)."""
    assert [ema_decay(n, 0.7, warmup=True) for n in (1, 2, 3, 10)] == [0.5, 2 / 3, 0.7, 0.7]
    assert [ema_decay(n, 0.25, warmup=True) for n in (1, 2, 50)] == [0.25, 0.25, 0.25]  # the authors' default
    assert ema_decay(1, 0.7, warmup=False) == 0.7


def test_three_updates_equal_the_closed_form():
    """d = 0.5, slow_0 = 0, fast = 1, 2, 4: d(d(d·0 + ½·1) + ½·2) + ½·4 = 2.625 = (1 − d) Σ d^{k−i} f_i
    = ½ (¼·1 + ½·2 + 1·4)."""
    slow = {"w": torch.zeros(2)}
    for f in (1.0, 2.0, 4.0):
        ema_update(slow, {"w": torch.full((2,), f)}, 0.5)
    assert slow["w"].tolist() == [2.625, 2.625]


def test_consistency_loss_by_hand():
    """fast = (1, 3), slow = (2, 2): mse = (1 + 1) / 2 = 1; one-sided = (max(2 − 1, 0)² + max(2 − 3, 0)²) / 2 = 0.5,
    whose gradient (−1, 0) only pulls the entry below the slow value up."""
    fast = torch.tensor([[1.0, 3.0]], requires_grad=True)
    slow = torch.tensor([[2.0, 2.0]])
    assert consistency_loss(fast, slow, "mse").item() == 1.0
    one_sided = consistency_loss(fast, slow, "one_sided")
    assert one_sided.item() == 0.5
    one_sided.backward()
    assert fast.grad.tolist() == [[-1.0, 0.0]]


def test_optimizer_steps_counts_applied_steps():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert optimizer_steps(opt) == 0 and optimizer_steps(None) == 0
    for expected in (1, 2):
        p.grad = torch.ones(2)
        opt.step()
        assert optimizer_steps(opt) == expected


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"decay": 1.0}, "decay"),
        ({"lam": -1}, "lam"),
        ({"consistency": "l1"}, "consistency"),
        ({"stages": []}, "stages"),
    ],
)
def test_bad_kwargs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "ema", **kwargs})


# ----- the EMA through the real loop -----------------------------------------------------------------------------
class _Spy(Plugin):
    """Records the adapter at every ``after_backward`` (= the weights after the previous applied step) and at
    ``after_stage`` (the final weights). Runs after the EMA plugin."""

    name = "spy"

    def __init__(self):
        self.seen: list[dict[str, torch.Tensor]] = []
        self.final: dict[str, torch.Tensor] = {}

    def after_backward(self, ctx):
        self.seen.append(lora_state(ctx.model))

    def after_stage(self, ctx):
        self.final = lora_state(ctx.model)


def _train(tmp_path, plugins, max_steps):
    from lifealign.data.sources import load_stream
    from lifealign.engine.experiment import load_base_with_adapter, make_accelerator
    from lifealign.losses import bind_losses
    from lifealign.training.loop import StageContext, StagePlan, train_task

    cfg = tiny_config(tmp_path, n_tasks=1)
    torch.manual_seed(0)
    model, tokenizer = load_base_with_adapter(cfg)
    perturb_lora_b(model, seed=1)  # a non-zero start, so slow_0 matters
    start = lora_state(model)
    task = load_stream(cfg.tasks, cfg.data, seed=0)[0]
    examples = tokenize_pairs(task.train, tokenizer, cfg.data).examples
    loss = bind_losses(cfg.method.loss)
    stage = StageContext(
        model=model,
        tokenizer=tokenizer,
        accelerator=make_accelerator(cfg),
        train=cfg.train,
        data=cfg.data,
        loss=loss,
        plugins=plugins,
        metrics=lambda record: None,
        commit=lambda loop: None,
    )
    ctx = PluginContext(model=model, tokenizer=tokenizer, task=task, task_index=0)
    plan = StagePlan(0, task, "pref", loss, lr=1e-2, epochs=1.0, max_steps=max_steps)
    result = train_task(model, examples, plan, stage, ctx)
    return model, ctx, start, result


def test_after_k_loop_steps_the_slow_weights_equal_the_closed_form_and_a_skipped_step_moves_nothing(
    tmp_path, monkeypatch
):
    """Four planned steps, step 2 (index 1) skipped for a NaN loss: three applied steps, so
    slow_3 = d³ slow_0 + (1 − d)(d² f_1 + d f_2 + f_3) with f_i the weights after the i-th applied step."""
    monkeypatch.setenv("LIFEALIGN_FAULT", "nan:point=loss,step=1")
    d = 0.6
    ema, spy = EMAPlugin(decay=d, warmup=False, lam=0.0), _Spy()
    model, ctx, start, result = _train(tmp_path, [ema, spy], max_steps=4)
    assert result.nonfinite_skipped == 1 and ema.task_updates == 3
    # after_backward ran at steps 0, 2, 3: it saw the start, f_1 (step 1 moved nothing) and f_2; then the final f_3
    assert all(torch.equal(spy.seen[0][k], v) for k, v in start.items())
    f1, f2, f3 = spy.seen[1], spy.seen[2], spy.final
    for name, s0 in start.items():
        expected = d**3 * s0.double() + (1 - d) * (d**2 * f1[name].double() + d * f2[name].double() + f3[name].double())
        torch.testing.assert_close(ema.slow[name].double(), expected, atol=1e-7, rtol=1e-6)
        assert not torch.allclose(ema.slow[name], f3[name])  # the slow copy lags
    ema.after_task(ctx)  # written into the adapter: evaluation and the next task use it
    assert all(torch.equal(v, ema.slow[k]) for k, v in lora_state(model).items())
    report = ema.report()
    assert report["updates"] == 3 and report["tasks"][0]["fast_slow_distance"] > 0


def test_warmup_and_an_unconfigured_stage(tmp_path):
    """With the warm-up and decay 0.9 the three updates use d = 1/2, 2/3, 3/4; an SFT-only plugin leaves a
    preference stage and the adapter untouched."""
    ema, spy = EMAPlugin(decay=0.9, lam=0.0), _Spy()
    model, ctx, start, _ = _train(tmp_path / "a", [ema, spy], max_steps=3)
    f1, f2, f3 = spy.seen[1], spy.seen[2], spy.final
    for name, s0 in start.items():
        s = 0.5 * s0.double() + 0.5 * f1[name].double()
        s = 2 / 3 * s + 1 / 3 * f2[name].double()
        s = 3 / 4 * s + 1 / 4 * f3[name].double()
        torch.testing.assert_close(ema.slow[name].double(), s, atol=1e-7, rtol=1e-6)

    sft_only = EMAPlugin(stages=("sft",))
    model, ctx, _, _ = _train(tmp_path / "b", [sft_only], max_steps=2)
    trained = lora_state(model)
    sft_only.after_task(ctx)
    assert sft_only.slow is None and all(torch.equal(v, trained[k]) for k, v in lora_state(model).items())


# ----- the consistency term on the tiny model ---------------------------------------------------------------------
PAIRS = [
    PreferencePair(prompt=f"Capital of {c}?", chosen=a, rejected=b, id=c)
    for c, a, b in [("France", "Paris", "Lyon"), ("Italy", "Rome", "Milan"), ("Peru", "Lima", "Cusco")]
]


@pytest.mark.parametrize("form", ["mse", "one_sided"])
def test_consistency_term_is_zero_at_the_slow_copy_then_matches_the_last_hidden_states(tiny_lora_model, tmp_path, form):
    import copy

    model, tokenizer = tiny_lora_model
    cfg = tiny_config(tmp_path)
    batch = collate_pairs(tokenize_pairs(PAIRS, tokenizer, cfg.data).examples, tokenizer.pad_token_id)
    perturb_lora_b(model, seed=1)
    ctx = PluginContext(model=model, tokenizer=tokenizer, task=Task("t1", PAIRS), task_index=1, stage="pref")
    plugin = EMAPlugin(lam=0.5, consistency=form)
    plugin.before_stage(ctx)  # the slow copy starts at this adapter
    zero = plugin.extra_loss(ctx, batch, {"policy": batch_logps(model, batch)})
    assert zero.item() == 0.0

    slow_model = copy.deepcopy(model)
    perturb_lora_b(model, seed=2)
    term = plugin.extra_loss(ctx, batch, {"policy": batch_logps(model, batch)})

    def last_hidden(m):  # independent: the decoder's output (after the final norm), non-padding positions
        out = m.get_base_model().model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state[batch["attention_mask"].bool()]

    with torch.no_grad():
        slow = last_hidden(slow_model)
    gap = last_hidden(model) - slow
    if form == "one_sided":
        gap = gap.clamp_max(0)
    assert term.item() == pytest.approx(0.5 * gap.pow(2).mean().item(), rel=1e-5) and term.item() > 0
    term.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)
    plugin.after_stage(ctx)
    assert plugin._handle is None
    ctx.task_index = 0  # no consistency term during the first task
    plugin.slow_task = None
    plugin.before_stage(ctx)
    assert plugin.extra_loss(ctx, batch, {"policy": batch_logps(model, batch)}) is None


def test_state_round_trip(tiny_lora_model):
    model, tokenizer = tiny_lora_model
    plugin = EMAPlugin()
    ctx = PluginContext(model=model, tokenizer=tokenizer, task=Task("t", []), task_index=2, stage="sft")
    plugin.before_stage(ctx)
    plugin.task_updates, plugin.total_updates, plugin.synced_steps = 3, 7, 3
    state = plugin.state_dict()
    json.dumps(state["meta"])
    restored = EMAPlugin()
    restored.load_state_dict(state)
    assert (restored.slow_task, restored.following, restored.synced_steps) == (2, (2, "sft"), 3)
    assert restored.report() == plugin.report()
    assert all(torch.equal(restored.slow[k], v) for k, v in plugin.slow.items())
    plugin.close()


# ----- end to end ------------------------------------------------------------------------------------------------
def _cfg(out, tasks):
    return tiny_config(
        out,
        tasks=tasks,
        train={"max_steps": 4, "save_every": 2},
        method={
            "name": "ema",
            "loss": {"name": "dpo"},
            "plugins": [{"name": "replay", "buffer_size": 100, "fraction": 0.5}, {"name": "ema", "decay": 0.5}],
        },
        eval={"scorers": ["pref_acc"], "max_examples": 4},
    )


@pytest.mark.slow
def test_end_to_end_interrupted_mid_stage_resumes_to_the_same_slow_adapter_and_scores(tmp_path, monkeypatch):
    """Interrupted at task 1's step 4, after the step-2 checkpoint: the checkpoint holds the EMA one update behind
    the weights (the update of step 2 is applied at the next hook), and the resumed run ends bit-identical."""
    from safetensors.torch import load_file

    import lifealign.training.loop as loop_module
    from lifealign.engine.experiment import run_experiment
    from lifealign.training.metrics import read_metrics

    tasks = synthetic_tasks(2, max_train=8, max_test=4)
    reference = run_experiment(_cfg(tmp_path / "a", tasks), report=False)

    class Interrupt(RuntimeError):
        pass

    def fault(point, **where):
        if point == "step" and (where["task"], where["stage"], where["step"]) == (1, "pref", 3):
            raise Interrupt
        return False

    monkeypatch.setattr(loop_module, "maybe_fault", fault)
    with pytest.raises(Interrupt):
        run_experiment(_cfg(tmp_path / "b", tasks), report=False)
    monkeypatch.undo()
    resumed = run_experiment(_cfg(tmp_path / "b", tasks), resume=True, report=False)
    assert json.dumps(resumed, sort_keys=True) == json.dumps(reference, sort_keys=True)
    saved = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    first = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == first.keys() and all(torch.equal(saved[k], first[k]) for k in saved)
    info = json.loads((tmp_path / "b" / "run" / "run_info.json").read_text())["memory"]["ema"]
    assert info["updates"] == 8 and [t["updates"] for t in info["tasks"]] == [4, 4]
    assert info["tasks"][0]["consistency_mean"] is None and info["tasks"][1]["consistency_mean"] > 0
    steps = [r for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if r["event"] == "step"]
    assert [("loss/ema" in r) for r in steps] == [False] * 4 + [True] * 4
