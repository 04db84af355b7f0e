"""Paged KV memory bookkeeping: block tables, reference counts, prefix caching, copy-on-write.

PagedAttention (Kwon et al., SOSP 2023, the vLLM paper) stores the keys and values of
every sequence in fixed-size blocks of `block_size` token slots, anywhere in one pool. A
sequence's block table maps its logical block i to a physical block, so token t lives in

    slot = block_table[t // block_size] * block_size + t % block_size

and memory grows one block at a time: a sequence wastes at most block_size - 1 slots.

Prefix caching (vLLM's automatic prefix caching; nano-vllm) names a full block by a hash
chain, h_i = hash(h_{i-1}, tokens of block i), so sequences whose first i blocks hold the
same tokens share those physical blocks. Blocks are reference counted; a block whose count
drops to zero keeps its contents and its hash and can still be hit, until a new allocation
evicts it (least recently freed first). Sequences forked for n > 1 samples share every
block; the first write into a shared, partly filled last block copies it (copy-on-write).

Invariant: a block's ref_count equals the number of block tables that hold it, and a block
is free exactly when its ref_count is 0. Full blocks are entered into the prefix cache when
they are allocated (or filled by `append_slot`): the caller writes their K/V in the same
forward pass, before attention reads them (the model writes each layer's cache first).
So give `allocate` and `append_slot` only tokens that the next forward computes: with
chunked prefill, `allocate` the first chunk (`num_prefix_hit_tokens` says where it may
start) and `append_slot` each later chunk's tokens in the step that computes them, so that
no block is found in the prefix cache before its K/V exist (`minillm.engine.scheduler`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


class NoFreeBlocksError(RuntimeError):
    """The pool has too few free blocks; ask `can_allocate` / `can_append` first."""


@dataclass
class Block:
    """One physical block of the pool."""

    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is in the prefix cache
    token_ids: tuple[int, ...] = ()  # a cached block's tokens (guards against hash collisions)


@dataclass
class _Sequence:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    last_hash: int | None = None  # chain hash of the last full block (prefix caching)


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """The prefix-cache key of a full block: its tokens chained to the previous block's key."""
    return hash((parent, tuple(token_ids)))


