"""The `tinyllm` command line: a table of commands, each a typed config dataclass plus one `run(cfg)`.

`tinyllm <command> [--config file.toml] [--field value ...]` parses into the command's dataclass (fields,
types, defaults and help come from the dataclass; a field's help is its `metadata["help"]`) and calls `run`.
Commands with a space in their name (`calc params`) become sub-commands. The CLI holds no logic.

A user's mistake (a missing or unreadable path, a corrupt checkpoint, tokenizer or store, an unreachable
endpoint, a value the config rejects) surfaces as a ValueError or OSError (or a SystemExit carrying a message)
with a message that names the bad value; `main` prints it as one line, `tinyllm <command>: error: <message>`,
and returns 2, with no traceback. `--debug` (or TINYLLM_DEBUG=1) re-raises instead, traceback included.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

# command → "module:ConfigClass:run_function"; modules are imported only when their command runs
COMMANDS: dict[str, str] = {
    "generate": "tinyllm.infer.cli_generate:GenerateConfig:run_generate",
    "chat": "tinyllm.infer.cli_generate:ChatConfig:run_chat",
    "serve": "tinyllm.serve.cli:ServeConfig:run_serve",
    "pretrain": "tinyllm.train.pretrain:PretrainConfig:run_pretrain",
    "sft": "tinyllm.train.sft:SFTConfig:run_sft",
    "recipe tiny-zh": "tinyllm.recipes.tiny_zh:TinyZhConfig:run_recipe",
    "recipe dense-retriever": "tinyllm.recipes.dense_retriever:DenseRetrieverConfig:run_recipe",
    "recipe tool-calc": "tinyllm.recipes.tool_calc:ToolCalcConfig:run_recipe",
    "title": "tinyllm.recipes.tiny_zh_titles:TitleConfig:run_title",
    "calc params": "tinyllm.calc.cli:ParamsConfig:run_params",
    "calc flops": "tinyllm.calc.cli:FlopsConfig:run_flops",
    "calc kv-cache": "tinyllm.calc.cli:KVCacheConfig:run_kv_cache",
    "calc memory": "tinyllm.calc.cli:MemoryConfig:run_memory",
    "merge-adapter": "tinyllm.train.peft.cli:MergeAdapterConfig:run_merge_adapter",
    "reward": "tinyllm.train.reward:RewardConfig:run_reward",
    "dpo": "tinyllm.train.dpo:DPOConfig:run_dpo",
    "ppo": "tinyllm.train.ppo:PPOConfig:run_ppo",
    "grpo": "tinyllm.train.grpo:GRPOConfig:run_grpo",
    "seg": "tinyllm.nlp.cli:SegConfig:run_seg",
    "pos": "tinyllm.nlp.cli:PosConfig:run_pos",
    "keywords": "tinyllm.nlp.cli:KeywordsConfig:run_keywords",
    "word2vec": "tinyllm.nlp.cli:Word2VecConfig:run_word2vec",
    "rag index": "tinyllm.rag.cli:IndexConfig:run_index",
    "rag search": "tinyllm.rag.cli:SearchConfig:run_search",
    "rag ask": "tinyllm.rag.cli:AskConfig:run_ask",
    "agent": "tinyllm.agent.cli:AgentConfig:run_agent",
    "eval": "tinyllm.eval.cli:EvalConfig:run_eval",
    "ask": "tinyllm.rag.docs_ask:DocsAskConfig:run_docs_ask",
    "parallel check": "tinyllm.train.parallel.check:ParallelCheckConfig:run_check",
    "parallel schedule": "tinyllm.train.parallel.check:ScheduleConfig:run_schedule",
}

_HELP = {
    "generate": "generate text from a prompt with a checkpoint (HF directory or GGUF)",
    "chat": "interactive chat with a checkpoint, using its chat template, streaming tokens",
    "serve": "OpenAI-compatible HTTP server (chat, completions, embeddings, metrics) and a chat page",
    "pretrain": "pretrain a decoder from a preset on token shards (writes an HF checkpoint)",
    "sft": "supervised fine-tuning on conversations (assistant tokens only; writes an HF checkpoint)",
    "recipe": "end-to-end runs",
    "recipe tiny-zh": "train a tiny Chinese LLM end to end: BPE → pretrain → SFT → eval → report (~10 min)",
    "recipe dense-retriever": "train a dense retriever (DSSM hashed n-grams or a small BERT; in-batch and mined hard negatives) on inews title ↔ article pairs",
    "recipe tool-calc": "train a tiny model to call a calculator tool; accuracy with the tool vs without",
    "title": "extractive news titles with the tagger `recipe tiny-zh` trains (the article's key characters, in order)",
    "calc": "interview arithmetic: parameters, FLOPs, KV-cache and training memory",
    "calc params": "exact parameter count of a preset, config.json or checkpoint",
    "calc flops": "training FLOPs (6ND + attention) and forward FLOPs per token",
    "calc kv-cache": "KV-cache bytes for a model, batch and context length (GQA-aware)",
    "calc memory": "weights + gradients + optimizer memory for fp32 / mixed-precision training",
    "merge-adapter": "merge a LoRA adapter (PEFT or tinyllm directory) into its base and save an HF checkpoint",
    "reward": "train a reward model (scalar head, Bradley–Terry loss) on preference pairs",
    "dpo": "align a policy with DPO / IPO on preference pairs against a frozen reference",
    "ppo": "RLHF with PPO: actor, critic, reward model and reference; KL-shaped rewards, GAE",
    "grpo": "GRPO: group-normalised advantages on sampled completions with verifiable rewards",
    "seg": "Chinese word segmentation (prefix-dict DAG + max-probability route + HMM), jieba-compatible",
    "pos": "part-of-speech tagging with an HMM tagger (People's Daily tag set)",
    "keywords": "keyword extraction with TF-IDF or TextRank",
    "word2vec": "train Word2Vec (skip-gram / CBOW, negative sampling / hierarchical softmax) on segmented text",
    "rag": "retrieval-augmented generation: index documents, search, answer with citations",
    "rag index": "chunk, embed and index files (txt, md, html, jsonl, pdf) into a store directory",
    "rag search": "search a store with BM25, dense or hybrid retrieval",
    "rag ask": "answer a question from a store with numbered citations, using a local model or an OpenAI-compatible endpoint",
    "agent": "run a tool-using agent on a task (function calling, ReAct or plan-and-execute) and stream its trace",
    "ask": "ask the documentation: answers from the chapter pages and the notes map, citing page#section",
    "parallel": "model parallelism: equality checks under torchrun, pipeline schedules",
    "parallel check": "under torchrun: train a tiny model with tp / tp-sp / cp / pp-gpipe / pp-1f1b / ep and compare with one process",
    "parallel schedule": "print (or plot) a GPipe / 1F1B pipeline timeline and its bubble fraction",
    "eval": "score a model or an OpenAI-compatible endpoint on benchmark tasks (MMLU, C-Eval/CMMLU files, Chinese corpora tasks) with lm-evaluation-harness semantics",
}


def _load(target: str) -> tuple[type, Any]:
    module, cls, fn = target.split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type, whether None is allowed) of a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{help_text} (default: {default!r})".strip()}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        origin = typing.get_origin(tp)
        if f.metadata.get("positional"):  # `tinyllm ask "问题"`: also accepted as the flag
            parser.add_argument(f"{f.name}_positional", metavar=f.name.upper(), nargs="?", type=tp,
                                default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, **kwargs)
            # `--no-progress` as well as `--progress false`
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"same as {flag} false")
        elif origin is list:
            (item,) = typing.get_args(tp) or (str,)
            parser.add_argument(flag, type=item, nargs="*", **kwargs)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=tp, **kwargs)
        else:
            parser.add_argument(flag, type=str, **kwargs)
        del optional


def build_config(cls: type, args: argparse.Namespace) -> Any:
    """The command's dataclass from `--config` (TOML) overridden by the flags; ValueError names a bad value."""
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file:
        path = Path(config_file)
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--config {path}: {_os_reason(e)}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: not valid TOML ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"--config {path}: unknown field(s) {unknown}")
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "debug", "_command")})
    for key in [k for k in values if k.endswith("_positional")]:
        values[key.removesuffix("_positional")] = values.pop(key)
    try:
        return cls(**values)
    except TypeError as e:  # a TOML value of the wrong type reaching a comparison in __post_init__
        raise ValueError(str(e)) from None


