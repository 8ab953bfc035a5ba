"""`tinyllm seg | pos | keywords | word2vec`: the classic-NLP commands of chapter 1.

Each command is a config dataclass (fields = flags, help in `metadata["help"]`) and a `run_*` function; the
work itself lives in the `tinyllm.nlp` modules, imported only when the command runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path


# ------------------------------------------------------------------ seg
@dataclass
class SegConfig:
    input: str | None = field(default=None, metadata={
        "help": "text file to segment, one line at a time ('-' or unset: stdin, unless --text is given)"})
    text: str | None = field(default=None, metadata={"help": "segment this string instead of a file"})
    output: str | None = field(default=None, metadata={"help": "write here instead of stdout"})
    mode: str = field(default="precise", metadata={
        "help": "precise (best route), full (every dictionary word) or search (precise + dictionary sub-words)",
        "choices": ["precise", "full", "search"]})
    hmm: bool = field(default=True, metadata={"help": "HMM (BMES Viterbi) for runs of unknown characters"})
    dict: str = field(default="jieba", metadata={
        "help": "'jieba' (jieba's dict.txt and HMM), a model saved by --train / Segmenter.save, "
                "or a dictionary text file in jieba's 'word freq [tag]' format"})
    user_dict: str | None = field(default=None, metadata={
        "help": "user dictionary, one 'word [freq] [tag]' per line, applied on top of --dict"})
    sep: str = field(default=" / ", metadata={"help": "separator written between words"})
    train: str | None = field(default=None, metadata={
        "help": "build a model from a segmented corpus instead of segmenting: 'peoples-daily' (the People's "
                "Daily 1998 training split) or a text file with words separated by spaces"})
    save: str | None = field(default=None, metadata={"help": "where --train writes the model (.json.gz)"})
    min_freq: int = field(default=1, metadata={"help": "--train: keep words seen at least this often"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar for long inputs"})

    def __post_init__(self) -> None:
        if self.mode not in ("precise", "full", "search"):
            raise ValueError(f"mode={self.mode!r} is not one of ['precise', 'full', 'search']")
        if self.train is not None and not self.save:
            raise ValueError("--train needs --save PATH for the model it builds")
        if self.min_freq < 1:
            raise ValueError(f"min_freq={self.min_freq} must be >= 1")
        if self.input is not None and self.text is not None:
            raise ValueError("give either --input or --text, not both")


def _load_segmenter(cfg: SegConfig):
    from tinyllm.nlp.segment import Segmenter

    if cfg.dict == "jieba":
        seg = Segmenter.from_jieba()
    else:
        path = Path(cfg.dict)
        if not path.exists():
            raise SystemExit(f"error: --dict {cfg.dict!r}: no such file (or use 'jieba')")
        seg = Segmenter.load(path) if path.name.endswith((".json.gz", ".json")) else Segmenter.from_dict_file(path)
    if cfg.user_dict:
        seg.load_userdict(cfg.user_dict)
    return seg


def run_seg(cfg: SegConfig) -> int:
    if cfg.train is not None:
        from tinyllm.nlp.segment import Segmenter, read_segmented

        if cfg.train in ("peoples-daily", "pd"):
            from tinyllm.data.corpora import peoples_daily_tagged

            sents = [[w for w, _ in s] for s in peoples_daily_tagged("train")]
        else:
            sents = read_segmented(cfg.train)
        seg = Segmenter.from_corpus(sents, min_freq=cfg.min_freq)
        seg.save(cfg.save)
        print(f"trained on {len(sents):,} sentences: {seg.num_words:,} words, total {seg.total:,}; "
              f"saved to {cfg.save}", file=sys.stderr)
        return 0

    seg = _load_segmenter(cfg)
    if cfg.text is not None:
        lines = [cfg.text]
    elif cfg.input in (None, "-"):
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(cfg.input)
        if not path.exists():
            raise SystemExit(f"error: --input {cfg.input!r}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
    out = open(cfg.output, "w", encoding="utf-8") if cfg.output else sys.stdout  # noqa: SIM115
    try:
        it = lines
        if cfg.progress and len(lines) > 1000:
            from tqdm import tqdm

            it = tqdm(lines, desc="seg", unit="line", file=sys.stderr)
        for line in it:
            out.write(cfg.sep.join(seg.cut(line, mode=cfg.mode, hmm=cfg.hmm)) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
