"""fused_linear_logprob against a float64 reference: Triton kernels under TRITON_INTERPRET (small,
odd shapes), the chunked PyTorch path (larger shapes), gradients, errors, and memory.

Accuracy criterion (flash-attention's): the error of our output against float64 must be at most
2x the error of PyTorch computing the same thing in the same precision (fp32: the naive path in
fp32; bf16/fp16: an eager lm_head in the input dtype, softmax in fp32), plus a small floor for
the cases where PyTorch happens to be near-exact. NaN or inf never passes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import staged.kernels.linear_logprob as LL
import staged.kernels.linear_logprob_chunked as LC
from staged.kernels import fused_linear_logprob
from staged.kernels.reference.linear_logprob import (linear_logprob_eager,
                                                     linear_logprob_reference)

ROOT = Path(__file__).resolve().parents[2]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


def make_inputs(N, V, H, dtype, *, bias=False, scale=1.0, seed=0, device="cpu"):
    """Fresh random inputs; logits ~ N(0, scale^2). Targets hit both vocab edges."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (scale / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * scale if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[0] = V - 1
    if N > 1:
        t[-1] = 0
    gl = torch.randn(N, generator=g, dtype=torch.float64)
    ge = torch.randn(N, generator=g, dtype=torch.float64)
    cast = lambda x: x.to(dtype).to(device) if x is not None else None  # noqa: E731
    return cast(h), cast(w), cast(b), t.to(device), gl.to(device), ge.to(device)


