"""Tokenization (notes ch.01, ch.02.4): tinyllm's byte-level BPE (`bpe`, files in `bpe_io`), regex
pre-tokenizers (`pretokenize`), WordPiece (`wordpiece`) and Unigram (`unigram`) tokenizers and trainers, one `Tokenizer` interface and its loader (`interface`), the `tokenizers`
fallback for non-BPE checkpoints (`hf_shim`) and chat templates with assistant-only loss masks (`chat`)."""

from tinyllm.tokenizer.bpe import BPETokenizer, train_bpe
from tinyllm.tokenizer.chat import apply_chat_template, encode_chat
from tinyllm.tokenizer.hf_shim import CheckpointTokenizer
from tinyllm.tokenizer.interface import IncrementalDecoder, Tokenizer, load_tokenizer
from tinyllm.tokenizer.unigram import UnigramTokenizer
from tinyllm.tokenizer.unigram_train import train_unigram
from tinyllm.tokenizer.wordpiece import WordPieceTokenizer
from tinyllm.tokenizer.wordpiece_train import train_wordpiece

__all__ = ["BPETokenizer", "CheckpointTokenizer", "IncrementalDecoder", "Tokenizer", "UnigramTokenizer",
           "WordPieceTokenizer", "apply_chat_template", "encode_chat", "load_tokenizer", "train_bpe",
           "train_unigram", "train_wordpiece"]
