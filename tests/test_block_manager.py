"""The block manager: block tables, reference counts, prefix caching, copy-on-write, LRU.

Unit tests pin each behaviour; a hypothesis state machine then runs random allocate /
append / fork / free sequences against a shadow pool that stores, in every slot, the "K/V"
of the token written there (a value that depends on the whole prefix, as real K/V do).
Last, attention over prefix-cache hits must equal a cold run bit for bit."""

import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from minillm.kernels.paged_attention import paged_attention

from minillm.cache.block_manager import BlockManager, NoFreeBlocksError
from minillm.cache.paged import (
    PagedKVCache,
    block_tables_tensor,
    paged_attention_ref,
    reshape_and_cache_ref,
)


def test_slots_follow_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", range(10)) == 0
    table = bm.block_table("a")
    assert len(table) == 3 and bm.num_free_blocks == 5
    assert bm.slot_mapping("a") == [table[t // 4] * 4 + t % 4 for t in range(10)]
    assert bm.slot_mapping("a", 8, 10) == bm.slot_mapping("a")[8:]


def test_prefix_hits_share_blocks_and_skip_their_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    cached = bm.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 0, 0])  # same first two blocks
    assert cached == 8
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert bm.blocks[bm.block_table("a")[0]].ref_count == 2
    assert bm.allocate("c", [1, 2, 3, 9, 5]) == 0  # differs inside the first block
    assert (bm.prefix_hits, bm.prefix_queries) == (2, 2 + 2 + 1)


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate("a", range(8))
    # Both blocks are cached, but the last token's logits are needed: only block 0 is a hit.
    assert bm.allocate("b", range(8)) == 4
    assert bm.block_table("b")[1] != bm.block_table("a")[1]


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=5, block_size=2)
    bm.allocate("a", [1, 1, 2, 2, 3])  # blocks for [1 1] [2 2] [3]
    first = bm.block_table("a")
    bm.free("a")
    assert bm.num_free_blocks == 5 and list(bm.cached_free) == [first[1], first[0]]
    assert bm.allocate("b", [1, 1, 2, 2, 7]) == 4  # hit after free
    assert bm.block_table("b")[:2] == first[:2]
    bm.free("b")  # the tail first: [2 2] is older in the LRU than [1 1]
    # Four blocks without hits take the 3 uncached free blocks, then evict [2 2] only.
    bm.allocate("c", [5, 5, 6, 6, 8, 8, 9])
    assert first[1] in bm.block_table("c") and first[0] not in bm.block_table("c")
    bm.free("c")
    assert bm.allocate("d", [1, 1, 2, 2, 9]) == 2  # [1 1] survived, [2 2] did not


def test_fork_shares_blocks_and_the_first_write_copies_the_last_one():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", range(6))  # 1.5 blocks
    bm.fork("a", "b")
    shared_last = bm.block_table("a")[-1]
    assert bm.blocks[shared_last].ref_count == 2
    slot, cow = bm.append_slot("b", 100)
    assert cow is not None and cow[0] == shared_last and bm.block_table("b")[-1] == cow[1]
    assert slot == cow[1] * 4 + 6 % 4
    assert bm.blocks[shared_last].ref_count == 1 and bm.block_table("a")[-1] == shared_last
    slot_a, cow_a = bm.append_slot("a", 200)  # now a owns its last block alone
    assert cow_a is None and slot_a == shared_last * 4 + 2
    assert bm.blocks[bm.block_table("a")[0]].ref_count == 2  # full blocks stay shared


def test_appending_a_full_block_caches_it():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", [1])
    bm.append_slot("a", 2)  # block [1 2] is now full
    bm.append_slot("a", 3)
    assert bm.allocate("b", [1, 2, 3]) == 2


def test_capacity_checks_and_errors():
    bm = BlockManager(num_blocks=2, block_size=2)
    assert not bm.can_allocate(range(5))
    with pytest.raises(NoFreeBlocksError, match="check can_allocate"):
        bm.allocate("a", range(5))
    bm.allocate("a", range(4))
    assert not bm.can_append("a")
    with pytest.raises(NoFreeBlocksError, match="can_append"):
        bm.append_slot("a", 0)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate("a", [1])
    with pytest.raises(ValueError, match="unknown sequence"):
        bm.free("zz")
    with pytest.raises(ValueError, match="empty prompt"):
        BlockManager(4, 2).allocate("x", [])
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        BlockManager(4, 0)