def run_with_grads(fn, h, w, b, t, gl, ge, *, use_logp=True, use_ent=True):
    """logp, entropy and the grads of sum(gl*logp + ge*entropy) w.r.t. hidden, weight, bias."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    logp, ent = fn(h, w, b, t)
    loss = 0
    if use_logp:
        loss = loss + (logp.double() * gl).sum()
    if use_ent:
        loss = loss + (ent.double() * ge).sum()
    loss.backward()
    out = {"logp": logp.detach(), "ent": ent.detach(), "dh": h.grad, "dw": w.grad}
    if b is not None:
        out["db"] = b.grad
    return out


def ours(backend, T, tma=None):
    return lambda h, w, b, t: fused_linear_logprob(h, w, t, temperature=T, bias=b,
                                                   return_entropy=True, backend=backend, tma=tma)


def ref64(T):
    return lambda h, w, b, t: linear_logprob_reference(h, w, t, temperature=T, bias=b)


def ref_same_precision(T, dtype):
    if dtype == torch.float32:
        return lambda h, w, b, t: linear_logprob_reference(h, w, t, temperature=T, bias=b,
                                                           compute_dtype=torch.float32)
    return lambda h, w, b, t: linear_logprob_eager(h, w, t, temperature=T, bias=b)


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def check_case(backend, N, V, H, dtype, T, *, bias=False, scale=1.0, seed=0, use_logp=True,
               use_ent=True, factor=2.0, device="cpu", tma=None):
    h, w, b, t, gl, ge = make_inputs(N, V, H, dtype, bias=bias, scale=scale, seed=seed,
                                     device=device)
    kw = dict(use_logp=use_logp, use_ent=use_ent)
    got = run_with_grads(ours(backend, T, tma), h, w, b, t, gl, ge, **kw)
    truth = run_with_grads(ref64(T), h.double(), w.double(),
                           b.double() if b is not None else None, t, gl, ge, **kw)
    torch_same = run_with_grads(ref_same_precision(T, dtype), h, w, b, t, gl, ge, **kw)
    assert got["logp"].dtype == torch.float32 and got["logp"].shape == (N,)
    for k, ref in truth.items():
        assert got[k].shape == ref.shape, k
        assert torch.isfinite(got[k]).all(), f"{k} has NaN/inf"
        err = max_err(got[k], ref)
        err_torch = max_err(torch_same[k], ref)
        # Floor: a few fp32 ulps of the quantity's own scale (or of the logits' scale for the
        # log-probs, whose cancellation error grows with |logits|).
        mag = max(1.0, ref.abs().max().item())
        if k in ("logp", "ent"):
            mag = max(mag, scale)
        floor = 8 * torch.finfo(torch.float32).eps * mag
        if got[k].dtype in (torch.bfloat16, torch.float16):
            # A gradient returned in half precision: one ulp of its scale is the format's own
            # resolution, and torch's error can fall far below it by luck when few terms are summed
            # (a CI seed: V = 2, db = -1.49342 rounds to -1.4922 in torch, -1.5 here; 0.18% apart
            # before rounding, from the bf16 logits both round to)
            floor = max(floor, torch.finfo(got[k].dtype).eps * ref.abs().max().item())
        assert err <= factor * err_torch + floor, (
            f"{k}: error {err:.3e} > {factor} x torch {dtype} error {err_torch:.3e} + {floor:.1e} "
            f"(N={N} V={V} H={H} T={T} bias={bias} scale={scale})")
    return got


# ---------------------------------------------------------------------------------------------
# Triton kernels: under the interpreter on CPU, compiled on a CUDA machine (``device`` fixture).
# Small, odd shapes. Interpreter tiles are BLOCK_N=16, BLOCK_V=32, BLOCK_H=32 on a pretend 4-SM
# machine, so these shapes cross token, vocab and hidden tile edges, split the vocab across
# programs and merge the splits.

TRITON_CASES = [
    # N,  V,    H,  dtype,          T,   bias,  scale
    (1, 1, 16, torch.float32, 1.0, False, 1.0),        # N = 1, V = 1: logp = 0, entropy = 0
    (1, 300, 64, torch.float32, 0.7, True, 1.0),
    (37, 300, 59, torch.float32, 1.3, True, 1.0),      # H not a power of two: K mask
    (37, 257, 64, torch.float32, 1.0, False, 1.0),     # aligned K path, V = 8 * 32 + 1
    (16, 33, 32, torch.float32, 0.7, False, 1.0),      # V = BLOCK_V + 1
    (17, 31, 3, torch.float32, 1.0, True, 1.0),        # H < BLOCK_H, V < BLOCK_V
    (9, 1031, 24, torch.float32, 1.0, True, 1.0),      # V ~ 1000, prime
    (29, 211, 48, torch.float32, 1.0, True, 1e4),      # logits ~ +-1e4
    (29, 211, 48, torch.float32, 0.7, False, 1e4),
    (37, 300, 64, torch.bfloat16, 1.0, True, 1.0),
    (20, 129, 59, torch.bfloat16, 0.7, False, 1.0),
    (33, 97, 40, torch.bfloat16, 1.3, True, 3.0),
    (25, 150, 64, torch.float16, 1.0, False, 1.0),
]


@needs_interp
@pytest.mark.parametrize("N,V,H,dtype,T,bias,scale", TRITON_CASES)
def test_triton_matches_reference(device, N, V, H, dtype, T, bias, scale):
    check_case("triton", N, V, H, dtype, T, bias=bias, scale=scale, seed=N * 1000 + V,
               device=device)


@needs_interp
@pytest.mark.parametrize("use_logp,use_ent", [(True, False), (False, True)])
def test_triton_grad_branches(device, use_logp, use_ent):
    """Each of d logp and d entropy reaches hidden, weight and bias on its own."""
    check_case("triton", 21, 133, 40, torch.float32, 0.7, bias=True, use_logp=use_logp,
               use_ent=use_ent, seed=7, device=device)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_in_vocab_slices(monkeypatch, device, dtype):
    """Several vocabulary slices, the last one short: dW written per slice, dH carried across
    slices (fp32; hi + lo planes for bf16), db per slice."""
    V = 190
    monkeypatch.setitem(LL._INTERP_CONFIG, "MIN_SLICE", 64)
    N = 45
    cfg = LL._config(torch.empty(1, 64, dtype=dtype, device=device),
                     torch.empty(V, 64, dtype=dtype, device=device))
    plan = LL._plan(N, 64, V, dtype, cfg)
    assert (plan["slice_cols"], plan["n_slices"]) == (64, 3)       # 64 + 64 + 62 columns
    check_case("triton", N, V, 64, dtype, 1.3, bias=True, seed=11, device=device)


@needs_interp
@pytest.mark.parametrize("arch,H", [(80, 64), (90, 64), (90, 59)])
def test_triton_gpu_tiles(monkeypatch, arch, H):
    """The GPU tile sizes of each arch (aligned and unaligned variants), run by the interpreter."""
    if not INTERPRET:
        pytest.skip("the GPU tiles are what a CUDA run uses anyway")
    aligned = H % 64 == 0
    cfg = {k: v for k, v in LL._LOGIT_CONFIGS[(arch, "16", aligned)].items() if k.startswith("BLOCK")}
    cfg.update({f"DH_{k}": v for k, v in LL._DH_CONFIGS[(arch, "16", aligned)].items()
                if k.startswith("BLOCK")})
    monkeypatch.setattr(LL, "_CONFIG_OVERRIDE", cfg)
    assert LL._config(torch.empty(2, H), torch.empty(3, H))["ALIGNED"] is aligned
    check_case("triton", 70, 300, H, torch.float32, 0.7, bias=True, seed=3)


@needs_interp
def test_triton_fresh_random_shapes(device):
    """Fresh random shapes and inputs on every run (the seed is in the failure message)."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = torch.Generator().manual_seed(seed)
    for _ in range(3):
        N, V, H = (int(torch.randint(lo, hi, (1,), generator=rng)) for lo, hi in
                   ((1, 60), (1, 400), (1, 80)))
        dtype = (torch.float32, torch.bfloat16)[int(torch.randint(0, 2, (1,), generator=rng))]
        T = float(torch.empty(()).uniform_(0.5, 1.5, generator=rng))
        bias = bool(torch.randint(0, 2, (1,), generator=rng))
        try:
            check_case("triton", N, V, H, dtype, T, bias=bias, seed=seed, device=device)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: N={N} V={V} H={H} {dtype} T={T:.3f} "
                                 f"bias={bias}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The TMA forward (sm_90: tensor descriptors, persistent grid; ``tma=True``). Under the
