"""Log-likelihood scoring equals a per-example computation; NLL equals cross entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyllm.eval.harness import choice_logprobs, sequence_nll
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4)).eval()


def test_choice_logprobs_match_one_at_a_time() -> None:
    model = _model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    choices = [[10], [11, 12], [13, 14, 15]]
    got = choice_logprobs(model, prompts, choices, batch_size=4)
    for i, p in enumerate(prompts):
        for j, c in enumerate(choices):
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([p + c])), -1)[0]
            want = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c))
            assert abs(float(got[i, j]) - want) < 1e-4


def test_sequence_nll_is_summed_cross_entropy() -> None:
    model = _model()
    x = torch.randint(0, 50, (2, 9))
    y = torch.randint(0, 50, (2, 9))
    y[0, :3] = -100
    total, count = sequence_nll(model, [(x, y)])
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    assert count == 15 and abs(total - float(want)) < 1e-3
