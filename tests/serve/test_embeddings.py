"""`--embedding-model` with a BERT checkpoint: /v1/embeddings equals sentence-transformers on all-MiniLM-L6-v2
(mean pooling over [CLS] … [SEP], L2-normalised), listed in /v1/models under its own name."""

from __future__ import annotations

import pytest
import torch

openai = pytest.importorskip("openai")
st = pytest.importorskip("sentence_transformers")

from tinyllm.model.hf import CheckpointError, resolve_model_path  # noqa: E402
from tinyllm.serve.embeddings import Embedder  # noqa: E402


def test_bert_embeddings_equal_sentence_transformers(make_server, checkpoint) -> None:
    try:
        path = resolve_model_path("all-minilm-l6-v2")
    except CheckpointError as e:
        pytest.skip(str(e))
    server = make_server(checkpoint, embedder=Embedder.from_pretrained(path, name="minilm"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny", "minilm"]
    texts = ["A man is eating food.", "The new movie is awesome!", "Hi"]
    got = torch.tensor([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data])
    ref = st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True).float()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="the decoder is not the embedding model here")