# interpreter on a pretend 3-SM machine: every program walks several work items.

TMA_CASES = [
    # N,  V,   H,  dtype,          T,   bias
    (1, 1, 8, torch.bfloat16, 1.0, False),       # one token, one column, H * 2 = 16 B rows
    (37, 300, 64, torch.bfloat16, 0.7, True),    # N, V off the tiles
    (20, 129, 72, torch.bfloat16, 1.3, False),   # H % BLOCK_H != 0: TMA zero-fills the K tail
    (45, 257, 40, torch.float16, 1.0, True),     # H < 2 BLOCK_H, fp16
    (9, 31, 24, torch.bfloat16, 0.9, True),      # V < BLOCK_V, N < BLOCK_N
]


def _tma_inputs(N, V, H, dtype, seed=0, device="cpu"):
    h, w, b, t, _, _ = make_inputs(N, V, H, dtype, bias=True, seed=seed, device=device)
    return h, w, b, t


@needs_interp
@pytest.mark.parametrize("N,V,H,dtype,T,bias", TMA_CASES)
def test_triton_tma_forward_matches_reference(device, N, V, H, dtype, T, bias):
    h, w, _, _ = _tma_inputs(N, V, H, dtype, device=device)
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward runs on sm_90+ (elsewhere tma=True is the cp.async one)")
    assert LL._config(h, w, True)["TMA"] is not None            # the TMA forward runs
    check_case("triton", N, V, H, dtype, T, bias=bias, seed=N * 1000 + V, device=device, tma=True)


@needs_interp
def test_triton_tma_fresh_random_shapes(device):
    """Fresh random shapes (rows of 16-byte multiples, as TMA needs) on every run."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward runs on sm_90+")
    seed = int.from_bytes(os.urandom(4), "little")
    rng = torch.Generator().manual_seed(seed)
    for _ in range(2):
        N, V, H8 = (int(torch.randint(lo, hi, (1,), generator=rng)) for lo, hi in
                    ((1, 60), (1, 400), (1, 11)))
        H = 8 * H8
        T = float(torch.empty(()).uniform_(0.5, 1.5, generator=rng))
        bias = bool(torch.randint(0, 2, (1,), generator=rng))
        try:
            check_case("triton", N, V, H, torch.bfloat16, T, bias=bias, seed=seed, device=device,
                       tma=True)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: N={N} V={V} H={H} T={T:.3f} bias={bias}: "
                                 f"{exc}") from None


@needs_interp
def test_triton_tma_persistent_grid_is_a_plain_launch_bitwise(monkeypatch, device):
    """1 program, 3 (work items not divisible), and one per work item (non-persistent): the
    same partials bit for bit (every work item is done whole by one program, in one order)."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward runs on sm_90+")
    h, w, b, t = _tma_inputs(37, 300, 72, torch.bfloat16, seed=2, device=device)
    outs = []
    for programs in (1, 3, 1 << 30):
        monkeypatch.setattr(LL, "_CONFIG_OVERRIDE", {"TMA": {"PROGRAMS": programs}})
        outs.append(LL._triton_forward(h, w, b, t, 1 / 0.7, tma=True))
    for o in outs[1:]:
        for a, c in zip(outs[0], o):
            assert torch.equal(a, c)


