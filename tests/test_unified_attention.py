"""The unified attention kernel (prompt chunks and decodes of one step, paged K/V read in
place) against fp64 dense attention over the same pages, in the CPU interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from minillm.kernels.unified_attention import program_table, unified_attention

QUERY_LENS = [1, 5, 1, 19, 3, 16]  # decodes, chunks shorter, longer than and equal to BLOCK_M
CONTEXT_LENS = [7, 5, 30, 25, 3, 40]  # 5 and 3: a whole prompt; the others have a prefix


def make_step(dtype, H=4, Hkv=2, D=16, page=4, num_blocks=48, seed=0,
              query_lens=QUERY_LENS, context_lens=CONTEXT_LENS):  # fmt: skip
    QUERY_LENS, CONTEXT_LENS = query_lens, context_lens
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-s // page) for s in CONTEXT_LENS)
    tables, used = [], 0
    for s in CONTEXT_LENS:
        n = -(-s // page)
        tables.append(perm[used : used + n] + [0] * (width - n))
        used += n
    q = torch.randn(sum(QUERY_LENS), H, D, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(QUERY_LENS).cumsum(0).tolist()], dtype=torch.int32)
    return (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), cu,
            torch.tensor(CONTEXT_LENS, dtype=torch.int32))  # fmt: skip


def reference(q, k_cache, v_cache, tables, window=None, query_lens=QUERY_LENS,
              context_lens=CONTEXT_LENS):  # fmt: skip
    """fp64: each sequence's keys gathered through its table, causal softmax attention."""
    QUERY_LENS, CONTEXT_LENS = query_lens, context_lens
    page, H, Hkv = k_cache.shape[1], q.shape[1], k_cache.shape[2]
    out, row = [], 0
    for b, (T, S) in enumerate(zip(QUERY_LENS, CONTEXT_LENS, strict=True)):
        pos = torch.arange(S)
        slots = tables[b, pos // page].long() * page + pos % page
        k = k_cache.reshape(-1, Hkv, k_cache.shape[-1])[slots].double()  # (S, Hkv, D)
        v = v_cache.reshape(-1, Hkv, v_cache.shape[-1])[slots].double()
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        qb = q[row : row + T].double()  # (T, H, D)
        s = torch.einsum("thd,shd->hts", qb, k) * q.shape[-1] ** -0.5
        q_pos = torch.arange(S - T, S)[:, None]
        visible = pos[None, :] <= q_pos
        if window is not None:
            visible &= pos[None, :] > q_pos - window
        s = s.masked_fill(~visible, float("-inf"))
        out.append(torch.einsum("hts,shd->thd", s.softmax(-1), v))
        row += T
    return torch.cat(out)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("H", "Hkv", "block_q"), [(4, 2, None), (6, 2, None), (4, 4, 16),
                                                   (8, 2, 4)])  # fmt: skip
def test_unified_attention_equals_dense_attention(dtype, tol, window, H, Hkv, block_q):
    """Groups of 2, 3 (padded to 4 rows per query) and 1 query heads per kv head; the
    default 128 rows per program, and smaller blocks (several programs per chunk)."""
    q, k_cache, v_cache, tables, cu, lens = make_step(dtype, H=H, Hkv=Hkv)
    out = unified_attention(q, k_cache, v_cache, tables, cu, lens, QUERY_LENS, window=window,
                            block_q=block_q)  # fmt: skip
    ref = reference(q, k_cache, v_cache, tables, window)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - ref).abs().max() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unified_attention_equals_dense_attention_on_gpu():
    """Real sizes in bf16: head_dim 128, GQA 32/8, 16-slot pages, chunks of hundreds of
    queries beside decodes, contexts not multiples of the page or the tile."""
    query_lens = [1, 300, 1, 77, 1, 512]
    context_lens = [1000, 300, 4097, 1500, 33, 2600]
    step = make_step(torch.bfloat16, H=32, Hkv=8, D=128, page=16, num_blocks=800, seed=3,
                     query_lens=query_lens, context_lens=context_lens)  # fmt: skip
    q, k_cache, v_cache, tables, cu, lens = (t.cuda() for t in step)
    out = unified_attention(q, k_cache, v_cache, tables, cu, lens, query_lens)
    ref = reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(),
                    query_lens=query_lens, context_lens=context_lens)  # fmt: skip
    assert (out.cpu().double() - ref).abs().max() <= 2e-2


def test_unified_attention_writes_into_out_and_takes_a_program_table():
    q, k_cache, v_cache, tables, cu, lens = make_step(torch.float32)
    out = torch.full_like(q, float("nan"))
    programs = program_table(QUERY_LENS, 16, "cpu")
    assert programs[0].tolist() == [0, 1, 2, 3, 3, 4, 5]  # 19 queries: two blocks of 16
    got = unified_attention(q, k_cache, v_cache, tables, cu, lens, QUERY_LENS, out=out,
                            programs=programs, block_q=16)  # fmt: skip
    assert got is out and not out.isnan().any()
    assert (out.double() - reference(q, k_cache, v_cache, tables)).abs().max() <= 1e-5


def test_unified_attention_rejects_bad_input():
    q, k_cache, v_cache, tables, cu, lens = make_step(torch.float32)
    with pytest.raises(ValueError, match="add up to"):
        unified_attention(q[:-1], k_cache, v_cache, tables, cu, lens, QUERY_LENS)
    with pytest.raises(ValueError, match="disagree"):
        unified_attention(q, k_cache, v_cache, tables[:-1], cu, lens, QUERY_LENS)
    with pytest.raises(ValueError, match="cannot be grouped"):
        unified_attention(q[:, :3], k_cache, v_cache, tables, cu, lens, QUERY_LENS)
    with pytest.raises(ValueError, match="window"):
        unified_attention(q, k_cache, v_cache, tables, cu, lens, QUERY_LENS, window=0)
    with pytest.raises(TypeError, match="share one of"):
        unified_attention(q.half(), k_cache, v_cache, tables, cu, lens, QUERY_LENS)