def test_no_prefix_caching_when_disabled():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", range(5))
    assert bm.allocate("b", range(5)) == 0
    bm.free("a")
    assert not bm.cached_free and not bm.hash_to_block


def kv_value(tokens):
    """A stand-in for the K/V of the last token: depends on the whole prefix."""
    return hash(tuple(tokens))


PREFIXES = [(), (1, 2, 1, 2, 1), (1, 2, 1, 2, 3, 3, 3), (0,) * 9]


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=3)
        self.pool = {}  # slot -> kv value written there
        self.tokens = {}  # seq id -> its tokens (our own record)
        self.next_id = 0

    def write(self, seq, start):
        for t, slot in enumerate(self.bm.slot_mapping(seq, start), start):
            self.pool[slot] = kv_value(self.tokens[seq][: t + 1])

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), max_size=7))
    def allocate(self, prefix, tail):
        prompt = list(prefix) + tail or [0]
        seq, self.next_id = self.next_id, self.next_id + 1
        if not self.bm.can_allocate(prompt):
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(seq, prompt)
            return
        cached = self.bm.allocate(seq, prompt)
        assert cached % 3 == 0 and cached < len(prompt)
        self.tokens[seq] = prompt
        self.write(seq, cached)  # the prefill computes only the uncached tokens

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, 3))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        if not self.bm.can_append(seq):
            with pytest.raises(NoFreeBlocksError):
                self.bm.append_slot(seq, token)
            return
        slot, cow = self.bm.append_slot(seq, token)
        if cow is not None:  # copy the whole block, then write
            src, dst = cow
            for i in range(3):
                if src * 3 + i in self.pool:
                    self.pool[dst * 3 + i] = self.pool[src * 3 + i]
        self.tokens[seq].append(token)
        assert slot == self.bm.slot_mapping(seq)[-1]
        self.write(seq, len(self.tokens[seq]) - 1)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        del self.tokens[seq]
        with pytest.raises(ValueError):  # a second free is refused, not a double free
            self.bm.free(seq)

    @invariant()
    def reference_counts_are_exact_and_nothing_leaks(self):
        bm = self.bm
        counts = [0] * bm.num_blocks
        for seq in self.tokens:
            table = bm.block_table(seq)
            assert len(table) == -(-len(self.tokens[seq]) // 3)
            for b in table:
                counts[b] += 1
        assert [b.ref_count for b in bm.blocks] == counts
        free = list(bm.free_block_ids) + list(bm.cached_free)
        assert len(free) == len(set(free)), "a block is free twice"
        assert set(free) == {i for i, c in enumerate(counts) if c == 0}
        assert bm.num_free_blocks + sum(c > 0 for c in counts) == bm.num_blocks
        for h, b in bm.hash_to_block.items():
            assert bm.blocks[b].hash == h and len(bm.blocks[b].token_ids) == 3
        assert all(bm.blocks[b].hash is not None for b in bm.cached_free)

    @invariant()
    def every_sequence_reads_its_own_kv(self):
        for seq, tokens in self.tokens.items():
            got = [self.pool.get(s) for s in self.bm.slot_mapping(seq)]
            assert got == [kv_value(tokens[: t + 1]) for t in range(len(tokens))]

    def teardown(self):
        for seq in list(self.tokens):
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI)
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_random_operations = BlockManagerMachine.TestCase


# ---- prefix-cache hits against cold runs, bit for bit ------------------------------------
def kv_of(prefix, Hkv=2, D=16):
    """The K/V of a prefix's last token: deterministic in the whole prefix, as in a model."""
    g = torch.Generator().manual_seed(hash(tuple(prefix)) % 2**62)
    return torch.randn(2, Hkv, D, generator=g)


