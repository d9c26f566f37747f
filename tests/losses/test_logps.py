"""sequence_logps / token_logps / implicit_reward on hand-built logits."""

import math

import pytest
import torch

from lifealign.losses.logps import implicit_reward, sequence_logps, token_logps

LN2, LN3 = math.log(2), math.log(3)


def favour_position_logits(n_rows: int, seq_len: int, vocab: int = 3) -> torch.Tensor:
    """logits[:, t] = ln 2 at index t % vocab, else 0: softmax gives 1/2 to the favoured token, 1/4 to the others."""
    logits = torch.zeros(n_rows, seq_len, vocab)
    for t in range(seq_len):
        logits[:, t, t % vocab] = LN2
    return logits


def test_uniform_logits_give_minus_ln_vocab_per_response_token():
    """Zero logits over V = 3: every token has log-prob -ln 3, so the sum is -n ln 3 over the n response tokens.

    Row 0 mask [0,0,1,1] -> n = 2, -2 ln 3; row 1 mask [0,1,1,0] (right padding) -> n = 2, -2 ln 3;
    row 2 mask [0,1,1,1] -> -3 ln 3.
    """
    logits = torch.zeros(3, 4, 3)
    ids = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 0], [2, 0, 1, 2]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1]])
    logps, n = sequence_logps(logits, ids, mask)
    torch.testing.assert_close(logps, torch.tensor([-2 * LN3, -2 * LN3, -3 * LN3]))
    assert n.tolist() == [2, 2, 3]
    assert logps.dtype == torch.float32 and n.dtype == torch.int64


def test_logits_at_t_minus_1_score_the_token_at_t():
    """Position t favours token t % 3 (prob 1/2; others 1/4). ids [2, 0, 2, 2], mask [0, 1, 1, 1]:

    token 0 at t=1 is scored by position 0 (favours 0): ln 1/2; token 2 at t=2 by position 1 (favours 1): ln 1/4;
    token 2 at t=3 by position 2 (favours 2): ln 1/2. Sum -4 ln 2. Without the shift it would be -5 ln 2.
    """
    logps, n = sequence_logps(favour_position_logits(1, 4), torch.tensor([[2, 0, 2, 2]]), torch.tensor([[0, 1, 1, 1]]))
    torch.testing.assert_close(logps, torch.tensor([-4 * LN2]))
    assert n.tolist() == [3]


def test_response_token_at_position_zero_has_no_prediction_and_is_not_counted():
    logps, n = sequence_logps(torch.zeros(1, 3, 3), torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]))
    assert n.tolist() == [1]
    torch.testing.assert_close(logps, torch.tensor([-LN3]))


def test_non_finite_logits_outside_the_response_do_not_leak():
    """Row mask [0,1,1,0]: position 2 scores the padded token at t=3 and position 3 scores nothing; NaN/inf there."""
    logits = torch.zeros(1, 4, 3)
    logits[0, 2] = float("nan")
    logits[0, 3] = float("inf")
    logps, _ = sequence_logps(logits, torch.tensor([[0, 1, 2, 0]]), torch.tensor([[0, 1, 1, 0]]))
    torch.testing.assert_close(logps, torch.tensor([-2 * LN3]))


def test_bf16_logits_are_reduced_in_fp32_exactly_like_their_fp32_upcast():
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 6, 50)).bfloat16()
    ids = torch.randint(0, 50, (4, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]] * 4)
    low, _ = sequence_logps(logits, ids, mask)
    ref, _ = sequence_logps(logits.float(), ids, mask)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=1e-6, rtol=1e-6)


def test_bf16_gradient_through_checkpointed_rows_matches_fp32_gradient():
    """The bf16 path recomputes the fp32 upcast in backward; its gradient is the fp32 one rounded to bf16."""
    torch.manual_seed(1)
    base = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    low = base.bfloat16().requires_grad_()
    sequence_logps(low, ids, mask)[0].sum().backward()
    full = base.bfloat16().float().requires_grad_()
    sequence_logps(full, ids, mask)[0].sum().backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), full.grad, atol=1e-2, rtol=1e-2)
    assert full.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_fp32_under_bf16_autocast_stays_fp32():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 9)
    ids = torch.randint(0, 9, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.long)
    expected, _ = sequence_logps(logits, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = sequence_logps(logits, ids, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_token_logps_gradient_is_softmax_minus_onehot_fp64():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3))
    assert torch.autograd.gradcheck(lambda z: token_logps(z, labels), (logits,))
    assert token_logps(logits, labels).dtype == torch.float64


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_implicit_reward_is_beta_times_log_ratio(beta):
    """beta (logp - ref): logp [-1, -5], ref [-2, -5] -> [beta, 0]."""
    got = implicit_reward(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -5.0]), beta)
    torch.testing.assert_close(got, torch.tensor([beta, 0.0]))
