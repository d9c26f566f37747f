"""Oracle: our sequence_logps + DPO-family losses against trl 1.16's DPOTrainer on the same tiny model and batch.

trl computes per-token log-probs with its own fused LM head (no full logits) and its own loss code
(``DPOTrainer._compute_loss``); we compute full logits, ``sequence_logps`` and our loss functions. Only the batch
(trl's tokenisation and collation) is shared. The trainer's loss settings (``loss_types``, ``beta``, ...) are
attributes read by ``_compute_loss`` on every call, so one trainer serves every loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lifealign.losses import LOSSES, BoundLoss, CombinedLoss
from lifealign.losses.dpo import dpo_loss
from lifealign.losses.hinge import hinge_loss
from lifealign.losses.ipo import ipo_loss
from lifealign.losses.logps import sequence_logps
from lifealign.losses.spec import LossInputs

trl = pytest.importorskip("trl")  # a dev extra (pyproject [dev])
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 300
BETA = 0.5
# Pairs 0 and 1 have chosen responses of equal length (for trl's batch-token-mean SFT term); pair 2 differs.
PAIRS = {
    "prompt": ["w5 w17 w3 w99", "w8 w9", "w250 w4 w77"],
    "chosen": [" w10 w11", " w12 w13", " w30 w31 w32 w33"],
    "rejected": [" w20", " w21 w22 w23 w24", " w40 w41"],
}


def word_tokenizer() -> Any:
    """A whitespace word-level tokenizer: ``w<i>`` -> id i; ids 0-2 are pad, eos, unk."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # logits with std ~1
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return transformers.LlamaForCausalLM(config).eval()


@dataclass
class Oracle:
    trainer: Any
    policy: Any  # our untouched copies (trl patches its models' forward)
    reference: Any
    batch: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Oracle:
    policy, reference = tiny_llama(0), tiny_llama(1)
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        beta=BETA,
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_length=None,
        gradient_checkpointing=False,
        per_device_train_batch_size=3,
    )
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRS),
        processing_class=word_tokenizer(),
    )
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS["prompt"]))]
    return Oracle(trainer, policy, reference, trainer.data_collator(rows))


def select_pairs(batch: dict[str, torch.Tensor], pairs: list[int]) -> dict[str, torch.Tensor]:
    """Rows of the given pairs from a side-major [chosen..., rejected...] batch."""
    n_pairs = batch["input_ids"].shape[0] // 2
    rows = torch.tensor(pairs + [n_pairs + i for i in pairs])
    return {k: v[rows] for k, v in batch.items()}


def our_inputs(o: Oracle, batch: dict[str, torch.Tensor]) -> LossInputs:
    with torch.no_grad():
        policy_logits = o.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logits = o.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, n_tokens = sequence_logps(policy_logits, batch["input_ids"], batch["completion_mask"])
    ref_logps, _ = sequence_logps(ref_logits, batch["input_ids"], batch["completion_mask"])
    (chosen, rejected), (n_chosen, n_rejected) = logps.chunk(2), n_tokens.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    return LossInputs(chosen, rejected, n_chosen, n_rejected, ref_chosen, ref_rejected)


def trl_loss(
    o: Oracle,
    batch: dict[str, torch.Tensor],
    loss_types: list[str],
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """trl's batch loss and the metrics it logged for this call."""
    trainer = o.trainer
    trainer.beta, trainer.label_smoothing = BETA, label_smoothing
    trainer.loss_types, trainer.loss_weights = loss_types, loss_weights or [1.0] * len(loss_types)
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[-1] for k, v in trainer._metrics[mode].items()}


def close(ours: torch.Tensor | float, theirs: torch.Tensor | float) -> None:
    torch.testing.assert_close(torch.as_tensor(ours).double(), torch.as_tensor(theirs).double(), atol=1e-5, rtol=1e-5)


