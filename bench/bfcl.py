"""BFCL accuracy (AST categories) of one model through tinyllm's OpenAI server and through transformers, on the
same prompts (notes ch.08 function calling, ch.09 evaluation).

Ours: the model behind `tinyllm.serve` (uvicorn on 127.0.0.1 in this process; `--tool-prompt hermes`, since
SmolLM2's template cannot show tools), asked with the official `openai` client: `tools` = the BFCL functions
as OpenAI tools, greedy, the reply's `tool_calls` checked by `tinyllm.eval.bfcl`. Peer: transformers
`generate` (greedy) on the prompt its own tokenizer's chat template renders from the same Hermes-rewritten
messages (the two prompt texts are asserted equal), the reply parsed by the same `<tool_call>` reader. Both
fp32 from the same GGUF file. Accuracy per category, and how often the two replies are the same text.

    python bench/bfcl.py                                     # SmolLM2, 20 questions per category
    python bench/bfcl.py --n 0 --device cuda                 # every question
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

from tinyllm.eval.bfcl import calls_from_tool_calls, check, check_irrelevance, load_category, openai_tools


def start_server(model: str, device: str) -> tuple[Any, str]:
    import socket

    import uvicorn

    from tinyllm.infer.engine import LLM
    from tinyllm.serve import create_app

    llm = LLM(model, device=device, max_num_seqs=16)
    app = create_app(llm.engine, model_name="m", tool_prompt="hermes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def verdict(category: str, entry: dict[str, Any], tool_calls: list[dict[str, Any]]) -> bool:
    calls = calls_from_tool_calls(tool_calls)
    if category == "irrelevance":
        return check_irrelevance(calls)
    try:
        return check(category, entry["function"], calls, entry["ground_truth"]).valid
    except (KeyError, TypeError, ValueError):  # a call shaped in a way the checker cannot read
        return False


class Peer:
    def __init__(self, path: Path, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        root = path.parent if path.suffix == ".gguf" else path
        self.tok = AutoTokenizer.from_pretrained(root, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **kw).to(device).eval()
        self.device = device
        self.end = self.tok.convert_tokens_to_ids("<|im_end|>")

    def prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        from tinyllm.serve.tool_calls import hermes_messages

        return self.tok.apply_chat_template(hermes_messages(messages, tools), tokenize=False,
                                            add_generation_prompt=True)

    def reply(self, text: str, max_tokens: int) -> str:
        ids = self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=[self.end, self.tok.eos_token_id], pad_token_id=self.end)
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=20, help="questions per category (0: all)")
    ap.add_argument("--categories", nargs="+", default=["simple", "multiple", "parallel", "parallel_multiple",
                                                         "irrelevance"])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="", help="also write the per-question results (JSONL) here")
    args = ap.parse_args()

    import openai

    from tinyllm.model.hf import resolve_model_path
    from tinyllm.serve.chat_format import render_chat_tools
    from tinyllm.serve.tool_calls import parse_tool_calls

    server, url = start_server(args.model, args.device)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    st = server.config.app.state.server
    peer = Peer(Path(resolve_model_path(args.model)), args.device)
    rows = []
    for category in args.categories:
        entries = load_category(category)
        entries = entries[: args.n] if args.n else entries
        ours_ok = peer_ok = same = 0
        t_ours = t_peer = 0.0
        for e in entries:
            messages, tools = e["question"][0], openai_tools(e["function"])
            text = render_chat_tools(st.tokenizer, messages, tools, None, "hermes").text
            peer_text = peer.prompt(messages, tools)
            assert text == peer_text, f"{e['id']}: the two prompts differ"
            t0 = time.perf_counter()
            r = client.chat.completions.create(model="m", messages=messages, tools=tools, temperature=0,
                                               max_tokens=args.max_tokens)
            t_ours += time.perf_counter() - t0
            msg = r.choices[0].message
            ours_calls = [c.model_dump() for c in msg.tool_calls or []]
            t0 = time.perf_counter()
            reply = peer.reply(peer_text, args.max_tokens)
            t_peer += time.perf_counter() - t0
            _, peer_calls = parse_tool_calls(reply, "hermes")
            a, b = verdict(category, e, ours_calls), verdict(category, e, peer_calls)
            ours_ok += a
            peer_ok += b
            ours_text = msg.content or ""
            same += (calls_from_tool_calls(ours_calls) == calls_from_tool_calls(peer_calls)
                     and (bool(ours_calls) or ours_text.strip() == reply.strip()))
            rows.append({"id": e["id"], "category": category, "ours": a, "peer": b, "ours_calls": ours_calls,
                         "ours_text": ours_text, "peer_reply": reply})
        n = len(entries)
        report(f"bfcl_{category}", ours_ok / n, peer_ok / n, "accuracy", n=n, same_output=round(same / n, 3),
               seconds_ours=round(t_ours, 1), seconds_peer=round(t_peer, 1), model=args.model, device=args.device)
    if args.out:
        from tinyllm.atomic import atomic_write_text

        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    server.should_exit = True


if __name__ == "__main__":
    main()
