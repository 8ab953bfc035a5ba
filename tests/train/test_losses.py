"""Causal-LM cross entropy and z-loss (tinyllm/train/losses.py) against torch and transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyllm.model.hf import load_model
from tinyllm.train.losses import (
    causal_lm_loss,
    chunked_cross_entropy,
    linear_cross_entropy,
    model_lm_loss,
    shift_labels,
    z_loss,
)


def test_equals_cross_entropy_with_ignore_index() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    kept = labels != -100
    expected = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][kept].mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    torch.testing.assert_close(causal_lm_loss(logits, labels), F.cross_entropy(logits.transpose(1, 2), labels))
    # bf16 logits are upcast: the loss is fp32 and close to the fp32 loss
    assert causal_lm_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_equals_transformers_llama_loss_on_the_same_weights(tiny_hf_checkpoint) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_hf_checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path).eval()
    ids = torch.randint(0, 128, (2, 12))
    hf_labels = ids.clone()
    hf_labels[1, :4] = -100  # e.g. a prompt that is not trained on
    with torch.no_grad():
        hf_loss = hf(input_ids=ids, labels=hf_labels).loss
        our_loss = causal_lm_loss(ours(ids), shift_labels(hf_labels))  # HF shifts internally; we shift the labels
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_shift_labels_and_z_loss() -> None:
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]
    logits = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # log Z = log 2, 1 + log 2
    expected = 1e-4 * (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    torch.testing.assert_close(z_loss(logits), expected)
    only_second = 1e-4 * (1 + torch.log(torch.tensor(2.0))) ** 2
    torch.testing.assert_close(z_loss(logits, torch.tensor([[-100, 1]])), only_second)


def test_chunked_cross_entropy_equals_torch_loss_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 37, (23,), generator=g)
    labels[[0, 5, 6]] = -100
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base = (3 * torch.randn(23, 37, generator=g)).to(dtype)
        for chunk_rows, scale in ((None, 1.0), (1, 0.5), (4, 1.0), (7, 2.0), (64, 0.25)):
            ref_in, our_in = base.clone().requires_grad_(), base.clone().requires_grad_()
            ref = F.cross_entropy(ref_in.float(), labels)
            ours = chunked_cross_entropy(our_in, labels, chunk_rows=chunk_rows)
            (scale * ref).backward()
            (scale * ours).backward()
            assert ours.dtype == torch.float32 and our_in.grad.dtype == dtype
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
            tol = {torch.bfloat16: 1e-2}.get(dtype, 1e-6)
            torch.testing.assert_close(our_in.grad, ref_in.grad, rtol=tol, atol=tol)
    # the [B, T, V] entry point, without gradients, and the all-ignored mean (nan, as torch's)
    logits = torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(logits, y), F.cross_entropy(logits.transpose(1, 2), y))
    assert torch.isnan(causal_lm_loss(logits, torch.full_like(y, -100)))


def test_chunked_cross_entropy_rejects_bad_labels_and_a_second_backward() -> None:
    logits = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(IndexError, match="label 6"):
        chunked_cross_entropy(logits, torch.tensor([0, 6, 1, 2]))
    with pytest.raises(ValueError, match="chunk_rows=0"):
        chunked_cross_entropy(logits, torch.tensor([0, 1, 1, 2]), chunk_rows=0)
    loss = chunked_cross_entropy(logits, torch.tensor([0, 1, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


def test_losses_keep_their_precision_where_the_label_has_almost_no_probability() -> None:
    # on a CPU the loss is −log p_y from one softmax pass; rows whose p_y underflows (here z_y is 200 below the
    # row's maximum, p_y = e^-200 = 0 in fp32) take log-softmax instead, so the loss stays finite and exact
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    logits[1, 1] -= 200.0
    logits[4, 4] -= 60.0  # p_y ~ e^-60: representable, −log p_y keeps fp32's precision
    ref_in = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_in, labels)
    ref.backward()
    ours_in = logits.float().requires_grad_()
    ours = chunked_cross_entropy(ours_in, labels, chunk_rows=4)
    ours.backward()
    assert 30 < ours.item() < float("inf")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-6, atol=1e-7)
    # the same through the fused head: hidden = one-hot rows, weight = logitsᵀ, so hidden · weightᵀ = logits
    hidden, weight = torch.eye(6).requires_grad_(), logits.float().t().contiguous().requires_grad_()
    lin = linear_cross_entropy(hidden, weight, labels, chunk_rows=4)
    lin.backward()
    torch.testing.assert_close(lin, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad.t(), ref_in.grad, rtol=1e-6, atol=1e-7)


def test_linear_cross_entropy_equals_lm_head_then_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(37, 16, generator=g), 0.3 * torch.randn(29, 16, generator=g)
    labels = torch.randint(0, 29, (37,), generator=g)
    labels[[3, 4, 30]] = -100
    for precision, chunk_rows, scale in (("fp32", None, 1.0), ("fp32", 5, 0.5), ("bf16", None, 1.0), ("bf16", 8, 3.0)):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        ref_in = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        our_in = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        with autocast:
            ref = F.cross_entropy(F.linear(*ref_in).float(), labels)
            ours = linear_cross_entropy(*our_in, labels, chunk_rows=chunk_rows)
        (scale * ref).backward()
        (scale * ours).backward()
        tol = 1e-6 if precision == "fp32" else 1e-2  # bf16: per-chunk rounding of the weight gradient
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        for a, b in zip(our_in, ref_in):
            assert a.grad.dtype == torch.float32
            torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * b.grad.abs().max().item())
    with pytest.raises(ValueError, match=r"weight \(29, 8\)"):
        linear_cross_entropy(hidden, weight[:, :8], labels)
    with pytest.raises(IndexError, match="label 29"):
        linear_cross_entropy(hidden, weight, labels.clamp(min=0) + 1)


def test_model_lm_loss_equals_causal_lm_loss_of_the_logits_with_tied_embeddings() -> None:
    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model

    cfg = preset("tiny", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    assert cfg.tie_word_embeddings
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 97, (3, 10))
    labels = torch.randint(0, 97, (3, 10))
    labels[0, :4] = -100
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model.zero_grad(set_to_none=True)
            ref = causal_lm_loss(model(ids), labels)
            ref.backward()
            ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            ours = model_lm_loss(model, ids, labels)
            ours.backward()
        tol = 1e-5 if precision == "fp32" else 2e-2
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        for n, p in model.named_parameters():
            scale = ref_grads[n].abs().max().item()
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=tol, atol=tol * scale, msg=lambda m, n=n: f"{n}: {m}")
