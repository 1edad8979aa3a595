"""The paged decode-attention kernel (staged.kernels.paged_decode) against a float64 reference
on fresh random caches: GQA groups 1-8 (padded to the dot's 16), head sizes that are and are not
powers of two, cache blocks smaller and larger than the kernel's key step, rows of 1 token to
several blocks, scattered block tables wider than any row, a non-contiguous query (as the decoder
layers hand it over); rows cut into splits (split-KV) at a small split, so that a few hundred
tokens span several. And what the engine relies on: a row's output is the same bits alone, in
any batch, in any order, with any table width (so any number of splits in the grid), and a row
of at most one split the same bits whatever the split. Interpreted on a CPU (tiny shapes),
compiled on CUDA."""
import pytest
import torch

from staged.kernels.paged_decode import BLOCK_N, paged_decode_attention


def reference(q, keys, values, table, lens, scale):
    """Per row: softmax(q k^T * scale) v over its own tokens, in float64."""
    S, H, D = q.shape
    kv = keys.shape[2]
    out = torch.empty(S, H, D, dtype=torch.float64)
    for r in range(S):
        n = int(lens[r])
        blocks = table[r].long().cpu()
        k = keys.cpu()[blocks].flatten(0, 1)[:n].double().repeat_interleave(H // kv, 1)   # [n, H, D]
        v = values.cpu()[blocks].flatten(0, 1)[:n].double().repeat_interleave(H // kv, 1)
        s = torch.einsum("hd,nhd->hn", q[r].cpu().double(), k) * scale
        out[r] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


def make(gen, lens, heads, kv_heads, D, block, dtype, device, spare_cols=2):
    """A pool with scattered blocks, one table row per length (padded with other rows' blocks)."""
    need = [-(-n // block) for n in lens]
    nb = sum(need) + 3
    keys = torch.randn(nb, block, kv_heads, D, generator=gen).to(device, dtype)
    values = torch.randn(nb, block, kv_heads, D, generator=gen).to(device, dtype)
    order = torch.randperm(nb, generator=gen).tolist()
    width = max(need) + spare_cols
    rows, at = [], 0
    for k in need:
        own = order[at:at + k]
        at += k
        rows.append(own + order[-spare_cols:] + order[:width - k - spare_cols])
    table = torch.tensor([r[:width] for r in rows], dtype=torch.int32, device=device)
    # the layers hand over q as a transposed view: [S, 1, H, D] storage read as [S, H, D]
    q = torch.randn(len(lens), 1, heads, D, generator=gen).to(device, dtype).transpose(1, 2)[:, :, 0]
    return q, keys, values, table, torch.tensor(lens, dtype=torch.int32, device=device)


CASES = [  # lens, heads, kv_heads, head_dim, cache block
    ([1, 5, 17], 4, 2, 64, 16),
    ([BLOCK_N, BLOCK_N + 1, 2 * BLOCK_N - 1], 7, 1, 128, 16),      # Qwen2.5-VL-7B's group of 7
    ([3, 40, 71], 8, 1, 80, 8),                                      # head_dim 80: padded to 128
    ([1, 300], 2, 2, 16, 256),                                       # no GQA, one large block
    ([9, 33, 64, 100, 2], 6, 2, 32, 4),                              # tiny blocks: 8+ per key step
    ([257], 16, 2, 64, 256),                                         # group of 8, past one block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,heads,kv_heads,D,block", CASES)
def test_matches_a_float64_reference(device, lens, heads, kv_heads, D, block, dtype):
    gen = torch.Generator().manual_seed(len(lens) * 131 + D + block)
    q, keys, values, table, seqlens = make(gen, lens, heads, kv_heads, D, block, dtype, device)
    scale = D ** -0.5
    got = paged_decode_attention(q, keys, values, table, seqlens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    want = reference(q, keys, values, table, seqlens, scale)
    # bf16: the output's own rounding (2^-9 relative) and P cast to bf16 for the P.V dot
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().double(), want, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_output_does_not_depend_on_the_batch(device, dtype):
    gen = torch.Generator().manual_seed(5)
    lens = [1, 15, 16, 33, 90, 7]
    q, keys, values, table, seqlens = make(gen, lens, 8, 2, 64, 16, dtype, device, spare_cols=3)
    full = paged_decode_attention(q, keys, values, table, seqlens, 0.125)
    for r in range(len(lens)):  # alone, with the table trimmed to the row's own blocks
        own = -(-lens[r] // 16)
        alone = paged_decode_attention(q[r:r + 1], keys, values, table[r:r + 1, :own].contiguous(),
                                       seqlens[r:r + 1], 0.125)
        assert torch.equal(alone[0], full[r]), r
    perm = torch.randperm(len(lens), generator=gen).to(device)
    shuffled = paged_decode_attention(q[perm], keys, values, table[perm], seqlens[perm], 0.125)
    assert torch.equal(shuffled, full[perm])


# Two key steps per split: rows of a few hundred tokens take several splits under the interpreter.
SMALL = 2 * BLOCK_N
SPLIT_LENS = [5, SMALL - 1, SMALL, SMALL + 1, 2 * SMALL, 3 * SMALL + 17]   # one launch, mixed
SPLIT_CASES = [  # heads, kv_heads, head_dim, cache block, dtype
    (2, 2, 64, 16, torch.bfloat16),      # no GQA
    (8, 2, 80, 8, torch.float32),        # group of 4, head_dim 80 (padded to 128)
    (7, 1, 64, 32, torch.float32),       # Qwen2.5-VL-7B's group of 7
    (7, 1, 80, 16, torch.bfloat16),
]


@pytest.mark.parametrize("heads,kv_heads,D,block,dtype", SPLIT_CASES)
def test_split_rows_match_a_float64_reference(device, heads, kv_heads, D, block, dtype):
    gen = torch.Generator().manual_seed(heads * 31 + D + block)
    q, keys, values, table, seqlens = make(gen, SPLIT_LENS, heads, kv_heads, D, block, dtype, device)
    scale = D ** -0.5
    got = paged_decode_attention(q, keys, values, table, seqlens, scale, split=SMALL)
    want = reference(q, keys, values, table, seqlens, scale)
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().double(), want, atol=atol, rtol=atol)


def test_split_rows_survive_one_split_holding_all_the_weight(device):
    """One token whose score is ~160 above the rest (exp overflows fp32 past 88), in the first,
    a middle or the last split: the combine weighs each split by exp(its max - the row's max), so
    that max must be over every split."""
    gen = torch.Generator().manual_seed(17)
    n = 3 * SMALL + 17
    q, keys, values, table, seqlens = make(gen, [n], 2, 2, 64, 16, torch.float32, device)
    for t in (5, SMALL + 70, n - 1):
        k = keys.clone()
        k[table[0, t // 16], t % 16] = 20 * q[0]            # score 20 |q|^2 / 8 ~ 160 per head
        got = paged_decode_attention(q, k, values, table, seqlens, 0.125, split=SMALL)
        torch.testing.assert_close(got.cpu().double(), reference(q, k, values, table, seqlens, 0.125),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_do_not_depend_on_the_batch_or_the_grid(device, dtype):
    gen = torch.Generator().manual_seed(11)
    lens = [3 * SMALL + 17, SMALL + 1, 40, 2 * SMALL, SMALL, 1]
    q, keys, values, table, seqlens = make(gen, lens, 8, 2, 64, 16, dtype, device, spare_cols=2)

    def attend(*args, split=SMALL):
        return paged_decode_attention(*args, 0.125, split=split)

    full = attend(q, keys, values, table, seqlens)
    # 16 more columns: 2 more splits on the grid's third side, never a row's own
    wide = torch.cat([table, table.flip(0)[:, :16]], 1)
    assert torch.equal(attend(q, keys, values, wide, seqlens), full)
    for r in range(len(lens)):  # alone, the table trimmed to the row's own blocks: its own splits only
        own = -(-lens[r] // 16)
        alone = attend(q[r:r + 1], keys, values, table[r:r + 1, :own].contiguous(), seqlens[r:r + 1])
        assert torch.equal(alone[0], full[r]), r
    perm = torch.randperm(len(lens), generator=gen).to(device)
    assert torch.equal(attend(q[perm], keys, values, table[perm], seqlens[perm]), full[perm])
    # a row of at most one split: the single pass, whatever the split
    one_pass = attend(q, keys, values, table, seqlens, split=None)
    for r, n in enumerate(lens):
        if n <= SMALL:
            assert torch.equal(one_pass[r], full[r]), r


def test_the_benchmarks_shapes_agree_with_its_torch_path(device):
    """benchmarks/bench_paged_decode.py's host side at a tiny size (it times on CUDA only): its
    case builder (7B layout, scattered 16-token blocks) and the torch gather + SDPA it times
    against agree with the kernel, split and in one pass."""
    from benchmarks.bench_paged_decode import D, make_case, torch_decode

    q, keys, values, table, seqlens, tokens = make_case(device, 3, SMALL, torch.Generator().manual_seed(3))
    assert tokens == int(seqlens.sum()) and int(seqlens.max()) > SMALL
    want = torch_decode(q, keys, values, table, seqlens, D ** -0.5).float()
    for split in (SMALL, None):
        got = paged_decode_attention(q, keys, values, table, seqlens, D ** -0.5, split=split)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_split_must_be_whole_key_steps(device):
    q = torch.randn(1, 2, 64, device=device)
    keys = torch.randn(2, 16, 2, 64, device=device)
    args = (q, keys, keys, torch.zeros(1, 1, dtype=torch.int32, device=device),
            torch.ones(1, dtype=torch.int32, device=device), 0.125)
    for bad in (0, BLOCK_N // 2, BLOCK_N + 1):
        with pytest.raises(ValueError, match="split"):
            paged_decode_attention(*args, split=bad)


def test_bad_shapes_are_an_error(device):
    q = torch.randn(2, 6, 64, device=device)
    keys = torch.randn(4, 16, 4, 64, device=device)
    with pytest.raises(ValueError, match="query"):  # 6 heads over 4 kv heads
        paged_decode_attention(q, keys, keys, torch.zeros(2, 1, dtype=torch.int32, device=device),
                               torch.ones(2, dtype=torch.int32, device=device), 0.125)


def test_tf32_setting_is_read_through_either_torch_api():
    """fp32 kernels follow torch's matmul precision; once a caller used the newer fp32_precision
    API, reading the legacy allow_tf32 raises (torch 2.9+), so both kernels read it through
    ``tf32_enabled``. In a child process: the settings are process-global."""
    import subprocess
    import sys

    code = """
import torch
from staged.kernels.device import tf32_enabled
m = torch.backends.cuda.matmul
if not isinstance(getattr(m, "fp32_precision", None), str):
    m.allow_tf32 = True; assert tf32_enabled(); m.allow_tf32 = False; assert not tf32_enabled()
    print("legacy only"); raise SystemExit
assert not tf32_enabled()
m.fp32_precision = "tf32"; assert tf32_enabled()
m.fp32_precision = "ieee"; assert not tf32_enabled()
m.fp32_precision = "none"; torch.backends.fp32_precision = "tf32"; assert tf32_enabled()
torch.backends.fp32_precision = "ieee"; assert not tf32_enabled()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() in ("ok", "legacy only"), out.stderr[-2000:]
