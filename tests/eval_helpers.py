"""Fixtures for the evaluation tests (imported as `eval_helpers`): a tiny random llama with a byte-level BPE
tokenizer saved as an HF directory, multiple-choice documents, and an lm-evaluation-harness task YAML that
describes the same task as `tinyllm.eval.tasks.mc_task`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_helpers import save_tiny_hf

WORDS = ("the model reads the question and the following answer choices about tiny math A B C D "
         "What is plus minus 注意力 机制 是 什么 Question: Answer:")


def save_tiny_lm(directory: Path, max_position_embeddings: int = 256, seed: int = 0) -> Path:
    """A tiny random HF llama (transformers-loadable) with a 320-token byte-level BPE; BOS = EOS = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tinyllm.tokenizer import CheckpointTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS] * 20, trainer)
    save_tiny_hf(directory, seed=seed, vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=0,
                 max_position_embeddings=max_position_embeddings)
    CheckpointTokenizer(tok, None, "<|endoftext|>", "<|endoftext|>", None).save(directory)
    return Path(directory)


def mc_docs(n: int = 8) -> list[dict[str, Any]]:
    """Questions whose choices differ in character length (so acc_norm and acc can disagree)."""
    choices = ["the model", "reads", "A B", "the following questions"]
    return [{"question": f"What is {i} plus {i % 3} about the model? ", "choices": choices[i % 4:] + choices[: i % 4],
             "answer": (i * 7) % 4, "subject": "tiny_math"} for i in range(n)]


def write_lm_eval_task(directory: Path, name: str, docs: list[dict[str, Any]], cloze: bool = False,
                       sampler: str = "first_n") -> Path:
    """An lm-eval task over a local JSONL file: `mmlu` (letters) or `mmlu_continuation` (cloze) template,
    few-shot examples drawn from the test split itself, the evaluated document excluded."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    if cloze:
        body = ('description: "The following are questions (with answers) about {{subject.replace(\'_\', \' \')}}.\\n\\n"\n'
                'doc_to_text: "Question: {{question.strip()}}\\nAnswer:"\n'
                'doc_to_choice: "{{choices}}"\n')
    else:
        body = ('description: "The following are multiple choice questions (with answers) about '
                '{{subject.replace(\'_\', \' \')}}.\\n\\n"\n'
                'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}'
                '\\nD. {{choices[3]}}\\nAnswer:"\n'
                'doc_to_choice: ["A", "B", "C", "D"]\n')
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\nfewshot_split: test\nfewshot_config:\n  sampler: {sampler}\n"
        f"output_type: multiple_choice\n{body}doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")
    return directory
