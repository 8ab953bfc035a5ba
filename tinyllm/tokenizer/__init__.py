"""Tokenization (notes ch.01): checkpoint tokenizers (currently through the `tokenizers` library, see
`hf_shim`) and chat templates (`chat`)."""

from tinyllm.tokenizer.chat import apply_chat_template
from tinyllm.tokenizer.hf_shim import CheckpointTokenizer, IncrementalDecoder, load_tokenizer

__all__ = ["CheckpointTokenizer", "IncrementalDecoder", "apply_chat_template", "load_tokenizer"]
