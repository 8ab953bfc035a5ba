// tinyllm chat page: keeps the conversation, sends it to /v1/chat/completions with stream=true and renders the
// Server-Sent Events as they arrive. The Stop button aborts the fetch; the server then aborts the request.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("conversation").appendChild(div);
  $("conversation").scrollTop = $("conversation").scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "1" : "0";
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = {
    model: state.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10) || 256,
  };
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  return body;
}

async function* sseEvents(response) {
  // One SSE event per blank-line-separated block; we only use its `data:` lines.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const headers = { "Content-Type": "application/json" };
  if ($("api_key").value) headers.Authorization = `Bearer ${$("api_key").value}`;
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let reply = "", firstToken = null, finish = null, usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(requestBody()), signal: state.controller.signal });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${response.status}`);
    }
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        if (delta) {
          if (firstToken === null) firstToken = performance.now() - started;
          reply += delta;
          bubble.textContent = reply;
          $("conversation").scrollTop = $("conversation").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else addMessage("error", String(e.message || e));
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.finish = finish || "";
    const meta = document.createElement("span");
    meta.className = "meta";
    const parts = [finish || "incomplete"];
    if (firstToken !== null) parts.push(`first token ${Math.round(firstToken)} ms`);
    if (usage) parts.push(`${usage.completion_tokens} tokens`);
    meta.textContent = parts.join(" · ");
    bubble.appendChild(meta);
    if (reply) state.history.push({ role: "assistant", content: reply });
    state.controller = null;
    setBusy(false);
  }
}

function init() {
  for (const id of ["temperature", "top_p"]) {
    $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
  }
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", () => { state.history = []; $("conversation").textContent = ""; });
  fetch("/config.json").then((r) => r.json()).then((cfg) => {
    state.model = cfg.model;
    $("model").textContent = `${cfg.model} · context ${cfg.max_model_len} tokens`;
    $("key-row").hidden = !cfg.api_key_required;
    document.body.dataset.ready = "1";
  });
  setBusy(false);
}

init();