@needs_interp
@pytest.mark.parametrize("bias", [False, True])
def test_triton_tma_forward_rounds_logits_as_the_cp_async_one(device, bias):
    """logit_dtype (an autocast lm_head) through the TMA forward: the same roundings as the
    cp.async forward, so the same partials bit for bit -- and not those of unrounded logits."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward runs on sm_90+")
    h, w, b, t = _tma_inputs(37, 300, 72, torch.bfloat16, seed=4, device=device)
    b = b if bias else None
    tma = LL._triton_forward(h, w, b, t, 1 / 0.7, logit_round=1, tma=True)
    cp = LL._triton_forward(h, w, b, t, 1 / 0.7, logit_round=1, tma=False)
    for a, c in zip(tma, cp):
        assert torch.equal(a, c)
    plain = LL._triton_forward(h, w, b, t, 1 / 0.7, logit_round=0, tma=True)
    assert not torch.equal(plain[0], tma[0])


@needs_interp
def test_triton_tma_gpu_tiles(monkeypatch):
    """The sm_90 TMA tiles (128 x 128 x 64) run by the interpreter: H = 72 leaves a K tail of 8
    that the descriptor zero-fills; N and V are off the tiles."""
    if not INTERPRET:
        pytest.skip("the GPU tiles are what a CUDA run uses anyway")
    tiles = {k: LL._TMA_CONFIG[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
    monkeypatch.setattr(LL, "_CONFIG_OVERRIDE", {"TMA": {**tiles, "PROGRAMS": 2}})
    check_case("triton", 130, 300, 72, torch.bfloat16, 0.7, bias=True, seed=6, tma=True)


def _misaligned(x):
    # same values, data pointer 2 bytes past a 16-byte boundary, row stride unchanged
    buf = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
    y = buf[1:1 + x.numel()].view_as(x)
    y.copy_(x)
    return y


@needs_interp
@pytest.mark.parametrize("case", ["H*2 % 16 != 0", "fp32", "misaligned base", "strided rows"])
def test_tma_falls_back_to_cp_async(device, case):
    """tma=True where a descriptor cannot take the tensors (row strides or bases not 16-byte
    aligned) or where it does not apply (fp32): the cp.async forward runs, silently, and gives
    what tma=False gives, bit for bit."""
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    H = 59 if case == "H*2 % 16 != 0" else 64
    h, w, b, t = _tma_inputs(29, 150, H, dtype, seed=3, device=device)
    if case == "misaligned base":
        h = _misaligned(h)
        assert h.data_ptr() % 16
    if case == "strided rows":
        w = torch.cat([w, w[:, :4]], 1)[:, :H]    # row stride 68 elements = 136 B
    assert LL._config(h, w, True)["TMA"] is None
    a = LL._triton_forward(h, w, b, t, 1.0, tma=True)
    c = LL._triton_forward(h, w, b, t, 1.0, tma=False)
    for x, y in zip(a, c):
        assert torch.equal(x, y)
    check_case("triton", 29, 150, H, dtype, 1.0, bias=True, seed=3, device=device, tma=True)


def test_tma_switch(monkeypatch):
    """tma=None reads STAGED_LOGPROB_TMA (off when unset); True / False override it; anything
    else is a ValueError."""
    monkeypatch.delenv("STAGED_LOGPROB_TMA", raising=False)
    assert LL._tma_requested(None) is False
    monkeypatch.setenv("STAGED_LOGPROB_TMA", "1")
    assert LL._tma_requested(None) is True and LL._tma_requested(False) is False
    monkeypatch.setenv("STAGED_LOGPROB_TMA", "0")
    assert LL._tma_requested(None) is False and LL._tma_requested(True) is True
    h, w, t = torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="tma must be None, True or False"):
        fused_linear_logprob(h, w, t, tma="yes")


# ---------------------------------------------------------------------------------------------
# workspace: the planned buffers, the public function and the 2% budget


def test_workspace_at_7b_head_is_within_2pct_of_fp32_logits():
    N, H, V = 16384, 3584, 152064
    logits = N * V * 4
    for arch in (80, 90):
        ws = LL.fused_linear_logprob_workspace(N, H, V, torch.bfloat16, arch=arch)
        assert 0 < ws <= 0.02 * logits, (arch, ws, ws / logits)
        assert LL.fused_linear_logprob_workspace(N, H, V, torch.bfloat16, bias=True,
                                                 arch=arch) <= 0.02 * logits
    plan = LL._plan(N, H, V, torch.bfloat16, LL._gpu_config(90, "16", True), has_bias=False)
    # dz of one slice + the dH residual plane dominate; the slices stay GEMM-sized.
    assert plan["slice_cols"] >= 2048 and plan["bwd"]["dh_lo"] == N * H * 2
    from staged.kernels import fused_linear_logprob_workspace
    assert fused_linear_logprob_workspace is LL.fused_linear_logprob_workspace


@pytest.mark.parametrize("bad", [dict(dtype=torch.float64), dict(arch=75), dict(vocab=0),
                                 dict(n_tokens=-1)])
def test_workspace_rejects_bad_arguments(bad):
    kw = dict(n_tokens=16, hidden=64, vocab=100, dtype=torch.bfloat16, arch=90) | bad
    with pytest.raises(ValueError, match="must be"):
        LL.fused_linear_logprob_workspace(kw.pop("n_tokens"), kw.pop("hidden"), kw.pop("vocab"),
                                          kw.pop("dtype"), **kw)
    assert LL.fused_linear_logprob_workspace(0, 64, 100) == 0


@needs_interp
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, True), (torch.float32, False)])
def test_allocated_buffers_are_the_planned_workspace(monkeypatch, device, dtype, bias):
    """Every buffer forward and backward allocate beyond inputs, outputs and gradients is in the
    plan, with its planned size, and their peak is within the plan's total (which is what
    fused_linear_logprob_workspace returns for the GPU tiles)."""
    if not INTERPRET:
        pytest.skip("CUDA: test_cuda_workspace_is_the_real_allocation measures the allocator")
    N, V, H = 40, 700, 24
    monkeypatch.setattr(LL, "BWD_WORKSPACE_FRACTION", 0.25)   # budget-sized slices at this N
    log = []
    monkeypatch.setattr(LL, "_ALLOC_LOG", log)
    got = check_case("triton", N, V, H, dtype, 0.9, bias=bias, seed=4, device=device)
    assert got["dh"].dtype == dtype
    cfg = LL._config(torch.empty(1, H, dtype=dtype), torch.empty(V, H, dtype=dtype))
    plan = LL._plan(N, H, V, dtype, cfg, has_bias=bias)
    assert 1 < plan["n_slices"] < triton_cdiv(V, 32), plan       # budget-sized, not minimal
    fwd = {k: b for k, b in log if k == "partials"}
    bwd = dict(kv for kv in log if kv[0] != "partials")
    assert fwd == {"partials": plan["fwd"]["partials"]}
    assert bwd == plan["bwd"], (bwd, plan["bwd"])
    assert plan["saved"] + max(sum(plan["fwd"].values()), sum(bwd.values())) == plan["total"]
    assert plan["total"] <= 0.25 * N * V * 4


def triton_cdiv(a, b):
    return -(-a // b)


@needs_interp
def test_triton_matches_chunked_torch(device):
    """The two backends agree with each other closely (same maths, both fp32-accumulated)."""
    h, w, b, t, gl, ge = make_inputs(30, 250, 48, torch.float32, bias=True, seed=5, device=device)
    a = run_with_grads(ours("triton", 0.9), h, w, b, t, gl, ge)
    c = run_with_grads(ours("torch", 0.9), h, w, b, t, gl, ge)
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# logit_dtype: the lm_head as an autocast one runs it (TRL under bf16=True, on CUDA and CPU)


def dyadic_inputs(N, V, H, *, bias, seed):
    """fp32 inputs exact in bf16 whose products and sums are exact in fp32 (h = k/16, w = k/32,
    |logit| < 2^6 on a 2^-9 grid): every way of summing gives the same logit, so the bf16
    rounding of the logits is decided exactly, ties included, and the reference can be exact."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-16, 17, (N, H), generator=g).float() / 16
    w = torch.randint(-16, 17, (V, H), generator=g).float() / 32
    b = torch.randint(-64, 65, (V,), generator=g).float() / 32 if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[0] = V - 1
    gl = torch.randn(N, generator=g, dtype=torch.float64)
    ge = torch.randn(N, generator=g, dtype=torch.float64)
    return h, w, b, t, gl, ge


