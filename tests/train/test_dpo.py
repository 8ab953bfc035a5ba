"""DPO / IPO: the loss equals TRL 1.16's DPOTrainer loss on the same log-probs (sigmoid, ipo, hinge, robust,
and cDPO label smoothing), log 2 at π = π_ref, the gradient raises the chosen and lowers the rejected response,
sequence log-probs count response tokens only, and a short run raises held-out preference accuracy and margin."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tinyllm.data.preference import TokenPair
from tinyllm.train.dpo import DPOConfig, DPOTask, attach_reference, dpo_loss, dpo_metrics, pair_logprobs
from tinyllm.train.loop import TrainConfig, train
from tinyllm.train.rl_common import collate_pairs, frozen_copy
from tinyllm.train.tasks_arith import CharTokenizer, single_digit_additions, split_problems, tiny_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def _trl_dpo_loss(pc, pr, rc, rr, completion_mask, beta, loss_type, label_smoothing=0.0):
    """TRL 1.16 DPOTrainer._compute_loss run on given sequence log-probs: a stand-in model returns per-token
    log-probs whose sums are pc/pr (zeros off the completion, as TRL's fused head gives for label −100)."""
    trl = pytest.importorskip("trl", reason="trl is the DPO reference")
    from trl.trainer.dpo_trainer import DPOTrainer

    b, t = completion_mask.shape[0] // 2, completion_mask.shape[1]
    shift = completion_mask[:, 1:].float()
    per_token = shift / shift.sum(1, keepdim=True) * torch.cat([pc, pr])[:, None]

    def model(**kwargs):
        z = torch.zeros(2 * b, t - 1)
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=trl.DPOConfig.__dataclass_fields__["f_divergence_type"].default,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * b, t, dtype=torch.long), "attention_mask": torch.ones(2 * b, t),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(fake, model, inputs, False)


def _random_case(b=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-10 * torch.rand(b, generator=g) - 1 for _ in range(4))
    mask = torch.zeros(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[i, start:end] = 1
    return pc, pr, rc, rr, mask


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0),
                                                ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0), ("robust", 0.1, 0.1)])
def test_loss_equals_trl(loss_type, beta, eps) -> None:
    pc, pr, rc, rr, mask = _random_case()
    lc, lr = mask.sum(1).chunk(2)
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, lc, lr)
    theirs = _trl_dpo_loss(pc, pr, rc, rr, mask, beta, loss_type, eps)
    torch.testing.assert_close(ours.mean(), theirs, atol=1e-6, rtol=1e-6)


def test_cdpo_label_smoothing_mixes_both_directions() -> None:
    # TRL 1.16's "sigmoid" no longer applies label_smoothing; cDPO is the mixture of the loss on the pair
    # and on the flipped pair, both taken from TRL
    pc, pr, rc, rr, mask = _random_case(seed=1)
    lc, lr = mask.sum(1).chunk(2)
    eps = 0.2
    ours, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", eps, lc, lr)
    swap = torch.cat(mask.chunk(2)[::-1])
    fwd = _trl_dpo_loss(pc, pr, rc, rr, mask, 0.1, "sigmoid")
    flipped = _trl_dpo_loss(pr, pc, rr, rc, swap, 0.1, "sigmoid")
    torch.testing.assert_close(ours.mean(), (1 - eps) * fwd + eps * flipped, atol=1e-6, rtol=1e-6)


def test_worked_values() -> None:
    # policy == reference: every log-ratio is 0 → loss = log 2, rewards 0
    z = torch.tensor([-3.0, -7.5])
    loss, rc, rr = dpo_loss(z, z - 1, z, z - 1)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    assert rc.abs().max() == 0 and rr.abs().max() == 0
    # ρ_c = +2, ρ_r = −3, β = 0.1: Δ = 5, loss = −log σ(0.5) = 0.474077
    loss, rc, rr = dpo_loss(torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]),
                            torch.tensor([-10.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.2, -0.3))
    # IPO with one-token responses: (Δ − 1/(2β))² = (5 − 5)² = 0 — IPO's target margin
    loss, _, _ = dpo_loss(torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]), torch.tensor([-10.0]),
                          0.1, "ipo", 0.0, torch.tensor([1]), torch.tensor([1]))
    assert loss.item() == pytest.approx(0.0, abs=1e-9)


