"""Figures of the documentation site, drawn by code at build time (MkDocs hook).

Every picture comes from tinyllm itself — the masks from `build_attn_meta`, the ALiBi bias from
`AlibiPosition`, the RoPE frequencies from `rope_inv_freq`, the block tables and the batching timeline from a
real `LLMEngine` run on a tiny random model, the tokenizations from our trained BPE / WordPiece / Unigram and
the jieba-compatible `Segmenter`, LoRA counts from `lora_parameter_count`, recall@k from `BM25Index` and
`rag.metrics` — so a picture cannot drift from the code. The main job's loss curves and the evaluation results
are the exceptions: they are read from `docs/data/tiny-zh-loss.json` and `docs/data/eval-results.json` (recorded
runs; rerunning the 10-minute recipe or the hours-long MMLU run per build is not worth it). Nothing touches
the network; Chinese labels use Noto Sans CJK from the registry package `cvttf-notosanscjk-regular` (the `docs`
extra).

The PNGs never land in `docs/`: `on_files` adds them to the build as generated files, so `mkdocs serve` does
not rebuild itself in a loop and the checkout stays clean. `figure_bytes()` draws them all outside MkDocs
(the tests use it).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import font_manager

log = logging.getLogger("mkdocs.hooks.figures")
DATA = Path(__file__).resolve().parent.parent / "data"
SENTENCE = "人工智能技术推动了中国经济的快速发展"
FIGURES: dict[str, Callable[[], plt.Figure]] = {}


def figure(name: str) -> Callable:
    def register(fn: Callable[[], plt.Figure]) -> Callable[[], plt.Figure]:
        FIGURES[name] = fn
        return fn
    return register


def _use_cjk_font() -> bool:
    spec = importlib.util.find_spec("cvttf_NotoSansCJK_Regular")
    if spec is None or not spec.submodule_search_locations:
        return False
    path = os.path.join(spec.submodule_search_locations[0], "NotoSansCJKtc-Regular.otf")
    if not os.path.exists(path):
        return False
    font_manager.fontManager.addfont(path)
    name = font_manager.FontProperties(fname=path).get_name()
    plt.rcParams["font.family"] = ["DejaVu Sans", name]  # Latin from DejaVu, Chinese falls back to Noto
    return True


# ---- attention -------------------------------------------------------------------------------------------


@figure("attention-masks.png")
def attention_masks() -> plt.Figure:
    from tinyllm.model.attention import build_attn_meta
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.position import AlibiPosition

    t = 12
    causal = build_attn_meta(t, 0, key_padding_mask=torch.ones(1, t), causal=True).mask[0, 0]
    window = build_attn_meta(t, 0, sliding_window=4).mask[0, 0]
    alibi = AlibiPosition(ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=8, position_type="alibi"))
    pos = torch.arange(t)[None]
    bias = alibi.bias(pos, pos)[0, 0].masked_fill(~causal, float("nan"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = [(causal.float(), "causal (因果掩码)", "Greys"), (window.float(), "sliding window w = 4 (滑动窗口)", "Greys"),
              (bias, f"ALiBi bias, head 0: −{alibi.slopes[0]:.3g}·|i − j|", "viridis")]
    for ax, (m, title, cmap) in zip(axes, panels):
        im = ax.imshow(m.numpy(), cmap=cmap, vmin=None if cmap == "viridis" else 0, vmax=None if cmap == "viridis" else 1)
        ax.set_title(title)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        if cmap == "viridis":
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


@figure("rope-frequencies.png")
def rope_frequencies() -> plt.Figure:
    from tinyllm.model.position import rope_inv_freq

    dim = 64
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for base in (1e4, 5e5):
        theta = rope_inv_freq(dim, base).numpy()
        a.semilogy(np.arange(dim // 2), 2 * np.pi / theta, marker=".", label=f"base {base:g}")
    a.axhline(4096, color="grey", ls="--", lw=1)
    a.text(1, 4096 * 1.3, "context 4096", color="grey")
    a.set_xlabel("pair index i (维度对)")
    a.set_ylabel("wavelength 2π/θ_i (tokens)")
    a.set_title("RoPE: θ_i = base^(−2i/d), d = 64")
    a.legend()
    angles = np.outer(np.arange(128), rope_inv_freq(dim, 1e4).numpy())
    im = b.imshow(np.cos(angles).T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    b.set_xlabel("position m")
    b.set_ylabel("pair index i")
    b.set_title("cos(m·θ_i): fast pairs on top, slow below")
    fig.colorbar(im, ax=b, fraction=0.046)
    fig.tight_layout()
    return fig


# ---- tokenization ----------------------------------------------------------------------------------------


def _training_texts(n_articles: int = 20) -> list[str]:
    from tinyllm.data import corpora

    return [s for a in corpora.inews("train")[:n_articles] for s in re.split(r"(?<=[。！？])|\s{2,}", a.content)
            if s.strip()]


def tokenizations(sentence: str = SENTENCE) -> dict[str, list[str]]:
    """One sentence under three subword tokenizers trained on the same 150 inews articles (165k characters,
    vocabulary 3000 each), beside jieba's dictionary words.

    Byte-level BPE pieces that end inside a UTF-8 character are shown as their bytes (\\xe5…)."""
    from tinyllm.nlp.segment import Segmenter
    from tinyllm.tokenizer.bpe_train import train_bpe
    from tinyllm.tokenizer.unigram_train import train_unigram
    from tinyllm.tokenizer.wordpiece import WordPieceTokenizer
    from tinyllm.tokenizer.wordpiece_train import train_wordpiece, word_counts

    texts = _training_texts(150)
    bpe = train_bpe(texts, 3000, show_progress=False)
    pieces = []
    for i in bpe.encode(sentence):
        raw = bpe.decode_bytes([i])
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("".join(f"\\x{c:02x}" for c in raw))
    vocab, _ = train_wordpiece(word_counts(texts), 3000)
    unigram = train_unigram(texts, 3000, character_coverage=0.995)
    return {
        "byte-level BPE": pieces,
        "WordPiece (BERT)": WordPieceTokenizer(vocab).tokenize(sentence),
        "Unigram (SentencePiece)": unigram.tokenize(sentence),
        "jieba words (分词)": Segmenter.from_jieba().lcut(sentence),
    }


@figure("tokenization-zh.png")
def tokenization_view() -> plt.Figure:
    rows = tokenizations()
    fig, ax = plt.subplots(figsize=(12, 0.9 * len(rows) + 0.6))
    colors = plt.get_cmap("Pastel1").colors
    for r, (name, pieces) in enumerate(rows.items()):
        y = len(rows) - r
        ax.text(-0.2, y, f"{name}\n{len(pieces)} tokens", ha="right", va="center", fontsize=10)
        x = 0.0
        for k, p in enumerate(pieces):
            w = max(0.55, 0.42 * len(p)) if not p.startswith("\\x") else 0.25 * len(p)
            ax.add_patch(plt.Rectangle((x, y - 0.35), w, 0.7, color=colors[k % len(colors)], ec="grey"))
            ax.text(x + w / 2, y, p, ha="center", va="center", fontsize=9 if not p.startswith("\\x") else 6)
            x += w + 0.08
    ax.set_xlim(-3.2, 14)
    ax.set_ylim(0.3, len(rows) + 0.7)
    ax.axis("off")
    ax.set_title(f"「{SENTENCE}」 under four tokenizers (each trained on the same 150 inews articles)")
    fig.tight_layout()
    return fig


# ---- inference -------------------------------------------------------------------------------------------


def _tiny_engine(**kw):
    from tinyllm import LLMEngine, build_model
    from tinyllm.model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    return LLMEngine(model, **kw)


def batching_trace(prompt_lens=(6, 20, 3, 12, 30, 5, 9), max_tokens=(8, 4, 14, 6, 5, 10, 7), arrivals=(0, 0, 0, 2, 4, 6, 9),
                   budget: int = 16) -> list[dict[str, int]]:
    """Run a real engine step by step; for each step, the tokens each request fed (prefill chunk or 1 decode)."""
    from tinyllm import SamplingParams

    engine = _tiny_engine(num_blocks=64, block_size=4, max_num_batched_tokens=budget)
    g = torch.Generator().manual_seed(1)
    trace, step = [], 0
    pending = list(zip(range(len(prompt_lens)), prompt_lens, max_tokens, arrivals))
    while pending or engine.has_unfinished_requests():
        for item in [p for p in pending if p[3] <= step]:
            i, n, m, _ = item
            engine.add_request(f"r{i}", prompt_token_ids=torch.randint(0, 64, (n,), generator=g).tolist(),
                               params=SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
            pending.remove(item)
        if engine.has_unfinished_requests():
            engine.step()
            sched = engine._sched
            trace.append({s.request.request_id: n for s, n in zip(sched.seqs, sched.num_new)})
        else:
            trace.append({})
        step += 1
    return trace


@figure("continuous-batching.png")
def continuous_batching() -> plt.Figure:
    trace = batching_trace()
    ids = sorted({r for step in trace for r in step}, key=lambda r: int(r[1:]))
    fig, ax = plt.subplots(figsize=(12, 3.6))
    for t, step in enumerate(trace):
        for r, n in step.items():
            y = ids.index(r)
            prefill = n > 1 or t == min(k for k, s in enumerate(trace) if r in s)
            ax.add_patch(plt.Rectangle((t, y - 0.4), 0.95, 0.8, color="tab:orange" if prefill else "tab:blue"))
            if n > 1:
                ax.text(t + 0.47, y, str(n), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ids)), ids)
    ax.set_xlim(0, len(trace))
    ax.set_ylim(-0.6, len(ids) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("engine step (每步重新组批)")
    ax.set_title("continuous batching, token budget 16 per step: orange = prompt chunk (number = tokens), "
                 "blue = one decode token")
    fig.tight_layout()
    return fig


def block_tables() -> tuple[dict[str, list[int]], dict[int, int], int]:
    """A batch mid-flight: two requests share a 3-block system prompt (prefix caching), one forks n = 2."""
    from tinyllm import SamplingParams

    engine = _tiny_engine(num_blocks=24, block_size=4)
    system = list(range(1, 13))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("A", prompt_token_ids=[*system, 20, 21, 22], params=greedy)
    engine.step()
    engine.add_request("B", prompt_token_ids=[*system, 30], params=greedy)
    engine.add_request("C", prompt_token_ids=[50, 51, 52, 53, 54, 55],
                       params=SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=6, ignore_eos=True))
    for _ in range(3):
        engine.step()
    bm = engine.block_manager
    tables = {}
    for seq in engine.scheduler.running:
        name = seq.request.request_id + (f".{seq.index}" if seq.request.params.n > 1 else "")
        tables[name] = list(seq.block_table)
    refs = {b: int(bm.refcount[b]) for t in tables.values() for b in t}
    return tables, refs, bm.num_blocks


@figure("paged-kv-blocks.png")
def paged_blocks() -> plt.Figure:
    tables, refs, num_blocks = block_tables()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    colors = dict(zip(tables, plt.get_cmap("tab10").colors))
    for r, (name, table) in enumerate(tables.items()):
        a.text(-0.3, r, name, ha="right", va="center")
        for k, blk in enumerate(table):
            shared = refs[blk] > 1
            a.add_patch(plt.Rectangle((k, r - 0.4), 0.9, 0.8, color=colors[name], alpha=0.5 if shared else 0.9,
                                      hatch="//" if shared else None))
            a.text(k + 0.45, r, str(blk), ha="center", va="center")
    a.set_xlim(-1, max(len(t) for t in tables.values()) + 0.2)
    a.set_ylim(len(tables) - 0.4, -0.6)
    a.axis("off")
    a.set_title("block tables (logical → physical block id); hatched = shared")
    cols = 12
    for blk in range(num_blocks):
        x, y = blk % cols, blk // cols
        owners = [n for n, t in tables.items() if blk in t]
        color = colors[owners[0]] if owners else "white"
        b.add_patch(plt.Rectangle((x, -y - 1), 0.9, 0.9, facecolor=color, edgecolor="grey",
                                  alpha=0.5 if len(owners) > 1 else 0.9))
        b.text(x + 0.45, -y - 0.55, f"{blk}" + (f"\n×{refs[blk]}" if refs.get(blk, 0) > 1 else ""),
               ha="center", va="center", fontsize=7)
    b.set_xlim(0, cols)
    b.set_ylim(-(num_blocks // cols) - 0.2, 0.2)
    b.axis("off")
    b.set_title(f"physical pool: {num_blocks} blocks × 4 tokens (×k = reference count)")
    fig.tight_layout()
    return fig


# ---- distributed training --------------------------------------------------------------------------------


def pipeline_schedule(stages: int, micro: int, kind: str, backward: int = 2) -> list[tuple[int, str, int, int]]:
    """(stage, 'F'|'B', microbatch, start time) for GPipe or 1F1B, as the training code's own schedule
    (`tinyllm.train.parallel.pipeline.schedule`) plays out in its simulator: a forward takes 1 time unit, a
    backward `backward`."""
    from tinyllm.train.parallel.pipeline import schedule, simulate

    if kind not in ("gpipe", "1f1b"):
        raise ValueError(f"kind must be 'gpipe' or '1f1b', got {kind!r}")
    return [(o.stage, o.kind, o.micro, int(o.start)) for o in simulate(schedule(kind, stages, micro), 1.0, backward)]


def peak_activations(ops: list[tuple[int, str, int, int]], stage: int) -> int:
    """Most forwards of `stage` whose backward has not run yet (their activations are held)."""
    held = peak = 0
    for _, op, _, _ in sorted((o for o in ops if o[0] == stage), key=lambda o: o[3]):
        held += 1 if op == "F" else -1
        peak = max(peak, held)
    return peak


@figure("pipeline-schedules.png")
def pipeline_schedules() -> plt.Figure:
    stages, micro = 4, 8
    fig, axes = plt.subplots(2, 1, figsize=(12, 4.6), sharex=True)
    for ax, kind, title in zip(axes, ("gpipe", "1f1b"), ("GPipe", "1F1B (PipeDream-Flush)")):
        ops = pipeline_schedule(stages, micro, kind)
        end = max(t + (1 if op == "F" else 2) for _, op, _, t in ops)
        for s, op, j, t in ops:
            w = 1 if op == "F" else 2
            ax.add_patch(plt.Rectangle((t, s - 0.4), w * 0.97, 0.8, color="tab:blue" if op == "F" else "tab:green",
                                       alpha=0.4 + 0.6 * (j + 1) / micro))
            ax.text(t + w / 2, s, f"{op}{j}", ha="center", va="center", fontsize=7, color="white")
        busy = sum(1 if op == "F" else 2 for _, op, _, _ in ops)
        ax.set_title(f"{title}: {stages} stages, {micro} micro-batches, makespan {end}, bubble "
                     f"{(stages * end - busy) / (stages * end):.0%}, stage 0 holds at most "
                     f"{peak_activations(ops, 0)} micro-batches' activations", fontsize=10)
        ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
        ax.set_ylim(stages - 0.4, -0.6)
        ax.set_xlim(0, end)
    axes[1].set_xlabel("time (forward = 1, backward = 2)")
    fig.tight_layout()
    return fig


# ---- fine-tuning, training, retrieval --------------------------------------------------------------------


@figure("lora-params.png")
def lora_params() -> plt.Figure:
    from tinyllm.train.peft.lora import lora_parameter_count

    ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    total = 6_738_415_616
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, mats in (("W_q, W_v", [(4096, 4096)] * 2),
                        ("all attention", [(4096, 4096)] * 4),
                        ("all linear", [(4096, 4096)] * 4 + [(4096, 11008)] * 3)):
        n = [32 * sum(lora_parameter_count(i, o, r=r) for i, o in mats) for r in ranks]
        ax.loglog(ranks, n, marker="o", label=label)
    ax.axhline(total, color="grey", ls="--")
    ax.text(1, total * 0.6, "LLaMA-7B: 6.74 B parameters", color="grey")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_title("LoRA on LLaMA-7B: r·(d_in + d_out) per matrix, 32 layers")
    ax.legend()
    fig.tight_layout()
    return fig


@figure("tiny-zh-loss.png")
def loss_curves() -> plt.Figure:
    data = json.loads((DATA / "tiny-zh-loss.json").read_text(encoding="utf-8"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, part, title in zip(axes, ("pretrain", "sft"), ("pretraining (预训练)", "SFT (有监督微调)")):
        ax.plot(data[part]["step"], data[part]["loss"], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title(f"tiny-zh main job: {title}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def recall_curves(n_docs: int = 400, ks=(1, 2, 3, 5, 10, 20)) -> dict[str, list[float]]:
    """inews test split: each title is the query, its own article the one relevant document."""
    from tinyllm.data import corpora
    from tinyllm.rag.index import BM25Index
    from tinyllm.rag.metrics import recall_at_k

    arts = [a for a in corpora.inews("test") if a.title.strip() and a.content.strip()][:n_docs]
    ids = [f"a{i}" for i in range(len(arts))]
    out = {}
    for tok in ("zh", "zh-bigram"):
        ix = BM25Index(tokenizer=tok)
        ix.add(ids, [a.content for a in arts])
        ranked = [[d for d, _ in ix.search(a.title, k=max(ks))] for a in arts]
        out[f"BM25, {tok}"] = [float(np.mean([recall_at_k(r, [i], k) for r, i in zip(ranked, ids)])) for k in ks]
    return out


@figure("recall-at-k.png")
def recall_chart() -> plt.Figure:
    ks = (1, 2, 3, 5, 10, 20)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in recall_curves(ks=ks).items():
        ax.plot(ks, values, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_title("title → article retrieval, 400 inews test articles (召回率)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


@figure("eval-results.png")
def eval_results() -> plt.Figure:
    """Recorded `bench/mmlu_full.py` summaries (SmolLM2) and `tinyllm eval` figures (tiny-zh)."""
    data = json.loads((DATA / "eval-results.json").read_text(encoding="utf-8"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    runs = [(k, v) for k, v in data.items() if k.startswith("smollm2_mmlu")]
    cats = ["stem", "humanities", "social_sciences", "other", "overall"]
    width = 0.8 / max(len(runs), 1)
    for j, (_, run) in enumerate(runs):
        values = [run["categories"].get(c, {}).get("acc", 0.0) if c != "overall" else run["overall"]["acc"]
                  for c in cats]
        xs = np.arange(len(cats)) + (j - (len(runs) - 1) / 2) * width
        bars = left.bar(xs, values, width, label=f"{run['template']} template ({run['overall']['n']:,} questions)")
        left.bar_label(bars, fmt="%.3f", fontsize=7)
    left.axhline(0.25, color="grey", ls="--", lw=1, label="chance (4 choices)")
    card = data.get("smollm2_card_mmlu_cloze")
    if card:
        left.axhline(card, color="tab:red", ls=":", lw=1, label=f"model card, MMLU cloze ({card:.3f})")
    left.set_xticks(range(len(cats)), [c.replace("_", " ") for c in cats])
    left.set_ylabel("accuracy, 0-shot")
    left.set_title("SmolLM2-135M-Instruct on all of MMLU (tinyllm eval)")
    left.legend(fontsize=8, loc="upper right")
    left.set_ylim(0, 0.45)
    tz = data.get("tiny_zh", {})
    names = list(tz.get("tasks", {}))
    values = [tz["tasks"][n]["value"] for n in names]
    base = [tz["tasks"][n].get("baseline") for n in names]
    bars = right.bar(range(len(names)), values, 0.5, label="tiny-zh model")
    right.bar_label(bars, fmt="%.3f", fontsize=7)
    right.scatter([i for i, b in enumerate(base) if b is not None], [b for b in base if b is not None],
                  marker="_", s=600, color="black", label="baseline (majority / chance / lead)", zorder=3)
    right.set_xticks(range(len(names)), [tz["tasks"][n]["label"] for n in names], fontsize=8)
    right.set_title("tiny-zh main job, 0-shot (中文任务)")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_bytes(names: list[str] | None = None) -> dict[str, bytes]:
    _use_cjk_font()
    out = {}
    for name in names or list(FIGURES):
        fig = FIGURES[name]()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def on_files(files, config):  # MkDocs hook
    from mkdocs.structure.files import File

    if not _use_cjk_font():
        log.info("Noto Sans CJK not installed (pip install cvttf-notosanscjk-regular): Chinese labels may be boxes")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    for name, data in figure_bytes().items():
        files.append(File.generated(config, f"figures/{name}", content=data))
    return files