def rounded_logits_ref(ld, T, round_logits=True):
    """float64 reference: logits rounded to ``ld`` after the GEMM and after the bias (as an
    autocast lm_head writes them), then a float64 log-softmax / entropy of logits / T."""
    rnd = (lambda z: z.to(ld).double()) if round_logits else (lambda z: z)  # noqa: E731

    def fn(h, w, b, t):
        z = rnd(h.double() @ w.double().t())
        if b is not None:
            z = rnd(z + b.double())
        lp = torch.log_softmax(z / T, dim=-1)
        return lp.gather(-1, t[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)
    return fn


LOGIT_DTYPE_CASES = [
    # N, V,   H,  T,   bias, logit dtype
    (1, 61, 19, 1.0, True, torch.bfloat16),
    (7, 97, 37, 0.7, False, torch.bfloat16),
    (33, 130, 70, 1.3, True, torch.bfloat16),
    (20, 257, 64, 1.0, True, torch.bfloat16),     # aligned K path
    (18, 75, 45, 0.9, True, torch.float16),
]


@needs_interp
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("N,V,H,T,bias,ld", LOGIT_DTYPE_CASES)
def test_logit_dtype_rounds_logits_like_autocast(device, backend, N, V, H, T, bias, ld):
    """With ``logit_dtype`` both paths round the logit tile to it (after the GEMM and after the
    bias) before the log-sum-exp, in the forward and in the backward's recompute: log-probs and
    entropy match a float64 log-softmax of the rounded logits to fp32 accuracy, and not the
    unrounded ones. The gradients (fp32 inputs: fp32 gradients, as TRL's) are the float64 ones
    from the rounded logits with the logits' gradient rounded to ``ld``, as TRL's tile holds it."""
    h, w, b, t, gl, ge = dyadic_inputs(N, V, H, bias=bias, seed=N * 7 + V)
    fn = lambda h_, w_, b_, t_: fused_linear_logprob(  # noqa: E731
        h_, w_, t_, temperature=T, bias=b_, return_entropy=True, backend=backend, logit_dtype=ld)
    dev = lambda x: x.to(device) if x is not None else None  # noqa: E731
    got = run_with_grads(fn, dev(h), dev(w), dev(b), dev(t), dev(gl), dev(ge))
    got = {k: v.cpu() for k, v in got.items()}
    want_logp, want_ent = rounded_logits_ref(ld, T)(h, w, b, t)
    unrounded_logp, _ = rounded_logits_ref(ld, T, round_logits=False)(h, w, b, t)
    torch.testing.assert_close(got["logp"].double(), want_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(got["ent"].double(), want_ent, rtol=0, atol=2e-5)
    assert (unrounded_logp - want_logp).abs().max() > 10 * 2e-5   # the rounding is visible

    # gradients: dz in float64 from the rounded logits, rounded to ld, then the GEMMs
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    bd = b.double().requires_grad_() if b is not None else None
    z = (hd @ wd.t()).detach().to(ld).double()
    if b is not None:
        z = (z + bd.detach()).to(ld).double()
    z.requires_grad_()
    lp_all = torch.log_softmax(z / T, dim=-1)
    lp = lp_all.gather(-1, t[:, None]).squeeze(-1)
    ent = -(lp_all.exp() * lp_all).sum(-1)
    (dz,) = torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), z)
    dz = dz.to(ld).double()
    want = {"dh": dz @ w.double(), "dw": dz.t() @ h.double()}
    if b is not None:
        want["db"] = dz.sum(0)
    for k, ref in want.items():
        assert got[k].dtype == torch.float32, (k, got[k].dtype)
        # a dz element may round the other way (fp32 vs float64 softmax at a bf16 tie): a
        # few bf16 ulps of one term, far below the percent-level error of unrounded logits
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-3,
                                   atol=1e-3 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------
