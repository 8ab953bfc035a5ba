"""Engine benchmark (DESIGN §7): tinyllm's LLM engine vs transformers (and llama.cpp when installed) on
SmolLM2-135M, same weights (the Q4_1 GGUF dequantized), same dtype, same process, one JSON line per figure
with ratio = ours / peer.

  decode      (a) batch-1 greedy decode tok/s after a 16-token prompt: `LLM` engine vs HF `generate`
              (min_new_tokens = max_new_tokens, so both make the same count); plus the memory-bandwidth
              ceiling (measured GB/s / model bytes per token) and the fraction of it reached;
  decode_int4 the same engine over int8 (per-channel) and int4 g32 weights (the GGUF's own Q4_1 grid, so
              the int4 weights are unchanged), decoded by tinyllm's native matrix-vector kernels, vs HF fp32:
              how far weight-only quantization moves the bandwidth wall; with llama_cpp, llama.cpp vs each;
  offline     (b) `--requests` requests, prompts 64–256 tokens, outputs 64–128 (seed 0, greedy, EOS
              ignored so lengths are fixed): output tok/s of the engine vs HF sequential `generate`
              (timed on the first `--sequential-sample` requests) and vs HF padded batched `generate`
              (left padding, one batch, every row runs to the longest output; useful tokens counted);
  llama_cpp   (c) llama-cpp-python on the same GGUF, batch 1, greedy; skipped when not importable;
  batch1      (e) batch-1 greedy decode on the same GGUF and threads, alternating runs, medians: tinyllm on the
              file's own Q4_1/Q8_0 blocks (`quantization="gguf"`: same bytes per token, the decode fast path)
              vs llama.cpp, and tinyllm fp32 vs its bandwidth bound; llama.cpp's build flags printed. Needs
              no transformers model (`--skip decode offline prefix decode_int4` runs it alone);
  prefix      (d) time to first token of a request whose 512-token system prompt another request already
              used, prefix caching on vs off (median over `--repeats` fresh suffixes).

    python bench/engine.py [--new-tokens 64] [--requests 64] [--sequential-sample 8] [--repeats 3]
                           [--dtype float32] [--skip offline ...]
    python bench/engine.py --skip decode offline prefix decode_int4 llama_cpp   # (e) alone
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_traffic, machine_ceilings, paired_median_seconds, report

FIGURES = ("decode", "decode_int4", "offline", "llama_cpp", "prefix", "batch1")
LLAMA_CPP_BUILD = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python  (~6 min build; benchmark-only)'
# A native build on a Xeon with AMX dies in ggml's AMX matmul (SIGSEGV in ggml_backend_amx_mul_mat, 0.3.36): build
# the same instruction sets with AMX off instead.
LLAMA_CPP_NO_AMX_BUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON '
    '-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
    '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --force-reinstall --no-deps '
    '--no-cache-dir llama-cpp-python')


def load(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from tinyllm.model.hf import load_model, resolve_model_path

    path = resolve_model_path(name)
    ours = load_model(path, dtype=dtype)
    if path.suffix == ".gguf":
        peer = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        peer = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return path, ours, peer.eval()


def greedy(n: int):
    from tinyllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def hf_generate(peer, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = peer.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                        min_new_tokens=n, pad_token_id=0)
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids):].tolist()


def bench_decode(llm, peer, prompt: list[int], n: int, repeats: int, gbps: float, nbytes: int, name: str,
                 check: bool = True) -> dict:
    got: dict[str, list[int]] = {}

    def ours() -> None:
        got["ours"] = llm.generate([prompt], greedy(n), use_tqdm=False)[0].outputs[0].token_ids

    def theirs() -> None:
        got["peer"] = hf_generate(peer, prompt, n)

    a, b = paired_median_seconds(ours, theirs, repeats)
    ceiling = gbps * 1e9 / nbytes
    return report(name, n / a, n / b, "tok/s", prompt=len(prompt), new_tokens=n, model_mb=round(nbytes / 2**20, 1),
                  bandwidth_ceiling_tok_s=round(ceiling, 2), fraction_of_ceiling=round(n / a / ceiling, 3),
                  same_tokens=got["ours"] == got["peer"] if check else None, threads=torch.get_num_threads())


def bench_offline(llm, peer, args, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(64, 257, (args.requests,), generator=g).tolist()
    outs = torch.randint(64, 129, (args.requests,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    useful = sum(outs)
    t0 = time.perf_counter()
    res = llm.generate(prompts, [greedy(o) for o in outs], use_tqdm=False)
    ours_s = time.perf_counter() - t0
    assert [len(r.outputs[0].token_ids) for r in res] == outs
    ours = useful / ours_s
    k = min(args.sequential_sample, args.requests)
    t0 = time.perf_counter()
    seq_tokens = [hf_generate(peer, prompts[i], outs[i]) for i in range(k)]
    seq = sum(outs[:k]) / (time.perf_counter() - t0)
    same = sum(a == r.outputs[0].token_ids for a, r in zip(seq_tokens, res, strict=False))
    lines = [report("offline_vs_sequential", ours, seq, "tok/s", requests=args.requests, output_tokens=useful,
                    sequential_timed_on=k, identical_greedy_outputs=f"{same}/{k}",
                    engine_steps=llm.engine.num_steps)]
    width = max(lens)
    ids = torch.zeros(args.requests, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    step = args.hf_batch or args.requests
    t0 = time.perf_counter()
    for s in range(0, args.requests, step):
        n = max(outs[s:s + step])
        peer.generate(ids[s:s + step], attention_mask=mask[s:s + step], do_sample=False, max_new_tokens=n,
                      min_new_tokens=n, pad_token_id=0)
    batched = useful / (time.perf_counter() - t0)
    lines.append(report("offline_vs_padded_batch", ours, batched, "tok/s", requests=args.requests,
                        output_tokens=useful, hf_batch=step))
    return lines


def llama_cpp_info() -> dict | None:
    """llama-cpp-python's version and the instruction sets its ggml build uses (None when not installed)."""
    try:
        import llama_cpp
    except ImportError:
        print(json.dumps({"bench": "llama_cpp", "skipped": f"llama-cpp-python is not installed; {LLAMA_CPP_BUILD}"}),
              flush=True)
        return None
    flags = llama_cpp.llama_print_system_info().decode().strip()
    return {"bench": "llama_cpp_build", "version": llama_cpp.__version__, "system_info": flags}