def run_prompt(bm, pool, seq, prompt):
    """Allocate, write the K/V of the uncached tokens, return the block table."""
    cached = bm.allocate(seq, prompt)
    kv = torch.stack([kv_of(prompt[: t + 1]) for t in range(cached, len(prompt))])  # (N, 2, ..)
    slots = torch.tensor(bm.slot_mapping(seq, cached), dtype=torch.int32)
    reshape_and_cache_ref(kv[:, 0], kv[:, 1], pool.k_cache[0], pool.v_cache[0], slots)
    return bm.block_table(seq), cached


ATTN_PREFIXES = [(), (1, 2, 3, 4, 5, 6, 7), (1, 2, 3, 4, 9, 9), (5,) * 11]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(ATTN_PREFIXES), st.lists(st.integers(0, 9), max_size=6), st.booleans()
        ),
        min_size=1,
        max_size=6,
    )
)
def test_prefix_cache_hits_give_bit_identical_attention(requests):
    """Each request attends over a warm pool (earlier requests, live or freed, left blocks to
    hit) and over a cold pool of its own; the outputs are equal bit for bit."""
    warm_bm, warm = BlockManager(40, 4), PagedKVCache(1, 40, 4, 2, 16)
    q = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    for i, (prefix, tail, keep) in enumerate(requests):
        prompt = list(prefix) + tail or [0]
        table, _ = run_prompt(warm_bm, warm, i, prompt)
        cold_bm, cold = BlockManager(40, 4), PagedKVCache(1, 40, 4, 2, 16)
        cold_table, cached = run_prompt(cold_bm, cold, 0, prompt)
        assert cached == 0
        lens = torch.tensor([len(prompt)])
        out_warm = paged_attention_ref(q, *warm.layer(0), block_tables_tensor([table]), lens)
        out_cold = paged_attention_ref(q, *cold.layer(0), block_tables_tensor([cold_table]), lens)
        assert torch.equal(out_warm, out_cold)
        if not keep:
            warm_bm.free(i)


def test_prefix_cache_hits_are_bit_identical_through_the_kernel():
    bm, pool = BlockManager(16, 4), PagedKVCache(1, 16, 4, 2, 16)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    run_prompt(bm, pool, "a", prompt)
    table, cached = run_prompt(bm, pool, "b", prompt)
    assert cached == 8
    cold_bm, cold = BlockManager(16, 4), PagedKVCache(1, 16, 4, 2, 16)
    cold_table, _ = run_prompt(cold_bm, cold, "b", prompt)
    q = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([10], dtype=torch.int32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    outs = [
        paged_attention(
            q.to(dev), k.to(dev), v.to(dev), block_tables_tensor([t], dev), lens.to(dev)
        )
        for (k, v), t in ((pool.layer(0), table), (cold.layer(0), cold_table))
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("caching", [True, False])
def test_append_slots_equals_one_token_at_a_time(caching):
    """A prompt chunk appended at once leaves the manager as token-by-token appends do:
    the same slots, block tables, free blocks and prefix-cache entries."""
    rng = random.Random(0)
    managers = [BlockManager(40, 4, enable_prefix_caching=caching) for _ in range(2)]
    tokens = [rng.randrange(50) for _ in range(60)]
    for bm in managers:
        bm.allocate("a", tokens[:3])
        bm.allocate("b", tokens[:9])  # its full blocks are cached: a's equal blocks meet them
    one, many = managers
    cuts = [3, 4, 9, 10, 25, 26, 27, 60]
    for lo, hi in itertools.pairwise(cuts):
        expect = [one.append_slot("a", t)[0] for t in tokens[lo:hi]]
        assert many.append_slots("a", tokens[lo:hi]) == expect
        assert many.block_table("a") == one.block_table("a")
        assert many.num_free_blocks == one.num_free_blocks
        assert many.hash_to_block == one.hash_to_block
        assert many.seqs["a"].last_hash == one.seqs["a"].last_hash
    assert many.append_slots("a", []) == []
    many.append_slots("a", [7])  # a partly filled last block...
    many.fork("a", "c")  # ... now shared
    with pytest.raises(ValueError, match="shared"):
        many.append_slots("a", [1])
    with pytest.raises(NoFreeBlocksError):
        many.append_slots("b", [0] * 4 * 40)
