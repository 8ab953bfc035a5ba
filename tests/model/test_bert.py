"""BERT encoder: parity with transformers (both directions, padded batches, segments), real all-MiniLM-L6-v2
sentence embeddings vs sentence-transformers, backend equality, exact parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from tinyllm.model.bert import BertModel, bert_from_hf, bert_to_hf, encoder_attn_meta
from tinyllm.model.config import preset
from tinyllm.model.hf import CheckpointError, load_model, resolve_model_path, save_pretrained

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            type_vocab_size=2, pad_token_id=0)


def _cfg(**kw):
    """bert-base layout at test size (derived head fields recomputed from the new sizes)."""
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, num_key_value_heads=None, head_dim=None)
    return preset("bert-base", **{**base, **kw})


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(3, 10, dtype=torch.long)
    types[0, 5:] = 1
    types[1, 3:6] = 1
    return ids, types, mask


def _hf_model(cls_name: str, seed: int = 0):
    torch.manual_seed(seed)
    m = getattr(transformers, cls_name)(transformers.BertConfig(**TINY)).eval()
    with torch.no_grad():  # random non-trivial LayerNorm/bias values so a swapped name cannot hide
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("cls_name", ["BertForPreTraining", "BertModel", "BertForMaskedLM"])
def test_hf_checkpoint_loads_with_equal_outputs(tmp_path, cls_name):
    hf = _hf_model(cls_name)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, attn_implementation="eager")
    ids, types, mask = _batch()
    with torch.no_grad():
        h = ours(ids, types, mask)
        if cls_name == "BertModel":
            ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
            assert_close(h, ref.last_hidden_state, atol=1e-4, rtol=0)
            assert_close(ours.pooler(h), ref.pooler_output, atol=1e-4, rtol=0)
            return
        base = hf.bert
        ref_h = base(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        assert_close(h, ref_h, atol=1e-4, rtol=0)  # every position, padded rows included
        logits = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        ref_logits = logits.prediction_logits if cls_name == "BertForPreTraining" else logits.logits
        assert_close(ours.mlm_logits(ids, types, mask), ref_logits, atol=1e-4, rtol=0)
        if cls_name == "BertForPreTraining":
            ref_pool = base(input_ids=ids, token_type_ids=types, attention_mask=mask).pooler_output
            assert_close(ours.pooled(ids, types, mask), ref_pool, atol=1e-4, rtol=0)


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    cfg = _cfg()
    ours = BertModel(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    save_pretrained(ours, tmp_path)
    ids, types, mask = _batch(1)
    with torch.no_grad():
        h = ours(ids, types, mask)
        base = transformers.BertModel.from_pretrained(tmp_path).eval()
        ref = base(input_ids=ids, token_type_ids=types, attention_mask=mask)
        assert_close(h, ref.last_hidden_state, atol=1e-5, rtol=0)
        assert_close(ours.pooler(h), ref.pooler_output, atol=1e-5, rtol=0)
        mlm = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
        ref_logits = mlm(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
        assert_close(ours.mlm_logits_from_hidden(h), ref_logits, atol=1e-5, rtol=0)
    # and back: our own export reloads to the same tensors
    again = load_model(tmp_path)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k  # stored and read back, not recomputed


def test_name_maps_round_trip_and_legacy_names():
    torch.manual_seed(0)
    hf_sd = _hf_model("BertForPreTraining").state_dict()
    ours = bert_from_hf(hf_sd)
    model = BertModel(_cfg())
    assert set(ours) == set(model.state_dict())
    back = bert_to_hf(ours)
    assert set(back) <= set(hf_sd)
    # TF-converted checkpoints name LayerNorm parameters gamma/beta
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hf_sd.items()}
    assert set(bert_from_hf(legacy)) == set(ours)


def test_missing_encoder_weight_is_an_error(tmp_path):
    hf = _hf_model("BertModel")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    del sd["encoder.layer.1.output.dense.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        load_model(tmp_path)


@pytest.mark.parametrize("impl", ["sdpa", "tiled"])
def test_backends_agree_on_padded_batch(impl):
    torch.manual_seed(2)
    cfg = _cfg(max_position_embeddings=128, attn_implementation="eager")
    eager = BertModel(cfg).eval()
    other = BertModel(cfg.replace(attn_implementation=impl)).eval()
    other.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (2, 70), generator=g)  # > one 32-wide tile in both directions
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 41:] = 0
    with torch.no_grad():
        assert_close(other(ids, attention_mask=mask), eager(ids, attention_mask=mask), atol=1e-5, rtol=0)


def test_padding_does_not_change_real_tokens_and_empty_rows_are_finite():
    torch.manual_seed(4)
    cfg = _cfg()
    model = BertModel(cfg).eval()
    ids = torch.randint(1, 100, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        assert_close(model(padded, attention_mask=mask)[:, :6], model(ids), atol=1e-5, rtol=0)
        assert_close(model.embed(padded, mask), model.embed(ids), atol=1e-5, rtol=0)
        assert torch.isfinite(model(padded, attention_mask=torch.zeros_like(mask))).all()
    meta = encoder_attn_meta(mask, 1, 10)
    assert meta.mask.shape == (1, 1, 10, 10) and not meta.is_causal
    assert meta.mask[0, 0, 9, :6].all() and not meta.mask[0, 0, 9, 6:].any()  # padded query reads real keys


def test_embed_pooling_modes_and_bad_input():
    torch.manual_seed(5)
    cfg = _cfg(num_hidden_layers=1)
    model = BertModel(cfg).eval()
    ids, _, mask = _batch()
    with torch.no_grad():
        h = model(ids, attention_mask=mask)
        e = model.embed(ids, mask, normalize=False)
        assert_close(e[2], h[2, :3].mean(0))
        cls = model.embed(ids, mask, pooling="cls")
        assert_close(cls, torch.nn.functional.normalize(h[:, 0], dim=-1))
        assert_close(model.embed(ids, mask).norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="pooling='max'"):
        model.embed(ids, mask, pooling="max")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="beyond the learned table"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="model_type='llama'"):
        BertModel(preset("tiny"))


@pytest.mark.parametrize(("name", "expected"), [("bert-base", 109_482_240), ("bert-large", 335_141_888)])
def test_exact_parameter_counts(name, expected):
    cfg = preset(name)
    with torch.device("meta"):
        ours = BertModel(cfg)
        ref = transformers.BertModel(transformers.BertConfig(**cfg.to_hf()))
        ref_mlm = transformers.BertForMaskedLM(transformers.BertConfig(**cfg.to_hf()))
    assert ours.num_parameters() == expected == ref.num_parameters()
    pooler = cfg.hidden_size * (cfg.hidden_size + 1)
    assert ours.num_parameters(include_mlm_head=True) == ref_mlm.num_parameters() + pooler


def test_all_minilm_l6_v2_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    tokenizers = pytest.importorskip("tokenizers")
    try:
        path = resolve_model_path("all-minilm-l6-v2")
    except CheckpointError as e:
        pytest.skip(str(e))
    sentences = ["A man is eating food.", "The new movie is awesome!",
                 "Transformers encode every token in the context of the whole sentence, in both directions.",
                 "Hi"]
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=256)
    enc = tok.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    model = load_model(path)
    with torch.no_grad():
        ours = model.embed(ids, mask, pooling="mean", normalize=True)
    ref = st.SentenceTransformer(str(path), device="cpu").encode(sentences, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(ours, ref.float(), dim=-1)
    assert (cos > 0.9999).all(), cos
    assert_close(ours, ref.float(), atol=1e-5, rtol=0)
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"