# chunked PyTorch path (the CPU default): larger shapes, several chunks

TORCH_CASES = [
    (300, 5003, 96, torch.float32, 1.0, True, 1.0),
    (257, 4099, 59, torch.float32, 0.7, False, 1.0),
    (128, 3001, 64, torch.float32, 1.3, True, 1e4),
    (200, 2999, 64, torch.bfloat16, 1.0, True, 1.0),
    (100, 1000, 33, torch.float16, 0.7, False, 2.0),
    (1, 1, 8, torch.float32, 1.0, False, 1.0),
]


@pytest.mark.parametrize("N,V,H,dtype,T,bias,scale", TORCH_CASES)
def test_chunked_torch_matches_reference(monkeypatch, N, V, H, dtype, T, bias, scale):
    monkeypatch.setattr(LC, "CHUNK_BYTES", 37 * V * 4)     # 37-row chunks: several, uneven
    check_case("torch", N, V, H, dtype, T, bias=bias, scale=scale, seed=N + V)


def test_chunked_torch_float64_is_exact_to_reference():
    h, w, b, t, gl, ge = make_inputs(50, 777, 20, torch.float64, bias=True, seed=2)
    a = run_with_grads(ours("torch", 1.3), h, w, b, t, gl, ge)
    r = run_with_grads(ref64(1.3), h, w, b, t, gl, ge)
    for k in r:
        torch.testing.assert_close(a[k], r[k], rtol=1e-10, atol=1e-12)


def test_auto_on_cpu_uses_chunked_torch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the Triton path ran on CPU under backend='auto'")
    monkeypatch.setattr(LL, "_triton_forward", boom)
    h, w, b, t, gl, ge = make_inputs(5, 40, 8, torch.float32)
    fused_linear_logprob(h, w, t)     # must not raise


@needs_interp
def test_backend_triton_dispatches_to_kernels(monkeypatch, device):
    calls = []
    real = LL._triton_forward
    monkeypatch.setattr(LL, "_triton_forward", lambda *a: calls.append(1) or real(*a))
    h, w, b, t, gl, ge = make_inputs(5, 40, 8, torch.float32, device=device)
    fused_linear_logprob(h, w, t, backend="triton")
    assert calls == [1]


