"""Adapters, prefix / P-tuning v2, prompt tuning and BitFit: identity at start, training through THE loop
decreases the loss on a tiny task while the base stays bit-identical, parameter counts, KV-cache paths."""

from __future__ import annotations

import itertools

import pytest
import torch
from hf_helpers import randomize_
from torch import nn

from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model
from tinyllm.train.loop import TrainConfig, train
from tinyllm.train.peft import (
    AdapterConfig,
    BitFitConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    apply_adapters,
    apply_bitfit,
    apply_lora,
    apply_prefix_tuning,
    apply_prompt_tuning,
    remove_adapters,
    trainable_report,
)
from tinyllm.train.peft.adapter import adapter_parameter_count
from tinyllm.train.peft.prompt import prefix_parameter_count
from tinyllm.train.peft.select import changed_parameters, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)


def _model() -> nn.Module:
    """O(1)-scaled random weights (like a trained model's, unlike the 0.02 init) so every method gets signal."""
    torch.manual_seed(0)
    return randomize_(build_model(CFG)).eval()


class MemorizeTask:
    """Next-token prediction on 4 fixed random sequences (a task any method can fit a little)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        w = torch.randint(0, 97, (4, 17), generator=g)
        self.batch = (w[:, :-1], w[:, 1:])

    def train_batches(self):
        return itertools.repeat(self.batch)

    def eval_batches(self):
        return None

    def loss(self, model, batch):
        from tinyllm.train.losses import model_lm_loss

        return model_lm_loss(model, *batch), {}

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _train(adapted: nn.Module, tmp_path, steps: int = 25, lr: float = 3e-2) -> list[float]:
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=steps, batch_size=4, lr=lr, warmup_steps=0,
                      schedule="constant", weight_decay=0.0, eval_steps=0, save_interval=0, progress=False,
                      device="cpu", log_interval=steps)
    return train(PeftModel(adapted), MemorizeTask(), cfg).losses


def _base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_base_unchanged(base: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, p in base.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n  # frozen: never written to


@pytest.mark.parametrize("variant", ["sequential", "parallel"])
def test_adapters_identity_at_init_then_train_with_base_frozen(variant, tmp_path) -> None:
    m = _model()
    x = MemorizeTask().batch[0]
    ref = m(x)
    before = _base_params(m)
    apply_adapters(m, AdapterConfig(bottleneck_size=8, variant=variant, scaling=4.0 if variant == "parallel" else 1))
    assert torch.equal(m(x), ref)  # W_up = 0: the backbone's own ops plus an exact 0.0
    # notes 05.5.a: L × 2 × (2dm + d + m)
    assert trainable_report(m).trainable == adapter_parameter_count(32, 8, 2) == 2 * 2 * (2 * 32 * 8 + 32 + 8)
    losses = _train(m, tmp_path)
    assert losses[-1] < 0.6 * losses[0]
    _assert_base_unchanged(m, before)
    assert not torch.equal(m(x), ref)
    remove_adapters(m)
    assert torch.equal(m(x), ref)  # detach restores the plain backbone: the same ops on the same weights


def test_adapter_checkpoints_are_adapter_directories(tmp_path) -> None:
    m = apply_adapters(_model(), AdapterConfig(bottleneck_size=4))
    _train(m, tmp_path, steps=3)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "train_config.json", "trainable_state.safetensors",
                                                      "trainer_state.pt"]


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_trains_with_base_frozen(projection, tmp_path) -> None:
    m = _model()
    before = _base_params(m)
    cfg = PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=24)
    wrapped = apply_prefix_tuning(m, cfg)
    token_dim = 2 * 8  # H_kv · d_head
    n = prefix_parameter_count(5, 2, token_dim, 24 if projection else None)
    assert trainable_report(wrapped).trainable == n
    assert n == (5 * 2 * 2 * 16 if not projection else 5 * 16 + 16 * 24 + 24 + 24 * 64 + 64)
    losses = _train(wrapped, tmp_path, lr=0.1)
    assert losses[-1] < 0.85 * losses[0]
    _assert_base_unchanged(m, before)


def test_prefix_equals_explicit_attention_over_prefix_keys() -> None:
    """Layer 0 output with the prefix = attention of the real queries over [K^P; K] computed by hand."""
    m = _model()
    wrapped = apply_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=3))
    x = torch.randint(0, 97, (2, 6))
    attn = m.model.layers[0].self_attn
    captured = {}
    h = attn.register_forward_hook(lambda mod, args, out: captured.update(x=args[0], out=out))
    wrapped(x)
    h.remove()
    xin = captured["x"]
    pos = torch.arange(3, 9).expand(2, 6)  # real tokens sit after the prefix, as in PEFT
    cos, sin = m.model.pos.rotary(pos)
    from tinyllm.model.position import apply_rotary

    q = apply_rotary(attn.q_proj(xin).view(2, 6, 4, 8).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(xin).view(2, 6, 2, 8).transpose(1, 2), cos, sin)
    v = attn.v_proj(xin).view(2, 6, 2, 8).transpose(1, 2)
    pk, pv = wrapped.prefix_kv(2)[0]
    k, v = torch.cat([pk, k], 2).repeat_interleave(2, 1), torch.cat([pv, v], 2).repeat_interleave(2, 1)
    s = q @ k.transpose(-1, -2) / 8**0.5
    allowed = torch.ones(6, 9, dtype=torch.bool).tril(3)
    out = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32)
    torch.testing.assert_close(captured["out"], attn.o_proj(out), atol=1e-5, rtol=0)


def test_prefix_model_generates_with_a_kv_cache_like_without() -> None:
    from tinyllm.infer.kv_cache import ContiguousKVCache

    wrapped = apply_prefix_tuning(_model(), PrefixTuningConfig(num_virtual_tokens=4))
    x = torch.randint(0, 97, (1, 7))
    full = wrapped(x)
    cache = ContiguousKVCache.for_model(wrapped, 1, 16)
    steps = [wrapped(x[:, :5], cache=cache)] + [wrapped(x[:, i:i + 1], cache=cache) for i in (5, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 7  # the cache holds the real tokens only


@pytest.mark.parametrize("init", ["random", "vocab", "text"])
def test_prompt_tuning_trains_with_base_frozen(init, tmp_path) -> None:
    m = _model()
    before = _base_params(m)

    class Tok:
        def encode(self, text: str) -> list[int]:
            return [ord(c) % 97 for c in text]

    wrapped = apply_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=4, init=init, init_text="分类"), Tok())
    if init == "text":  # the text's token embeddings, repeated to P rows
        ids = [ord(c) % 97 for c in "分类分类"]
        assert torch.equal(wrapped.prompt_embeddings.detach(), m.model.embed_tokens.weight[ids])  # copied rows
    assert trainable_report(wrapped).trainable == 4 * 32  # P · d
    x = MemorizeTask().batch[0]
    assert wrapped(x).shape == (4, 16, 97)  # the virtual positions are dropped
    losses = _train(wrapped, tmp_path, lr=0.1)
    assert losses[-1] < 0.95 * losses[0]
    _assert_base_unchanged(m, before)
    plain = wrapped.remove()
    assert torch.equal(plain(x), _model()(x))  # the same seeded weights through the same ops


def test_prompt_tuning_equals_prepending_the_embeddings_by_hand() -> None:
    m = _model()
    wrapped = apply_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=3))
    x = torch.randint(0, 97, (2, 5))
    captured = {}
    h = m.model.layers[0].register_forward_pre_hook(lambda mod, args: captured.update(h=args[0]))
    wrapped(x)
    h.remove()
    manual = torch.cat([wrapped.prompt_embeddings.expand(2, 3, 32), m.model.embed_tokens(x)], 1)
    torch.testing.assert_close(captured["h"], manual, atol=0, rtol=0)  # a concatenation: no arithmetic


def test_bitfit_adds_zero_biases_and_trains_only_them(tmp_path) -> None:
    m = _model()
    x = MemorizeTask().batch[0]
    ref = m(x)
    before = snapshot(m)
    apply_bitfit(m, BitFitConfig(target_modules="all-linear"))
    assert len(m.bitfit_added) == 14  # LLaMA linears are bias-free: every target got a zero bias
    # a (zero) bias turns the matmul into another BLAS call (addmm): equal up to rounding, not bit-equal
    torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=0)
    n_bias = 2 * (32 + 16 + 16 + 32 + 48 + 48 + 32)  # per layer q, k, v, o, gate, up, down outputs
    assert trainable_report(m).trainable == n_bias
    losses = _train(m, tmp_path, lr=0.1)
    assert losses[-1] < 0.85 * losses[0]
    assert changed_parameters(m, before) == 0  # every pre-existing parameter is untouched
    assert sum(int((p != 0).sum()) for n, p in m.named_parameters() if n.endswith("bias")) == n_bias
    with pytest.raises(ValueError, match="selects no bias"):
        apply_bitfit(_model(), BitFitConfig(target_modules=["q_proj"], add_missing=False))


def test_lora_trains_through_the_loop_and_fused_loss(tmp_path) -> None:
    m = _model()
    before = _base_params(m)
    apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    losses = _train(m, tmp_path)
    assert losses[-1] < 0.5 * losses[0]
    for n, p in m.named_parameters():
        key = n.replace(".base_layer", "")
        if key in before:
            assert torch.equal(p, before[key]), n  # frozen: never written to


def test_bad_method_configs_name_the_value() -> None:
    for make, match in ((lambda: AdapterConfig(variant="serial"), "variant='serial'"),
                        (lambda: AdapterConfig(placement=["emb"]), "placement="),
                        (lambda: AdapterConfig(bottleneck_size=0), "bottleneck_size=0"),
                        (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens=0"),
                        (lambda: PromptTuningConfig(init="text"), "init_text"),
                        (lambda: PrefixTuningConfig(encoder_hidden_size=-2), "encoder_hidden_size=-2")):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        apply_prompt_tuning(_model(), PromptTuningConfig(init="text", init_text="x"))


def test_peft_run_resumes_exactly_from_an_adapter_checkpoint(tmp_path) -> None:
    def run(steps: int, out, resume: bool = False) -> nn.Module:
        m = apply_prefix_tuning(_model(), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
        cfg = TrainConfig(out_dir=str(out), max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=0,
                          schedule="constant", eval_steps=0, save_interval=2, progress=False, device="cpu",
                          resume=resume)
        train(PeftModel(m), MemorizeTask(), cfg)
        return m

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b", resume=True)  # the MLP and its AdamW state come back from step 2
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # resume replays the same fp32 ops on the same batches: bit-exact


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_soft_prompts_with_left_padding_equal_the_unpadded_rows(kind) -> None:
    """A caller's padding mask and positions (as the generator builds them) are widened for the P prefix slots."""
    from tinyllm.model.attention import build_attn_meta

    m = _model()
    wrapped = (apply_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=3)) if kind == "prompt"
               else apply_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=3)))
    short, long = torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1), long])  # left-pad row 0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = wrapped(batch, positions=positions, attn_meta=build_attn_meta(6, 0, 2, key_padding_mask=mask))
    torch.testing.assert_close(out[0, 2:], wrapped(short)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], wrapped(long)[0], atol=1e-5, rtol=0)