def test_gradient_raises_chosen_lowers_rejected() -> None:
    pc = torch.tensor([-5.0, -2.0], requires_grad=True)
    pr = torch.tensor([-4.0, -6.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-5.0, -3.0]), torch.tensor([-4.0, -5.0]))
    loss.mean().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log π(y_c), lowers log π(y_r)


def test_bad_settings() -> None:
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type='kto'"):
        dpo_loss(z, z, z, z, loss_type="kto")
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(z, z, z, z, beta=0)
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(z, z, z, z, loss_type="ipo")
    with pytest.raises(ValueError, match=r"label_smoothing=0\.5"):
        DPOConfig(init_from="x", label_smoothing=0.5)
    with pytest.raises(ValueError, match="init_from"):
        DPOConfig()


def test_pair_logprobs_count_response_tokens_only() -> None:
    tok = CharTokenizer()
    model = tiny_policy(tok, seed=1).eval()
    pairs = [TokenPair([1, 2, 3], [4, 5], [6]), TokenPair([7], [8, 9, 10], [11, 12])]
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        pc, pr = pair_logprobs(model, batch)
        for i, (p, resp) in enumerate([(pr_.prompt, pr_.chosen) for pr_ in pairs] +
                                      [(pr_.prompt, pr_.rejected) for pr_ in pairs]):
            ids = torch.tensor([p + resp])
            logits = model(ids)[0, len(p) - 1:-1]  # positions that predict the response tokens
            want = -F.cross_entropy(logits, torch.tensor(resp), reduction="sum")
            got = (pc if i < 2 else pr)[i % 2]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _arith_pairs(tok, problems, seed):
    """chosen: the right sum; rejected: a sloppy copy of it ("8=") or a wrong sum, alternately."""
    import random

    rng = random.Random(seed)
    out = []
    for i, p in enumerate(problems):
        wrong = str((int(p.answer) + rng.randint(1, 9)) % 19)
        rej = p.answer + "=" if i % 2 else wrong
        eos = [tok.eos_token_id]
        out.append(TokenPair(tok.encode(p.prompt), tok.encode(p.answer) + eos, tok.encode(rej) + eos))
    return out


def test_dpo_raises_heldout_accuracy_and_margin(tmp_path) -> None:
    tok = CharTokenizer()
    train_p, held_p = split_problems(single_digit_additions(), 30, seed=0)
    policy = tiny_policy(tok, seed=0)
    train_pairs = attach_reference(policy, _arith_pairs(tok, train_p, 0), tok.pad_token_id)
    held = attach_reference(policy, _arith_pairs(tok, held_p, 1), tok.pad_token_id)
    ref = frozen_copy(policy)
    before = dpo_metrics(policy, held, tok.pad_token_id)
    assert before["accuracy"] == 0.0 and before["margin"] == 0.0  # π = π_ref: every implicit reward is 0
    task = DPOTask(train_pairs, held, 16, tok.pad_token_id, beta=0.1)
    train(policy, task, TrainConfig(out_dir=str(tmp_path), max_steps=25, batch_size=16, lr=3e-3, min_lr=3e-3,
                                    warmup_steps=0, weight_decay=0.0, eval_interval=0, eval_steps=0,
                                    save_interval=0, progress=False, device="cpu", seed=0))
    after = dpo_metrics(policy, held, tok.pad_token_id)
    assert after["accuracy"] >= 0.7, after
    assert after["margin"] > 0.2, after
    # (raw log-likelihood accuracy is already high here only because rejected responses are longer)
    assert after["loss"] < math.log(2) - 0.1
    # the reference role is untouched: held-out reference log-probs still equal a frozen copy's
    from tinyllm.train.dpo import reference_logprobs

    again = reference_logprobs(ref, held, tok.pad_token_id)
    want = [x for p in held for x in (p.ref_chosen, p.ref_rejected)]
    assert [x for pair in again for x in pair] == pytest.approx(want, abs=1e-5)