def test_leading_dims_and_no_entropy():
    h, w, b, t, gl, ge = make_inputs(12, 90, 16, torch.float32, bias=True)
    flat = fused_linear_logprob(h, w, t, bias=b)
    shaped, ent = fused_linear_logprob(h.view(3, 4, 16), w, t.view(3, 4), bias=b,
                                       return_entropy=True)
    assert shaped.shape == (3, 4) and ent.shape == (3, 4)
    torch.testing.assert_close(shaped.reshape(-1), flat)


def test_empty_batch_backward():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    logp, ent = fused_linear_logprob(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert w.grad is not None and not w.grad.any()


def test_frozen_weight_and_no_grad():
    h, w, b, t, gl, ge = make_inputs(9, 70, 8, torch.float32)
    h.requires_grad_()
    fused_linear_logprob(h, w, t).sum().backward()     # weight frozen: grad only to hidden
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        assert fused_linear_logprob(h, w, t).requires_grad is False


def test_matches_trl_semantics():
    """TRL computes selective_log_softmax(logits / T) and entropy_from_logits(logits / T):
    temperature first, for both."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    h, w, b, t, gl, ge = make_inputs(40, 500, 32, torch.float32, bias=True, seed=9)
    T = 0.7
    logits = (h @ w.t() + b) / T
    want_logp = trl_utils.selective_log_softmax(logits, t)
    want_ent = trl_utils.entropy_from_logits(logits)
    logp, ent = fused_linear_logprob(h, w, t, bias=b, temperature=T, return_entropy=True)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# invalid input


@pytest.mark.parametrize("backend", ["torch", pytest.param(
    "triton", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors on the Triton path "
                                       "need the interpreter; CUDA uses torch._assert_async"))])
def test_out_of_range_targets_raise(backend):
    h, w, b, t, gl, ge = make_inputs(6, 50, 8, torch.float32)
    for bad in (-1, 50):
        t2 = t.clone()
        t2[3] = bad
        with pytest.raises(ValueError, match=rf"\[0, V=50\).*targets\[3\] = {bad}"):
            fused_linear_logprob(h, w, t2, backend=backend)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=torch.zeros(4, 7)), r"hidden \(4, 7\) must end in H = 8"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), r"targets \(5,\) must match .*\(4,\)"),
    (dict(targets=torch.zeros(4)), r"int64 or int32; got torch.float32"),
    (dict(weight=torch.zeros(50, 8, dtype=torch.float64)), r"must share a dtype"),
    (dict(bias=torch.zeros(49)), r"bias must be .* shape \(50,\); got \(49,\)"),
    (dict(temperature=0.0), r"temperature must be a finite number > 0; got 0.0"),
    (dict(temperature=float("nan")), r"temperature must be"),
    (dict(backend="cuda"), r"backend must be 'auto', 'triton' or 'torch'; got 'cuda'"),
    (dict(weight=torch.zeros(50)), r"weight must be \[V, H\]; got shape \(50,\)"),
])
def test_invalid_inputs_raise(kwargs, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(50, 8),
                targets=torch.zeros(4, dtype=torch.long), temperature=1.0, bias=None,
                backend="auto")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprob(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused_linear_logprob(torch.zeros(2, 8), torch.zeros(5, 8), torch.zeros(2, dtype=torch.long),
                             backend="triton")


# ---------------------------------------------------------------------------------------------
# memory: the chunked CPU path at the Qwen vocabulary never holds N x V


@pytest.mark.slow
def test_chunked_cpu_peak_memory_under_10pct_of_naive_logits():
    """Peak extra RSS of fp32 forward + backward at N=4096, V=152064, H=256, measured in a
    subprocess, minus the dH + dW gradients every path returns, must be under 10% of the naive
    path's logits alone (N*V*4 B = 2.49 GB; the naive path's own peak is a multiple of that —
    benchmarks/bench_linear_logprob.py measures it)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_linear_logprob import measure_rss_subprocess

    N, V, H = 4096, 152064, 256
    m = measure_rss_subprocess("staged", N, V, H)
    logits_mb = N * V * 4 / 2**20
    extra = m["extra_mb"] - m["grads_mb"]
    assert m["extra_mb"] > m["grads_mb"] * 0.9, f"measurement implausible: {m}"
    assert extra < 0.10 * logits_mb, (
        f"chunked path peak extra {extra:.0f} MB (+{m['grads_mb']:.0f} MB grads) is not under "
        f"10% of the naive logits' {logits_mb:.0f} MB: {m}")


# ---------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("N,V,H,bias", [(512, 152064, 3584, False), (1000, 151936, 896, True),
                                        (77, 32003, 59, True)])