def _os_reason(e: BaseException) -> str:
    """An OSError as 'reason' (its filename is named by the caller); anything else as its message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return str(e)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "the user gave a bad value, path or file", not "tinyllm has a bug".

    Loaders and configs raise ValueError (ConfigError, CheckpointError, AdapterError, FormatError, JSON and
    TOML decode errors, UnicodeDecodeError are all ValueErrors) or OSError (missing files, permissions,
    refused connections); the safetensors reader raises its own class on a damaged file."""
    from safetensors import SafetensorError

    return ValueError, OSError, SafetensorError


def _message(e: BaseException) -> str:
    """One line for an error: an OSError with a filename names it; the 'error: ' prefix is not repeated."""
    if isinstance(e, SystemExit):
        text = str(e.code)
    elif isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {_os_reason(e)}"
    else:
        text = str(e) or type(e).__name__
    text = text.removeprefix("error: ").strip()
    return " ".join(text.split()) if "\n" in text else text


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("TINYLLM_DEBUG", "") not in ("", "0")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllm", description="tinyllm: LLM interview notes as one working, tested package.")
    sub = parser.add_subparsers(dest="_top", metavar="command")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, target in COMMANDS.items():
        parts = name.split(" ")
        holder = sub
        if len(parts) == 2:
            if parts[0] not in groups:
                gp = sub.add_parser(parts[0], help=_HELP.get(parts[0], ""), description=_HELP.get(parts[0], ""))
                groups[parts[0]] = gp.add_subparsers(dest="_sub", metavar="subcommand", required=True)
            holder = groups[parts[0]]
        p = holder.add_parser(parts[-1], help=_HELP.get(name, ""), description=_HELP.get(name, ""))
        p.add_argument("--config", default=None, help="TOML file with field values (flags override it)")
        p.set_defaults(_command=name)
        p.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else argv
    # build only the sub-parser that is needed: import the command's module lazily
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]
    if name not in COMMANDS and not any(c.startswith(name + " ") for c in COMMANDS):
        parser.error(f"unknown command {argv[0]!r}; choose from {sorted({c.split()[0] for c in COMMANDS})}")
    if name not in COMMANDS:  # a group without its sub-command
        parser.parse_args([*argv[:1], "--help"] if len(argv) == 1 else argv)
        return 2
    cls, run = _load(COMMANDS[name])
    sub = argparse.ArgumentParser(prog=f"tinyllm {name}", description=_HELP.get(name, ""))
    sub.add_argument("--config", default=None, help="TOML file with field values (flags override it)")
    sub.add_argument("--debug", action="store_true", default=False,
                     help="show the full traceback of an error (also TINYLLM_DEBUG=1)")
    add_dataclass_arguments(sub, cls)
    args = sub.parse_args(argv[len(name.split(" ")):])
    try:
        cfg = build_config(cls, args)
        result = run(cfg)
    except SystemExit as e:  # a command refusing with a message; a bare exit status passes through
        if not isinstance(e.code, str) or _debug_requested(args):
            raise
        return _report(name, e)
    except user_errors() as e:
        if _debug_requested(args):
            raise
        return _report(name, e)
    return int(result) if isinstance(result, int) else 0


def _report(name: str, e: BaseException) -> int:
    print(f"tinyllm {name}: error: {_message(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