def test_sequence_logps_match_trl_per_sequence(oracle):
    """trl's ``compute_ref_log_probs`` sums its fused-head per-token log-probs over the completion mask."""
    ours = our_inputs(oracle, oracle.batch)
    with torch.no_grad():
        trl_chosen, trl_rejected = oracle.trainer.compute_ref_log_probs(oracle.trainer.model, oracle.batch)
        trl_ref_chosen, trl_ref_rejected = oracle.trainer.compute_ref_log_probs(oracle.trainer.ref_model, oracle.batch)
    close(ours.chosen_logps, trl_chosen)
    close(ours.rejected_logps, trl_rejected)
    close(ours.ref_chosen_logps, trl_ref_chosen)
    close(ours.ref_rejected_logps, trl_ref_rejected)
    assert ours.chosen_tokens.tolist() == [3, 3, 5] and ours.rejected_tokens.tolist() == [2, 5, 3]  # + EOS


def test_dpo_loss_and_rewards_match_trl_sigmoid(oracle):
    ours = dpo_loss(our_inputs(oracle, oracle.batch), beta=BETA)
    loss, metrics = trl_loss(oracle, oracle.batch, ["sigmoid"])
    assert abs(loss.item() - math.log(2)) > 1e-2, "policy and reference too close for a sensitive comparison"
    close(ours.losses.mean(), loss)
    close(ours.chosen_rewards.mean(), metrics["rewards/chosen"])
    close(ours.rejected_rewards.mean(), metrics["rewards/rejected"])
    close((ours.chosen_rewards - ours.rejected_rewards).mean(), metrics["rewards/margins"])


@pytest.mark.parametrize(("loss_fn", "trl_name"), [(ipo_loss, "ipo"), (hinge_loss, "hinge")])
def test_ipo_and_hinge_match_trl(oracle, loss_fn, trl_name):
    ours = loss_fn(our_inputs(oracle, oracle.batch), beta=BETA)
    loss, _ = trl_loss(oracle, oracle.batch, [trl_name])
    assert loss.item() > 1e-3
    close(ours.losses.mean(), loss)


@pytest.mark.parametrize("pair", [0, 1, 2])
def test_label_smoothing_matches_trl_conservative_form(oracle, pair):
    """trl 1.16 keeps the cDPO form in ``aot``, which sorts log-ratios over the batch: the identity for one pair."""
    batch = select_pairs(oracle.batch, [pair])
    ours = dpo_loss(our_inputs(oracle, batch), beta=BETA, label_smoothing=0.2)
    loss, _ = trl_loss(oracle, batch, ["aot"], label_smoothing=0.2)
    close(ours.losses.mean(), loss)


def test_combined_dpo_plus_sft_matches_trl_loss_weights(oracle):
    """trl's ``sft`` averages NLL over all chosen tokens of the batch; ours per sequence: equal for equal lengths."""
    batch = select_pairs(oracle.batch, [0, 1])
    combined = CombinedLoss(
        [BoundLoss("dpo", LOSSES["dpo"], 1.0, {"beta": BETA}), BoundLoss("sft", LOSSES["sft"], 0.1, {})]
    )
    total, _, _ = combined(our_inputs(oracle, batch))
    loss, _ = trl_loss(oracle, batch, ["sigmoid", "sft"], [1.0, 0.1])
    close(total, loss)


def test_bf16_autocast_logps_stay_close_to_fp32(oracle):
    """Tolerance: 1e-2 nats per response token (measured ~4e-3 on this model: bf16 matmuls, logits std ~1).

    The log-softmax itself runs in fp32 (exactly checked in test_logps.py); the gap is the bf16 forward.
    """
    batch = oracle.batch
    with torch.no_grad():
        fp32_logits = oracle.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logits = oracle.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            bf16_logps, n_tokens = sequence_logps(bf16_logits, batch["input_ids"], batch["completion_mask"])
    fp32_logps, _ = sequence_logps(fp32_logits, batch["input_ids"], batch["completion_mask"])
    assert bf16_logits.dtype == torch.bfloat16 and bf16_logps.dtype == torch.float32
    per_token_gap = (bf16_logps - fp32_logps).abs() / n_tokens
    assert per_token_gap.max().item() < 1e-2
    assert per_token_gap.max().item() > 0  # the bf16 forward did run in bf16