def test_cuda_bf16_head_shapes(N, V, H, bias):
    torch.manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).to(torch.bfloat16)
    b = torch.randn(V, device="cuda", dtype=torch.bfloat16) if bias else None
    t = torch.randint(0, V, (N,), device="cuda")
    t[0], t[-1] = 0, V - 1
    gl = torch.randn(N, device="cuda", dtype=torch.float64)
    ge = torch.randn(N, device="cuda", dtype=torch.float64)
    got = run_with_grads(ours("auto", 0.7), h, w, b, t, gl, ge)
    truth = run_with_grads(ref64(0.7), h.double(), w.double(), b.double() if bias else None,
                           t, gl, ge)
    eager = run_with_grads(ref_same_precision(0.7, torch.bfloat16), h, w, b, t, gl, ge)
    for k in truth:
        assert torch.isfinite(got[k]).all()
        assert max_err(got[k], truth[k]) <= 2 * max_err(eager[k], truth[k]) + 1e-6, k


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    torch.manual_seed(1)
    h = torch.randn(3000, 896, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(151936, 896, device="cuda") * 0.03).to(torch.bfloat16)
    t = torch.randint(0, 151936, (3000,), device="cuda")
    gl = torch.randn(3000, device="cuda", dtype=torch.float64)
    ge = torch.randn(3000, device="cuda", dtype=torch.float64)
    a = run_with_grads(ours("auto", 1.0), h, w, None, t, gl, ge)
    c = run_with_grads(ours("auto", 1.0), h, w, None, t, gl, ge)
    for k in a:
        assert torch.equal(a[k], c[k]), k


@pytest.mark.cuda
def test_cuda_tma_forward_matches_cp_async_and_is_deterministic():
    """sm_90: the TMA forward at the 7B head against the cp.async forward (same tiles, same
    fp32 accumulation: equal up to the MMA order) and the float64 reference; twice and with one
    program per work item (non-persistent): bit for bit."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward runs on sm_90+")
    torch.manual_seed(2)
    N, V, H = 1000, 152064, 3584
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    assert LL._config(h, w, True)["TMA"] is not None
    tma = LL._triton_forward(h, w, None, t, 1.0, tma=True)
    cp = LL._triton_forward(h, w, None, t, 1.0, tma=False)
    ref = linear_logprob_reference(h.double(), w.double(), t)
    for a, c, r in zip(tma[:2], cp[:2], ref):
        assert max_err(a, r) <= 2 * max_err(c, r) + 1e-5
    assert all(torch.equal(a, b) for a, b in zip(tma, LL._triton_forward(h, w, None, t, 1.0, tma=True)))
    LL._CONFIG_OVERRIDE["TMA"] = {"PROGRAMS": 1 << 30}
    try:
        plain = LL._triton_forward(h, w, None, t, 1.0, tma=True)
    finally:
        LL._CONFIG_OVERRIDE.pop("TMA")
    assert all(torch.equal(a, b) for a, b in zip(tma, plain))


@pytest.mark.cuda
def test_cuda_fp32_matches_reference():
    h, w, b, t, gl, ge = make_inputs(300, 5003, 96, torch.float32, bias=True, device="cuda")
    got = run_with_grads(ours("auto", 0.7), h, w, b, t, gl, ge)
    truth = run_with_grads(ref64(0.7), h.double(), w.double(), b.double(), t, gl, ge)
    same = run_with_grads(ref_same_precision(0.7, torch.float32), h, w, b, t, gl, ge)
    for k in truth:
        assert max_err(got[k], truth[k]) <= 2 * max_err(same[k], truth[k]) + 1e-5, k


@pytest.mark.cuda
@pytest.mark.parametrize("N,H,V", [(4096, 3584, 152064), (2000, 896, 151936)])
def test_cuda_workspace_is_the_real_allocation(N, H, V):
    """The allocator's peak during forward + backward, minus inputs, outputs and gradients, is
    within fused_linear_logprob_workspace (+ cuBLAS's own workspace, which torch allocates
    through the caching allocator: <= 32 MiB per handle)."""
    torch.manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    fused_linear_logprob(h, w, t).mul(g).sum().backward()     # warm-up: kernels, cuBLAS handle
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp = fused_linear_logprob(h, w, t)
    logp.mul(g).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    owned = (N * H + V * H) * 2 + N * 4 * 3            # dH, dW, logp, its grad, the product
    ws = LL.fused_linear_logprob_workspace(N, H, V, torch.bfloat16,
                                           arch=90 if torch.cuda.get_device_capability()[0] >= 9 else 80)
    assert peak - owned <= ws + 32 * 2**20, (peak, owned, ws)
