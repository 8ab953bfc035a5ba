"""PPO for RLHF (notes 7.1): KL-shaped rewards, GAE and the clipped actor / critic losses against values worked
out by hand, the gradient vanishing exactly where the clip binds, ratio ≡ 1 on the first mini-batch, frozen
reference and reward roles, and a seeded run that raises the mean verifiable reward on held-out prompts."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllm.train.loop import TrainConfig
from tinyllm.train.ppo import (
    ActorCritic,
    PPOConfig,
    PPOSettings,
    PPOTask,
    actor_loss,
    compute_rewards,
    critic_loss,
    gae,
    ppo_train,
)
from tinyllm.train.reward import RewardModel
from tinyllm.train.rl_common import (
    RLPrompt,
    evaluate_reward,
    frozen_copy,
    parameter_fingerprint,
    reward_model_reward,
    verifiable_reward,
)
from tinyllm.train.tasks_arith import (
    CharTokenizer,
    add_zero_problems,
    sft_warmup,
    split_problems,
    tiny_policy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compute_rewards_by_hand() -> None:
    # row 0: three response tokens, score 7 → clipped to 5 at the last one
    #   −0.1·(−1.0 − −1.2) = −0.02,  −0.1·(−2.0 − −1.5) = +0.05,  −0.1·0 + 5 = 5
    # row 1: prompt position masked, two response tokens, then padding; score −0.5 (inside the clip)
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.2, -1.5, -0.5, 0.0], [-0.9, -0.5, -1.5, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    r = compute_rewards(logp, ref, torch.tensor([7.0, -0.5]), mask, kl_coef=0.1, clip_reward=5.0)
    want = torch.tensor([[-0.02, 0.05, 5.0, 0.0], [0.0, 0.05, -0.05 - 0.5, 0.0]])
    torch.testing.assert_close(r, want)


def test_gae_by_hand() -> None:
    # γ = 1, λ = 0.95; row 0: r = [0, 0, 1], V = [0.5, 0.4, 0.6]
    #   δ2 = 1 + 0 − 0.6 = 0.4            A2 = 0.4
    #   δ1 = 0 + 0.6 − 0.4 = 0.2          A1 = 0.2 + 0.95·0.4 = 0.58
    #   δ0 = 0 + 0.4 − 0.5 = −0.1         A0 = −0.1 + 0.95·0.58 = 0.451
    # row 1 (last position is padding: its V 0.7 must not leak): r = [0, 2], V = [1.0, 0.5]
    #   δ1 = 2 + 0 − 0.5 = 1.5            A1 = 1.5
    #   δ0 = 0 + 0.5 − 1.0 = −0.5         A0 = −0.5 + 0.95·1.5 = 0.925
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.4, 0.6], [1.0, 0.5, 0.7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.451, 0.58, 0.4], [0.925, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.951, 0.98, 1.0], [1.925, 2.0, 0.0]]))


def test_gae_limits() -> None:
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6)
    # λ = 0: A_t = δ_t
    adv, _ = gae(r, v, mask, gamma=0.9, lam=0.0)
    nxt = torch.cat([v[:, 1:], torch.zeros(3, 1)], 1)
    torch.testing.assert_close(adv, r + 0.9 * nxt - v)
    # λ = 1: A_t = Σ_k γ^k r_{t+k} − V_t (Monte-Carlo return minus the baseline)
    adv, ret = gae(r, v, mask, gamma=0.9, lam=1.0)
    mc = torch.stack([sum(0.9**k * r[:, t + k] for k in range(6 - t)) for t in range(6)], 1)
    torch.testing.assert_close(adv, mc - v, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, mc, atol=1e-5, rtol=0)


def test_actor_loss_by_hand_and_clipped_gradients() -> None:
    # A = [1, −1, 1, 1], ratio = [1.5, 0.5, 1.0, 0.5], ε = 0.2:
    #   t0: max(−1.5, −1.2) = −1.2 (clipped: A > 0 and ratio > 1.2 → no gradient)
    #   t1: max(0.5, 0.8) = 0.8    (clipped: A < 0 and ratio < 0.8 → no gradient)
    #   t2: −1.0                    (ratio 1: −A)
    #   t3: max(−0.5, −0.8) = −0.5  (ratio < 0.8 but A > 0: the unclipped branch, gradient flows)
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, info = actor_loss(logp[None], old[None], adv[None], torch.ones(1, 4), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.0 - 0.5) / 4)
    assert info["clipfrac"] == pytest.approx(0.5)
    loss.backward()
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    assert logp.grad[2] == pytest.approx(-1.0 / 4) and logp.grad[3] == pytest.approx(-0.5 / 4)
    # at ratio 1 the loss is −mean(A)
    a = torch.tensor([[0.3, -1.2, 2.0]])
    loss, _ = actor_loss(torch.zeros(1, 3), torch.zeros(1, 3), a, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-a.mean().item())


def test_critic_loss_by_hand() -> None:
    # V = [1.0, 0.0], V_old = [0.5, 0.1], R = [2.0, 0.05], clip 0.2:
    #   t0: V_clip = 0.7; max((1 − 2)², (0.7 − 2)²) = 1.69
    #   t1: V_clip = 0.0; (0 − 0.05)² = 0.0025
    #   loss = 0.5 · (1.69 + 0.0025) / 2 = 0.423125
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = critic_loss(v, torch.tensor([[0.5, 0.1]]), torch.tensor([[2.0, 0.05]]), torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.423125)
    loss.backward()
    assert v.grad[0, 0] == 0  # the clipped branch dominates: no gradient to V
    assert v.grad[0, 1] == pytest.approx(0.5 * 2 * (0.0 - 0.05) / 2)


def test_sequence_reward_equals_sum_of_token_rewards() -> None:
    # notes 7.2.b: r(x, y) − β(log π(y|x) − log π_ref(y|x)) = Σ_t per-token rewards (score inside the clip)
    g = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(2, 5, generator=g), -torch.rand(2, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    score = torch.tensor([1.5, -2.0])
    r = compute_rewards(logp, ref, score, mask, kl_coef=0.1)
    seq = score - 0.1 * ((logp - ref) * mask).sum(-1)
    torch.testing.assert_close(r.sum(-1), seq)


def _setup(seed: int = 0):
    tok = CharTokenizer()
    train_p, held_p = split_problems(add_zero_problems(), 20, seed=0)
    policy = tiny_policy(tok, hidden_size=32, seed=seed)
    sft_warmup(policy, tok, train_p, 40, lr=1e-2, batch_size=32, seed=seed)

    def enc(ps):
        return [RLPrompt(tuple(tok.encode(p.prompt)), p) for p in ps]

    return tok, policy, enc(train_p), enc(held_p)


def _cfg(tmp_path, steps: int, lr: float = 3e-3) -> TrainConfig:
    return TrainConfig(out_dir=str(tmp_path), max_steps=steps, batch_size=32, lr=lr, min_lr=lr, warmup_steps=0,
                       weight_decay=0.0, eval_interval=0, eval_steps=0, save_interval=0, progress=False,
                       device="cpu", seed=0)


def test_first_minibatch_ratio_is_one_and_frozen_roles(tmp_path) -> None:
    tok, policy, train_p, _ = _setup()
    rm = RewardModel(frozen_copy(policy)).eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    reward_fn = reward_model_reward(rm, tok.pad_token_id)
    settings = PPOSettings(rollout_batch_size=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=3)
    ref = frozen_copy(policy)
    model = ActorCritic(policy)
    task = PPOTask(ref, reward_fn, train_p, settings, [tok.eos_token_id], tok.pad_token_id).bind(model)
    batch = next(task.train_batches())
    _, info = task.loss(model, batch)
    assert info["approx_kl"] == 0.0 and info["clipfrac"] == 0.0  # ratio ≡ 1 exactly
    ref_before, rm_before = parameter_fingerprint(ref), parameter_fingerprint(rm)
    actor_before = parameter_fingerprint(policy)
    from tinyllm.train.loop import train

    train(model, task, _cfg(tmp_path, 3))
    assert parameter_fingerprint(ref) == ref_before and parameter_fingerprint(rm) == rm_before
    assert parameter_fingerprint(policy) != actor_before
    assert (tmp_path / "checkpoints" / "step-000003" / "critic.safetensors").exists()


def test_ppo_raises_heldout_reward(tmp_path) -> None:
    tok, policy, train_p, held_p = _setup()
    reward_fn = verifiable_reward(tok.decode)
    stops, pad = [tok.eos_token_id], tok.pad_token_id

    def score() -> float:
        return evaluate_reward(policy, held_p, reward_fn, n=8, max_new_tokens=3, stop_ids=stops, pad_id=pad)

    before = score()
    settings = PPOSettings(rollout_batch_size=64, mini_batch_size=32, ppo_epochs=2, max_new_tokens=3)
    _, result, history = ppo_train(policy, reward_fn, train_p, settings, _cfg(tmp_path, 40), stops, pad)
    after = score()
    assert len(history) == 10 and result.step == 40
    assert after > before + 0.15, (before, after)
    assert all(math.isfinite(h["kl"]) for h in history)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="init_from"):
        PPOConfig()
    with pytest.raises(ValueError, match="rollout_batch_size=10"):
        PPOConfig(init_from="x", rollout_batch_size=10, batch_size=4)
    with pytest.raises(ValueError, match="reward-model"):
        PPOConfig(init_from="x", task="builtin:title")
    c = PPOConfig(init_from="x")
    assert (c.kl_coef, c.clip_reward, c.gamma, c.lam, c.cliprange, c.cliprange_value) == (0.1, 5.0, 1.0, 0.95,
                                                                                         0.2, 0.2)
