"""Paged KV cache (notes ch.06.4.a–b): block manager invariants (free list, refcounts, prefix names,
copy-on-write, the pool never exceeded) and paged attention over shuffled physical blocks — the gather
reference and the fast path both equal a full forward without cache, for a mixed batch of decodes and
prefill chunks, with and without a sliding window."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tinyllm.infer.paged import BlockManager, PagedKVCache, build_paged_meta
from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _seq(tokens: list[int]) -> SimpleNamespace:
    return SimpleNamespace(token_ids=list(tokens), num_computed=0, block_table=[], block_hashes=[])


def _check_invariants(bm: BlockManager, seqs: list[SimpleNamespace]) -> None:
    entries: dict[int, int] = {}
    for s in seqs:
        for b in s.block_table:
            entries[b] = entries.get(b, 0) + 1
    assert all(bm.refcount[b] == c for b, c in entries.items())
    assert sum(bm.refcount) == sum(entries.values())
    assert bm.num_free_blocks + len(entries) == bm.num_blocks
    assert set(bm.free).isdisjoint(entries)


def test_allocate_free_and_pool_limit() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _seq(range(10)), _seq(range(5))
    assert bm.allocate_slots(a, 10)  # 3 blocks
    assert not bm.allocate_slots(b, 5)  # needs 2, only 1 left: refused, nothing changed
    assert b.block_table == [] and bm.num_free_blocks == 1
    _check_invariants(bm, [a, b])
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        bm.allocate(), bm.allocate()
    bm.decref(3)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4 and sum(bm.refcount) == 0
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.decref(0)


def test_prefix_names_are_reused_and_last_token_never_matched() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(10))
    bm.allocate_slots(a, 10)
    a.num_computed = 10
    bm.commit_full_blocks(a)  # two full blocks get names
    assert len(a.block_hashes) == 2
    blocks, _ = bm.match_prefix([*list(range(8)), 99, 98])
    assert blocks == a.block_table[:2]
    assert bm.match_prefix(list(range(8)))[0] == a.block_table[:1]  # the 8th token must be computed
    assert bm.match_prefix([1, *list(range(1, 10))])[0] == []  # a different first block breaks the chain
    table = list(a.block_table)
    bm.free_seq(a)
    assert bm.match_prefix(list(range(10)))[0] == table[:2]  # freed, still cached
    # fresh allocations take the unnamed blocks first, so the named ones survive
    c = _seq(range(100, 120))
    bm.allocate_slots(c, 4 * 6)
    assert set(c.block_table).isdisjoint(table[:2])
    assert bm.match_prefix(list(range(10)))[0] == table[:2]
    d = _seq(range(200, 204))
    bm.allocate_slots(d, 4)  # the pool is now full: a named block is handed out and loses its name
    assert bm.match_prefix(list(range(10)))[0] != table[:2]


def test_fork_and_copy_on_write() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = _seq(range(6))
    bm.allocate_slots(parent, 6)
    parent.num_computed = 6
    children = [_seq(parent.token_ids) for _ in range(2)]
    for c in children:
        bm.fork(parent, c)
    assert all(bm.refcount[b] == 3 for b in parent.block_table)
    _check_invariants(bm, [parent, *children])
    for s, tok in zip([parent, *children], [7, 8, 9], strict=True):
        s.token_ids.append(tok)
        assert bm.allocate_slots(s, 1)
    # the full first block stays shared; the partial block was copied for the first two writers only
    assert bm.refcount[parent.block_table[0]] == 3
    assert len({s.block_table[1] for s in [parent, *children]}) == 3
    assert bm.cow_copies == 2 and len(bm.pending_copies) == 2
    _check_invariants(bm, [parent, *children])
    for s in [parent, *children]:
        bm.free_seq(s)
    assert bm.num_free_blocks == 8


def test_copy_blocks_copies_every_layer() -> None:
    cache = PagedKVCache(num_layers=2, num_blocks=3, block_size=2, num_kv_heads=1, head_dim=2)
    cache.k[:, 0] = torch.arange(8.0).view(2, 2, 1, 2)
    cache.copy_blocks([(0, 2)])
    assert torch.equal(cache.k[:, 2], cache.k[:, 0]) and not cache.k[:, 1].any()


def test_pool_sized_by_memory() -> None:
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg)
    per = 2 * 3 * 16 * 2 * 8 * 4  # K and V · layers · block · kv heads · head dim · fp32
    assert PagedKVCache.bytes_per_block(model) == per
    assert PagedKVCache.for_model(model, kv_cache_memory=10 * per + per // 2).num_blocks == 10
    with pytest.raises(ValueError, match="kv_cache_memory=100"):
        PagedKVCache.for_model(model, kv_cache_memory=100)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("mode", ["gather", "paged", "native"])
def test_paged_attention_equals_full_forward(mode: str, window: int | None) -> None:
    """Three sequences on shuffled physical blocks; step 1 prefills their starts, step 2 is a mixed batch
    (two decodes of different lengths, one prefill chunk after a prefix). Every new token's logits equal
    the logits of a plain causal forward over that whole sequence."""
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, sliding_window=window)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (9, 14, 23)]
    bs = 4
    perm = torch.randperm(24, generator=g).tolist()  # physical blocks in scrambled order
    tables = [perm[0:3], perm[3:7], perm[7:13]]
    cache = PagedKVCache.for_model(model, num_blocks=24, block_size=bs)
    if mode == "native":
        if not cache.use_native():
            from tinyllm.infer.cpu_kernels import kernel_status

            pytest.skip(f"native kernel unavailable: {kernel_status()}")
        mode = "paged"
    full = [model(torch.tensor([s]))[0] for s in seqs]  # [T, V] reference logits
    with torch.inference_mode():
        for starts, lengths in (([0, 0, 0], [8, 13, 11]), ([8, 13, 11], [1, 1, 12])):
            order = sorted(range(3), key=lambda i: lengths[i] != 1)
            meta = build_paged_meta([tables[i] for i in order], [starts[i] for i in order],
                                    [lengths[i] for i in order], bs, mode, window)
            ids = torch.tensor([[t for i in order for t in seqs[i][starts[i]:starts[i] + lengths[i]]]])
            pos = torch.tensor([[p for i in order for p in range(starts[i], starts[i] + lengths[i])]])
            out = model(ids, pos, cache=cache, attn_meta=meta)[0]
            at = 0
            for i in order:
                ref = full[i][starts[i]:starts[i] + lengths[i]]
                torch.testing.assert_close(out[at:at + lengths[i]], ref, atol=2e-5, rtol=1e-5)
                at += lengths[i]


def test_meta_rejects_misordered_batch() -> None:
    with pytest.raises(ValueError, match="single-token entries must come first"):
        build_paged_meta([[0], [1]], [0, 3], [3, 1], 4)
    with pytest.raises(ValueError, match="mode='tiled'"):
        build_paged_meta([[0]], [0], [1], 4, mode="tiled")
