"""Causal-LM cross entropy and z-loss (tinyllm/train/losses.py) against torch and transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyllm.model.hf import load_model
from tinyllm.train.losses import causal_lm_loss, shift_labels, z_loss


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