class BlockManager:
    """Allocates blocks of a pool of `num_blocks` blocks to sequences, keyed by `seq_id`.

    The scheduler's loop: `can_allocate` -> `allocate` (prefill), then per decode step
    `can_append` -> `append_slot`, `fork` for extra samples, `free` when a sequence ends.
    `allocate` and `append_slot` tell the caller where to write K/V (`slot_mapping`) and
    which blocks to copy first (copy-on-write pairs)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # free, holding nothing
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # free, cached; LRU first
        self.hash_to_block: dict[int, int] = {}
        self.seqs: dict[Hashable, _Sequence] = {}
        self.prefix_queries = self.prefix_hits = 0  # in blocks, over all allocations

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.cached_free)

    def _seq(self, seq_id: Hashable) -> _Sequence:
        if seq_id not in self.seqs:
            raise ValueError(f"unknown sequence {seq_id!r}")
        return self.seqs[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).block_table)

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self._seq(seq_id).token_ids)

    def slot_mapping(self, seq_id: Hashable, start: int = 0, end: int | None = None) -> list[int]:
        """The pool slots of tokens start..end-1 of a sequence (where their K/V go)."""
        seq, bs = self._seq(seq_id), self.block_size
        end = len(seq.token_ids) if end is None else end
        if not 0 <= start <= end <= len(seq.token_ids):
            raise ValueError(f"token range [{start}, {end}) outside [0, {len(seq.token_ids)}]")
        return [seq.block_table[t // bs] * bs + t % bs for t in range(start, end)]

    def _prefix_hit_blocks(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks equal to the prompt's leading full blocks. The last prompt token is
        never a hit: its logits are needed, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return []
        hits, parent, bs = [], None, self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = block_hash(parent, tokens)
            bid = self.hash_to_block.get(parent)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        return hits

    def num_prefix_hit_tokens(self, token_ids: Sequence[int]) -> int:
        """Leading tokens of a prompt whose K/V the prefix cache holds (what `allocate`
        would return), without allocating anything."""
        return len(self._prefix_hit_blocks([int(t) for t in token_ids])) * self.block_size

    def _blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether a prompt fits now (hit blocks that are in use cost nothing)."""
        hits = self._prefix_hit_blocks(token_ids)
        hits_in_use = sum(self.blocks[b].ref_count > 0 for b in hits)
        return self._blocks_needed(len(token_ids)) - hits_in_use <= self.num_free_blocks

    def can_append(self, seq_id: Hashable) -> bool:
        """Whether the next token fits: a new block, or a copy of a shared last block."""
        seq = self._seq(seq_id)
        full = len(seq.token_ids) % self.block_size == 0
        shared = not full and self.blocks[seq.block_table[-1]].ref_count > 1
        return self.num_free_blocks >= int(full or shared)

    # ---- changes -------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self.free_block_ids:
            bid = self.free_block_ids.popleft()
        elif self.cached_free:  # evict the least recently freed cached block
            bid, _ = self.cached_free.popitem(last=False)
            block = self.blocks[bid]
            del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        else:
            raise NoFreeBlocksError(f"all {self.num_blocks} blocks are in use")
        self.blocks[bid].ref_count = 1
        return bid

    def _register(self, bid: int, parent: int | None, tokens: tuple[int, ...]) -> int:
        """Enter a full block into the prefix cache; returns its chain hash."""
        h = block_hash(parent, tokens)
        if self.enable_prefix_caching and h not in self.hash_to_block:
            self.hash_to_block[h] = bid
            self.blocks[bid].hash, self.blocks[bid].token_ids = h, tokens
        return h

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Give a new sequence blocks for its prompt; returns how many leading prompt tokens
        already have their K/V in the pool (prefix-cache hits, a multiple of block_size)."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise ValueError("cannot allocate an empty prompt")
        if not self.can_allocate(token_ids):
            raise NoFreeBlocksError(
                f"{self._blocks_needed(len(token_ids))} blocks needed, "
                f"{self.num_free_blocks} free: check can_allocate first"
            )
        hits = self._prefix_hit_blocks(token_ids)
        self.prefix_queries += (len(token_ids) - 1) // self.block_size
        self.prefix_hits += len(hits)
        for bid in hits:  # claim the hits first, so that new blocks cannot evict them
            if self.blocks[bid].ref_count == 0:
                del self.cached_free[bid]
            self.blocks[bid].ref_count += 1
        table = hits + [
            self._take_free_block() for _ in range(self._blocks_needed(len(token_ids)) - len(hits))
        ]
        parent, bs = (self.blocks[hits[-1]].hash if hits else None), self.block_size
        for i in range(len(hits), len(token_ids) // bs):  # the new full blocks
            parent = self._register(table[i], parent, tuple(token_ids[i * bs : (i + 1) * bs]))
        self.seqs[seq_id] = _Sequence(token_ids, table, parent)
        return len(hits) * bs

    def append_slot(self, seq_id: Hashable, token_id: int) -> tuple[int, tuple[int, int] | None]:
        """Grow a sequence by one token; returns (slot for its K/V, copy-on-write pair).

        The pair (src, dst) says: copy block src into block dst before writing the slot;
        it is None unless the last block was shared (after `fork`)."""
        seq, bs = self._seq(seq_id), self.block_size
        if not self.can_append(seq_id):
            raise NoFreeBlocksError("no free block for the next token: check can_append first")
        n, cow = len(seq.token_ids), None
        if n % bs == 0:
            seq.block_table.append(self._take_free_block())
        elif self.blocks[last := seq.block_table[-1]].ref_count > 1:
            new = self._take_free_block()
            self.blocks[last].ref_count -= 1
            seq.block_table[-1], cow = new, (last, new)
        seq.token_ids.append(int(token_id))
        if self.enable_prefix_caching and (n + 1) % bs == 0:  # the last block filled up
            i = n // bs  # chained to the block before it: O(1) per filled block
            seq.last_hash = self._register(
                seq.block_table[i], seq.last_hash, tuple(seq.token_ids[i * bs :])
            )
        return seq.block_table[-1] * bs + n % bs, cow

    def append_slots(self, seq_id: Hashable, token_ids: Sequence[int]) -> list[int]:
        """Grow a sequence by several tokens at once (a prompt chunk); their slots. The
        sequence's last block must not be shared (no copy-on-write: use `append_slot`)."""
        seq, bs = self._seq(seq_id), self.block_size
        n, m = len(seq.token_ids), len(token_ids)
        if n % bs and self.blocks[seq.block_table[-1]].ref_count > 1:
            raise ValueError("the last block is shared: grow it with append_slot (copy-on-write)")
        new = self._blocks_needed(n + m) - len(seq.block_table)
        if new > self.num_free_blocks:
            raise NoFreeBlocksError(f"{new} blocks needed, {self.num_free_blocks} free")
        seq.block_table.extend(self._take_free_block() for _ in range(new))
        seq.token_ids.extend(int(t) for t in token_ids)
        if self.enable_prefix_caching:
            for i in range(n // bs, (n + m) // bs):  # the blocks that filled up, in order
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                seq.last_hash = self._register(seq.block_table[i], seq.last_hash, tokens)
        table = seq.block_table
        return [table[t // bs] * bs + t % bs for t in range(n, n + m)]

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """A new sequence sharing every block (and token) of `parent_id` (n > 1 samples)."""
        parent = self._seq(parent_id)
        if child_id in self.seqs:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        for bid in parent.block_table:
            self.blocks[bid].ref_count += 1
        self.seqs[child_id] = _Sequence(
            list(parent.token_ids), list(parent.block_table), parent.last_hash
        )

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks; cached ones stay findable until evicted."""
        seq = self._seq(seq_id)
        for bid in reversed(seq.block_table):  # the tail is evicted before the prefix
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.cached_free[bid] = None
                else:
                    self.free_block_ids.append(bid)
        del self.seqs[seq_id]