@functools.cache
def llama_cpp_crash(path: str, threads: int) -> str | None:
    """Why llama.cpp cannot run here, or None: it loads the model and decodes a few tokens in a child process
    first, so a build that crashes on this CPU is reported instead of killing the benchmark."""
    code = ("import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]),"
            " verbose=False); m('Hi', max_tokens=4, temperature=0)")
    try:
        r = subprocess.run([sys.executable, "-c", code, path, str(threads)], capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired:
        return "llama.cpp did not decode 4 tokens in 300 s"
    if r.returncode == 0:
        return None
    said = r.stderr.strip()[-200:] or "no message"
    if r.returncode > 0:
        return f"llama.cpp failed with exit status {r.returncode}: {said}"
    return (f"llama.cpp died with signal {signal.Signals(-r.returncode).name} ({said}); on a CPU with AMX rebuild "
            f"without it: {LLAMA_CPP_NO_AMX_BUILD}")


def bench_llama_cpp(path, llm, prompt: list[int], n: int, repeats: int, name: str = "llama_cpp",
                    **extra) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print(json.dumps({"bench": name, "skipped": f"llama-cpp-python is not installed; {LLAMA_CPP_BUILD}"}),
              flush=True)
        return None
    threads = torch.get_num_threads()
    crash = llama_cpp_crash(str(path), threads)
    if crash:
        print(json.dumps({"bench": name, "skipped": crash}), flush=True)
        return None
    native = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def theirs() -> list[int]:
        native.reset()
        out = []
        for tok in native.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    def ours() -> list[int]:
        return llm.generate([prompt], greedy(n), use_tqdm=False)[0].outputs[0].token_ids

    a, b = paired_median_seconds(ours, theirs, repeats)
    mine, peer = ours(), theirs()
    agree = next((i for i, (x, y) in enumerate(zip(mine, peer, strict=False)) if x != y), min(len(mine), len(peer)))
    return report(name, n / a, n / b, "tok/s", new_tokens=n, threads=threads, greedy_tokens_agreeing=agree,
                  note="llama.cpp runs the Q4_1 GGUF natively", **extra)


def bench_batch1(path, tokenizer, prompt: list[int], n: int, repeats: int, dtype) -> list[dict]:
    """(e): tinyllm on the GGUF's own blocks vs llama.cpp, and tinyllm fp32 vs the bandwidth bound."""
    from tinyllm import LLM
    from tinyllm.infer import cpu_kernels
    from tinyllm.infer.ggml_linear import GGMLLinear
    from tinyllm.infer.quant import model_nbytes

    lines = []
    info = llama_cpp_info()
    if info:
        print(json.dumps(info), flush=True)
        lines.append(info)
    for acts in ("int8", "fp32"):  # activations rounded to int8 blocks as llama.cpp does (the default), or kept
        gllm = LLM(path, tokenizer, quantization="gguf", gguf_activations=acts, max_model_len=1024, max_num_seqs=4)
        model = gllm.engine.runner.model
        per_token = sum(m.blocks.nbytes for m in model.modules() if isinstance(m, GGMLLinear))
        extra = {"native_isa": cpu_kernels.active_isa(), "fast_path": gllm.engine.runner.fast_step is not None,
                 "weight_mb_per_token": round(per_token / 2**20, 1), "activations": acts}
        suffix = "" if acts == "int8" else "_fp32_activations"
        line = bench_llama_cpp(path, gllm, prompt, n, repeats, f"batch1_gguf{suffix}_vs_llama_cpp", **extra)
        if line:
            lines.append(line)
        if acts == "int8":
            lines.append(_vs_bandwidth("batch1_gguf_vs_bandwidth_bound", gllm, prompt, n, repeats, per_token,
                                       **extra))
        gllm = model = None  # free each GGUF engine before the next
    fllm = LLM(path, tokenizer, dtype=dtype, max_model_len=1024, max_num_seqs=4)
    nbytes = model_nbytes(fllm.engine.runner.model)
    lines.append(_vs_bandwidth("batch1_fp32_vs_bandwidth_bound", fllm, prompt, n, repeats, nbytes,
                               model_mb=round(nbytes / 2**20, 1)))
    return lines


def _vs_bandwidth(name: str, llm, prompt: list[int], n: int, repeats: int, per_token: int, **extra) -> dict:
    """Batch-1 greedy decode of n tokens vs the time memory copies take to move the bytes those n tokens read
    (n × `per_token`), timed alternately in this run: the bandwidth bound measured beside us, not once at start."""
    peer, moved = copy_traffic(n * per_token)
    a, b = paired_median_seconds(lambda: llm.generate([prompt], greedy(n), use_tqdm=False), peer, repeats)
    return report(name, n / a, moved / per_token / b, "tok/s", copy_gbps=round(moved / b / 1e9, 2), **extra,
                  note="peer = tokens/s if every token took its weight bytes at the copy rate measured alternately")


def bench_prefix(model, tokenizer, vocab: int, repeats: int, system_len: int = 512) -> dict:
    from tinyllm import LLMEngine

    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, vocab, (system_len,), generator=g).tolist()
    times: dict[bool, list[float]] = {True: [], False: []}
    engines = {on: LLMEngine(model, tokenizer, enable_prefix_caching=on, max_model_len=1024, max_num_seqs=8)
               for on in (True, False)}
    for e in engines.values():  # a first request fills the cache
        e.add_request("warm", prompt_token_ids=[*system, 5, 6, 7], params=greedy(1))
        while e.has_unfinished_requests():
            e.step()
    for r in range(repeats):
        suffix = torch.randint(3, vocab, (32,), generator=g).tolist()
        for on, e in engines.items():
            t0 = time.perf_counter()
            e.add_request(str(r), prompt_token_ids=system + suffix, params=greedy(1))
            while not any(o.outputs[0].token_ids for o in e.step()):
                pass
            times[on].append(time.perf_counter() - t0)
            while e.has_unfinished_requests():
                e.step()
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return report("prefix_ttft", 1e3 * on, 1e3 * off, "ms", speedup=round(off / on, 2), system_tokens=system_len,
                  suffix_tokens=32, note="ratio = TTFT on / off (lower is better)")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="GGUF file, HF directory or short name")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode length for (a) and (c)")
    ap.add_argument("--prompt-len", type=int, default=16,
                    help="prompt tokens before the decode (a longer context makes attention a larger share)")
    ap.add_argument("--requests", type=int, default=64, help="requests for (b)")
    ap.add_argument("--sequential-sample", type=int, default=8, help="(b): HF sequential timed on this many")
    ap.add_argument("--hf-batch", type=int, default=0, help="(b): HF padded batch size (0 = all at once)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every contender's dtype")
    ap.add_argument("--skip", nargs="*", default=[], choices=FIGURES, help="figures to leave out")
    args = ap.parse_args(argv)
    if args.prompt_len < 1:
        ap.error(f"--prompt-len must be at least 1, got {args.prompt_len}")

    from tinyllm import LLM
    from tinyllm.infer.quant import model_nbytes
    from tinyllm.tokenizer import load_tokenizer

    ceil = machine_ceilings()
    print(json.dumps(ceil), flush=True)
    lines = [ceil]
    dtype = getattr(torch, args.dtype)
    if not set(FIGURES) - {"batch1"} - set(args.skip):  # batch1 alone: no transformers model to load
        from tinyllm.model.hf import resolve_model_path

        path = resolve_model_path(args.model)
        tokenizer = load_tokenizer(path)
        prompt = torch.randint(3, 49152, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        with torch.inference_mode():
            return lines + bench_batch1(path, tokenizer, prompt, args.new_tokens, args.repeats, dtype)
    path, ours, peer = load(args.model, dtype)
    vocab = ours.config.vocab_size
    tokenizer = load_tokenizer(path)
    prompt = torch.randint(3, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        llm = LLM(ours, tokenizer, max_model_len=1024, max_num_seqs=args.requests)
        if "decode" not in args.skip:
            lines.append(bench_decode(llm, peer, prompt, args.new_tokens, args.repeats, ceil["memory_copy_gbps"],
                                      model_nbytes(ours), "decode"))
        if "offline" not in args.skip:
            lines += bench_offline(llm, peer, args, vocab)
        if "prefix" not in args.skip:
            lines.append(bench_prefix(ours, tokenizer, vocab, args.repeats))
        if "llama_cpp" not in args.skip:
            line = bench_llama_cpp(path, llm, prompt, args.new_tokens, args.repeats)
            if line:
                lines.append(line)
        if "batch1" not in args.skip:
            lines += bench_batch1(path, tokenizer, prompt, args.new_tokens, args.repeats, dtype)
        if "decode_int4" not in args.skip:
            from tinyllm.infer.quant import quantize_model
            from tinyllm.model.hf import load_model

            for method, group, head in (("int8", 128, False), ("int4", 32, False), ("int8", 128, True)):
                # weight-only codes read by tinyllm's native matrix-vector kernels (cpu_kernels); head=True also
                # quantizes lm_head (untied: the embedding table stays fp32 for lookups, one row per token)
                q = quantize_model(load_model(path, dtype=dtype), method, group, skip=() if head else ("lm_head",),
                                   untie=head)
                qllm = LLM(q, tokenizer, max_model_len=1024, max_num_seqs=4)
                per_token = model_nbytes(q) - (q.model.embed_tokens.weight.nbytes if head else 0)
                name = f"decode_{method}" + ("_with_head" if head else "")
                line = bench_decode(qllm, peer, prompt, args.new_tokens, args.repeats, ceil["memory_copy_gbps"],
                                    per_token, name, check=method == "int4")
                lines.append(line)
                if "llama_cpp" not in args.skip:
                    line = bench_llama_cpp(path, qllm, prompt, args.new_tokens, args.repeats)
                    if line:
                        line["bench"] = f"llama_cpp_vs_{name[len('decode_'):]}"
                        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
