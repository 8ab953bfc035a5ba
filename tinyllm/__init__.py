"""tinyllm: the mechanisms of the LLM interview notes as one working, tested package.

Public surface: ModelConfig, preset, load_model, save_pretrained, build_model, load_tokenizer, LLM, LLMEngine,
SamplingParams.
"""

from tinyllm.infer.engine import LLM, LLMEngine
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.model.config import ModelConfig, preset
from tinyllm.model.hf import build_model, load_model, save_pretrained
from tinyllm.tokenizer import load_tokenizer

__all__ = ["LLM", "LLMEngine", "ModelConfig", "SamplingParams", "build_model", "load_model", "load_tokenizer", "preset",
           "save_pretrained"]
__version__ = "0.1.0"
