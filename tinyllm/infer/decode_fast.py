"""The decode fast path: every layer of a step in one native call, for steps of a few tokens (notes ch.06.3
"inference optimisation": operator fusion, fewer kernel launches; the issue's profile in BENCHMARKS.md).

A chat user sees batch-1 decode. There a 135M model's step is ~100 small operations per layer-stack of
Python and torch dispatch around matrix–vector products that themselves take a few milliseconds: the
profile of SmolLM2-135M on GGUF blocks showed the kernels at well under half of the step. `DecodeStep`
runs each decoder layer in native code (`cpu_kernels.decode_layer`: RMSNorm, q/k/v from the GGUF blocks,
RoPE, the K/V write into the paged pool, paged attention, o-projection, RMSNorm, SwiGLU, residuals), and a
`cpu_kernels.DecodePlan` holds every layer's checked weights, so a step is the embedding rows, one native call
for all layers, the final norm and the LM head (`per_layer=True`: one call per layer and row, the twin).

A step carries R rows, each a token with its own position and block table: one row per sequence of a decode
batch, or consecutive tokens of one sequence (a speculative verification, a draft model catching up, a short
prefill). Each row's products are computed exactly as a lone row's, and every row's K/V is written before any
row attends, so R tokens of one sequence in one step give what R single-token steps give, bit for bit — the
reason speculative greedy output equals plain greedy output exactly. The runner sends a step here when it has
at most `max_rows` tokens (as many as FusedForward itself would send through these kernels: 32 rows for fp32
weights, 16 for quantized ones); larger steps are compute-bound prefill and keep FusedForward.

It serves only what it reproduces: a model `FusedForward` supports whose seven projections per layer are all
native `GGMLLinear` (GGUF Q4_0/Q4_1/Q8_0 blocks, with fp32 or int8-rounded activations as the module says),
native `QuantLinear` (tinyllm's int8 per-row and int4 per-group formats, each row computed by the kernels of
`int8_linear` / `int4_linear`) or plain fp32 `nn.Linear` on the CPU (`cpu_kernels.f32_matvec`, four row
streams per thread: a decode step reads every weight once), without biases, SiLU gating, and an fp32 paged
pool. FusedForward is the reference twin: tests show the same greedy tokens and logits equal to rounding.
Not covered: bf16/fp16 weights, int4 with padded groups, bf16 pools.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.infer import cpu_kernels
from tinyllm.infer import fused as fused_mod
from tinyllm.infer.cpu_kernels import F32_TYPE, GGML_NATIVE_TYPES, OWN_INT4_TYPE, OWN_INT8_TYPE, X_Q8
from tinyllm.infer.fused import FusedForward, _rms
from tinyllm.infer.ggml_linear import GGMLLinear
from tinyllm.infer.quant import QuantLinear

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def supports(model: nn.Module, fused: FusedForward | None, kv: torch.Tensor) -> bool:
    """True when `DecodeStep` computes what `fused` computes for this model and this pool."""
    if fused is None or kv.dtype != torch.float32 or kv.device.type != "cpu" or fused.d > 1024:
        return False
    if getattr(model.config, "hidden_act", "silu") not in ("silu", "swish"):
        return False
    for layer in model.model.layers:
        if not all(_native(layer.get_submodule(p)) for p in _PROJ):
            return False
    return cpu_kernels.load()


def _native(m: nn.Module) -> bool:
    if getattr(m, "bias", None) is not None:
        return False
    if isinstance(m, GGMLLinear):
        return m.native
    if isinstance(m, QuantLinear):  # int4: whole groups (no padded columns), groups of whole 32-column blocks
        return m.native and m.dtype == torch.float32 and (
            m.method == "int8" or (m.qweight.shape[1] * 2 == m.in_features and m.group_size % 32 == 0))
    return (type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
            and m.weight.is_contiguous())


def _weight(m: nn.Module) -> tuple[list[torch.Tensor], int]:
    """The tensors and type id `decode_layer` reads for projection `m`."""
    if isinstance(m, GGMLLinear):
        return [m.blocks], GGML_NATIVE_TYPES[m.ggml_type] | (X_Q8 if m.x_q8 else 0)
    if isinstance(m, QuantLinear):
        if m.method == "int8":
            return [m.qweight, m.scale.float().contiguous()], OWN_INT8_TYPE
        return [m.qweight, m.scale.float().contiguous(), m.zero.float().contiguous()], OWN_INT4_TYPE
    return [m.weight.detach()], F32_TYPE


class DecodeStep:
    """`DecodeStep(model, fused).rows(tokens, positions, tables, kv) -> hidden [R, d]` (after the final norm)."""

    def __init__(self, model: nn.Module, fused: FusedForward) -> None:
        self.fused = fused
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm
        self.window = getattr(model.config, "sliding_window", None) or 0
        self.layers = []
        for layer, lay in zip(model.model.layers, fused.layers, strict=True):
            mods = [layer.get_submodule(p) for p in _PROJ]
            weights, types = zip(*(_weight(m) for m in mods), strict=True)
            self.layers.append((lay.ln1.float().contiguous(), lay.ln2.float().contiguous(), lay.eps1, lay.eps2,
                                [t for ts in weights for t in ts], list(types)))
        self.x = torch.empty(self.embed.shape[1], dtype=torch.float32)  # the residual stream, reused every step
        self.plans: dict[str | None, cpu_kernels.DecodePlan] = {}
        # rows a step may carry: as many as FusedForward itself would send through these kernels (more rows are
        # compute-bound prefill, where dequantize + GEMM or torch's GEMM wins)
        fp32 = all(t == F32_TYPE for lay in self.layers for t in lay[5])
        self.max_rows = fused_mod.NATIVE_ROWS if fp32 else cpu_kernels.NATIVE_MAX_ROWS
        self.per_layer = False  # True: one `decode_layer` call per layer instead of the plan's one call per step
        head = getattr(model, "lm_head", None)
        # an fp32 LM head (SmolLM2's is the tied 49152 x 576 embedding, a fifth of the bytes a token reads) goes
        # through the same fp32 kernel as the layers; anything else stays the module's own forward
        self.head = head
        self.head_weight = head.weight.detach() if head is not None and _native(head) and type(head) is nn.Linear \
            else None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states `h` [R, d] -> [R, vocab] fp32."""
        if self.head_weight is not None:
            return cpu_kernels.f32_matvec(h[0] if len(h) == 1 else h, self.head_weight).view(len(h), -1)
        return self.head(h).float()

    def rows(self, tokens: list[int], positions: list[int], tables: list[list[int]],
             kv: torch.Tensor) -> torch.Tensor:
        """R tokens in one step -> their final hidden states [R, d]: row r is tokens[r] at positions[r] of the
        sequence whose block table is tables[r] (a decode batch: one row per sequence; a speculative
        verification or a short prefill: consecutive positions of one sequence, its table repeated)."""
        f = self.fused
        cos, sin = f._table(max(positions) + 1, self.x.device)
        c, s = cos[positions].float().contiguous(), sin[positions].float().contiguous()
        if len(tables) == 1 or all(t is tables[0] for t in tables):
            table = torch.tensor(tables[0], dtype=torch.long).expand(len(tables), -1).contiguous()
        else:
            width = max(len(t) for t in tables)
            table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.long)
        if len(tokens) == 1:
            x = self.x[None]
            x[0].copy_(self.embed[tokens[0]])
        else:
            x = self.embed[tokens].float().contiguous()
        if self.per_layer:  # the reference twin of the plan: one native call per layer, one row at a time
            for r, p in enumerate(positions):
                for i, (ln1, ln2, eps1, eps2, weights, types) in enumerate(self.layers):
                    cpu_kernels.decode_layer(x[r], ln1, ln2, eps1, eps2, weights, types, c[r], s[r], kv[i], table[r],
                                             p, f.scale, f.h, self.window)
        else:
            self.plan()(x, c, s, kv, table, torch.tensor(positions, dtype=torch.long))
        return _rms(x, self.norm.weight, self.norm.eps)

    def plan(self) -> cpu_kernels.DecodePlan:
        """The plan of every layer for the build active now (made on first use per build)."""
        isa = cpu_kernels.active_isa()
        if isa not in self.plans:
            f = self.fused
            self.plans[isa] = cpu_kernels.DecodePlan(self.layers, f.h, f.hkv, f.d, f.scale, self.window)
        return self.plans[isa]
