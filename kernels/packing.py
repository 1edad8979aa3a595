"""Packing kernels: one packed micro-batch's embeddings, 4-row position ids and shifted labels,
driven by the span table built on the host (``staged.packing.spans``), with no host sync.

Every kernel finds the span of each of its rows by a binary search over the span table's
ROW column (ceil(log2 S) loads per row, S spans; the table is tiny and stays in L1/L2), once per
row block: the embedding kernels loop over the hidden columns inside the program, so the search
is not repeated per column block. No per-row metadata is ever built and nothing depends on
token values except the embedding lookup itself.

Shapes and dtypes (T packed rows, H hidden, V vocab, S spans, B samples, Nv vision rows):
    input_ids   [T] int64 (int32 accepted)
    weight      [V, H] the token embedding table (bf16 / fp16 / fp32)
    vision      [Nv, H] the vision encoder's merged output, rows in span order (cast to the
                weight's dtype on the host when it differs)
    spans       [S, 9] int64, time_scale [S] fp32, cu_seqlens [B+1] int32, prompt_lens [B] int32

Ops and their byte model (what a benchmark divides by time for GB/s; e = element bytes):
    pack_embed  fwd: reads T*H*e weight/vision + 8T ids, writes T*H*e.
                bwd: reads T*H*e grad + 8T ids, writes Nv*H*e vision grads; the embedding
                gradient is a sort-by-token segmented reduction: keys [T] int32 (4T), a stable
                device sort (~16T), then each present token's row summed in fp32 in sorted
                order and written once in the weight's dtype (U*H*e, U tokens present) into a
                zeroed [V, H] gradient (V*H*e memset: the gradient itself). No fp32 [V, H]
                buffer, no atomics.
    packed_position_ids  writes 32T bytes (int64 [4, T]).
    packed_labels        reads 8T ids, writes 8T labels + T mask bytes.

Checks: host-known counts are checked on the host (``ValueError`` with the numbers); what only
the device knows -- that the rows of every vision span hold the image/video token id, and that
text token ids lie in the vocabulary -- is counted by the embed kernel and checked with
``torch._assert_async`` (no sync; a mismatch fails at the next synchronising op).

Determinism: every output is run-to-run deterministic. The embedding gradient sums each
token's rows in a fixed order (rows sorted stably by token, then by row); the only atomics left
are the two error counters of the checks (integer, relaxed: no memory fence per atomic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from staged.packing.spans import (KIND_IMAGE, KIND_TEXT, KIND_VIDEO, SPAN_FIELDS, SPAN_H,
                                  SPAN_KIND, SPAN_POS, SPAN_ROW, SPAN_SAMPLE, SPAN_T, SPAN_VROW,
                                  SPAN_W)

from .aot import register_aot
from .linear_logprob import _bf16_rne

IGNORE_INDEX = -100

# The kernels read span-table columns by number (SAMPLE 0, KIND 1, ROW 2, LEN 3, POS 4, T 5,
# H 6, W 7, VROW 8) and kinds TEXT 0 / IMAGE 1 / VIDEO 2; keep them in step with the table.
assert (SPAN_SAMPLE, SPAN_KIND, SPAN_ROW, SPAN_POS, SPAN_T, SPAN_H, SPAN_W, SPAN_VROW,
        SPAN_FIELDS) == (0, 1, 2, 4, 5, 6, 7, 8, 9)
assert (KIND_TEXT, KIND_IMAGE, KIND_VIDEO) == (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _search(PTR, stride, rows, n, N_ITER):
    """Largest idx in [0, n) with PTR[idx * stride] <= row, for each row; PTR[0] <= every row and
    the values are non-decreasing. N_ITER = ceil(log2(n)) halvings; every load is in bounds."""
    lo = tl.zeros_like(rows)
    hi = tl.zeros_like(rows) + n
    for _ in range(N_ITER):
        mid = (lo + hi) // 2  # lo <= mid < hi <= n
        go = tl.load(PTR + mid * stride) <= rows
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _position_ids_kernel(
    SPANS, SCALE, CU,      # span table [S, NF] int64, time scales [S] fp32, cu_seqlens [B+1] i32
    OUT,                   # [4, T] int64
    T, S, N_ITER,
    NF: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < T
    s = _search(SPANS + 2, NF, rows, S, N_ITER)  # column 2 = SPAN_ROW
    span = SPANS + s * NF
    slot = tl.load(span + 0, mask=mask, other=0)
    kind = tl.load(span + 1, mask=mask, other=0)
    start = tl.load(span + 2, mask=mask, other=0)
    base = tl.load(span + 4, mask=mask, other=0)
    gh = tl.load(span + 6, mask=mask, other=0)
    gw = tl.load(span + 7, mask=mask, other=0)
    scale = tl.load(SCALE + s, mask=mask, other=1.0)
    sample_start = tl.load(CU + slot, mask=mask, other=0).to(tl.int64)

    local = rows - start
    w1 = tl.maximum(gw, 1)
    hw = tl.maximum(gh * gw, 1)
    it = local // hw
    rem = local - it * hw
    ih = rem // w1
    iw = rem - ih * w1
    # float32 product, truncated: exactly transformers' (arange(t) * time_interval).long()
    t_off = (it.to(tl.float32) * scale).to(tl.int64)
    text = kind == 0
    tl.store(OUT + rows, rows - sample_start, mask=mask)
    tl.store(OUT + T + rows, tl.where(text, base + local, base + t_off), mask=mask)
    tl.store(OUT + 2 * T + rows, tl.where(text, base + local, base + ih), mask=mask)
    tl.store(OUT + 3 * T + rows, tl.where(text, base + local, base + iw), mask=mask)


@triton.jit
def _labels_kernel(
    IDS, CU, PROMPT,       # input ids [T], cu_seqlens [B+1] i32, prompt lengths [B] i32
    LABELS, MASK,          # [T] int64, [T] bool (as u8)
    T, B, N_ITER, IGNORE,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < T
    b = _search(CU, 1, rows, B, N_ITER)
    start = tl.load(CU + b, mask=mask, other=0).to(tl.int64)
    end = tl.load(CU + b + 1, mask=mask, other=0).to(tl.int64)
    prompt = tl.load(PROMPT + b, mask=mask, other=0).to(tl.int64)
    nxt = rows + 1
    valid = nxt < end
    tok = tl.load(IDS + nxt, mask=mask & valid, other=0).to(tl.int64)
    tl.store(LABELS + rows, tl.where(valid, tok, IGNORE), mask=mask)
    tl.store(MASK + rows, (valid & (nxt - start >= prompt)).to(tl.uint8), mask=mask)


@triton.jit
def _pack_embed_fwd_kernel(
    IDS, W, VIS, SPANS,    # ids [T], weight [V, H], vision [Nv, H], span table [S, NF] int64
    OUT, ERR,              # out [T, H] (weight dtype), error counters [2] int32
    T, H, V, S, N_ITER, IMAGE_ID, VIDEO_ID,
    stride_w, stride_v, stride_o,
    NF: tl.constexpr, HAS_VIS: tl.constexpr, CHECK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    s = _search(SPANS + 2, NF, rows, S, N_ITER)       # once per row block, not per column block
    kind = tl.load(SPANS + s * NF + 1, mask=rmask, other=0)
    tok = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
    is_txt = rmask & (kind == 0)
    in_vocab = (tok >= 0) & (tok < V)
    use_w = is_txt & in_vocab
    w_rows = W + tok[:, None] * stride_w
    o_rows = OUT + rows[:, None] * stride_o
    if HAS_VIS:
        is_vis = rmask & (kind != 0)
        start = tl.load(SPANS + s * NF + 2, mask=rmask, other=0)
        vrow = tl.load(SPANS + s * NF + 8, mask=rmask, other=0) + rows - start
        v_rows = VIS + vrow[:, None] * stride_v
    for c0 in range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        e = tl.load(w_rows + cols[None, :], mask=use_w[:, None] & cmask[None, :], other=0.0)
        if HAS_VIS:
            v = tl.load(v_rows + cols[None, :], mask=is_vis[:, None] & cmask[None, :], other=0.0)
            e = tl.where(is_vis[:, None], v, e)  # same dtype: the host cast vision to W's
        tl.store(o_rows + cols[None, :], e, mask=rmask[:, None] & cmask[None, :])
    if CHECK:
        want = tl.where(kind == 1, IMAGE_ID, VIDEO_ID)
        bad_vis = rmask & (kind != 0) & (tok != want)
        bad_tok = is_txt & (in_vocab == 0)
        # Counters only: relaxed (the default acq_rel puts a fence around every atomic).
        tl.atomic_add(ERR, tl.sum(bad_vis.to(tl.int32), axis=0), sem="relaxed")
        tl.atomic_add(ERR + 1, tl.sum(bad_tok.to(tl.int32), axis=0), sem="relaxed")


@triton.jit
def _pack_embed_bwd_kernel(
    GOUT, IDS, SPANS,      # grad of out [T, H], ids [T], span table [S, NF] int64
    KEYS, GVIS,            # out: sort keys [T] int32 (token id, or V: no gradient), vision grad
    T, H, V, S, N_ITER, PAD_IDX,
    stride_g, stride_gv,
    NF: tl.constexpr, HAS_GW: tl.constexpr, HAS_GV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    s = _search(SPANS + 2, NF, rows, S, N_ITER)
    kind = tl.load(SPANS + s * NF + 1, mask=rmask, other=0)
    if HAS_GW:
        tok = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
        use = (kind == 0) & (tok >= 0) & (tok < V) & (tok != PAD_IDX)
        tl.store(KEYS + rows, tl.where(use, tok, V).to(tl.int32), mask=rmask)
    if HAS_GV:
        is_vis = rmask & (kind != 0)
        start = tl.load(SPANS + s * NF + 2, mask=rmask, other=0)
        vrow = tl.load(SPANS + s * NF + 8, mask=rmask, other=0) + rows - start
        for c0 in range(0, H, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            g = tl.load(GOUT + rows[:, None] * stride_g + cols[None, :],
                        mask=is_vis[:, None] & cmask[None, :], other=0.0)
            tl.store(GVIS + vrow[:, None] * stride_gv + cols[None, :], g,
                     mask=is_vis[:, None] & cmask[None, :])


@triton.jit
def _embed_grad_segments_kernel(
    GOUT, KEYS, PERM,      # grad of out [T, H], sorted keys [T] int32, their rows [T] int64
    GW,                    # [V, H] embedding gradient (weight dtype), zeroed by the host
    T, H, V,
    stride_g, stride_gw,
    RNE_BF16: tl.constexpr,    # interpreter + bf16: round explicitly (its cast truncates)
    BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (i, c): if sorted position i starts a token's run, sum that run's grad rows over
    column block c in fp32, in sorted order, and write the token's gradient row once."""
    i = tl.program_id(0).to(tl.int64)
    key = tl.load(KEYS + i)
    prev = tl.load(KEYS + tl.maximum(i - 1, 0))
    if ((i == 0) | (prev != key)) & (key < V):
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        j0 = i
        more = 1
        while more > 0:
            js = j0 + tl.arange(0, BLOCK_J)
            same = (js < T) & (tl.load(KEYS + js, mask=js < T, other=-1) == key)
            rows = tl.load(PERM + js, mask=same, other=0)
            g = tl.load(GOUT + rows[:, None] * stride_g + cols[None, :],
                        mask=same[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32), axis=0)
            more = tl.sum(same.to(tl.int32), axis=0) == BLOCK_J   # the run may go on
            more = more.to(tl.int32)
            j0 += BLOCK_J
        if RNE_BF16:
            acc = _bf16_rne(acc)
        tl.store(GW + key.to(tl.int64) * stride_gw + cols, acc.to(GW.dtype.element_ty), mask=cmask)


# 8 warps: with the JIT's divisibility attributes, 4 warps x 512 rows spilled 8 bytes on sm_90
# under triton 3.6 (the GPU image's), though not under 3.9.
_LABELS_WARPS = 8

# Signatures for AOT compilation (staged.kernels.aot): the launchers' configurations.
register_aot(_position_ids_kernel,
             {"SPANS": "*i64", "SCALE": "*fp32", "CU": "*i32", "OUT": "*i64", "T": "i64",
              "S": "i32", "N_ITER": "i32"}, {"NF": SPAN_FIELDS, "BLOCK": 512})
register_aot(_labels_kernel,
             {"IDS": "*i64", "CU": "*i32", "PROMPT": "*i32", "LABELS": "*i64", "MASK": "*u8",
              "T": "i64", "B": "i32", "N_ITER": "i32", "IGNORE": "i32"}, {"BLOCK": 512},
             num_warps=_LABELS_WARPS)
_EMBED_FWD_SIG = {"IDS": "*i64", "W": "*bf16", "VIS": "*bf16", "SPANS": "*i64", "OUT": "*bf16",
                  "ERR": "*i32", "T": "i64", "H": "i32", "V": "i64", "S": "i32", "N_ITER": "i32",
                  "IMAGE_ID": "i64", "VIDEO_ID": "i64", "stride_w": "i64", "stride_v": "i64",
                  "stride_o": "i64"}
register_aot(_pack_embed_fwd_kernel, _EMBED_FWD_SIG,
             {"NF": SPAN_FIELDS, "HAS_VIS": True, "CHECK": True, "BLOCK_T": 16, "BLOCK_H": 256})
register_aot(_pack_embed_fwd_kernel, {**_EMBED_FWD_SIG, "W": "*fp32", "VIS": "*fp32",
                                       "OUT": "*fp32"},
             {"NF": SPAN_FIELDS, "HAS_VIS": False, "CHECK": False, "BLOCK_T": 16, "BLOCK_H": 256},
             name="_pack_embed_fwd_kernel[fp32,text-only,nocheck]")
register_aot(_pack_embed_bwd_kernel,
             {"GOUT": "*bf16", "IDS": "*i64", "SPANS": "*i64", "KEYS": "*i32", "GVIS": "*bf16",
              "T": "i64", "H": "i32", "V": "i64", "S": "i32", "N_ITER": "i32", "PAD_IDX": "i64",
              "stride_g": "i64", "stride_gv": "i64"},
             {"NF": SPAN_FIELDS, "HAS_GW": True, "HAS_GV": True, "BLOCK_T": 16, "BLOCK_H": 256})
register_aot(_embed_grad_segments_kernel,
             {"GOUT": "*bf16", "KEYS": "*i32", "PERM": "*i64", "GW": "*bf16", "T": "i64",
              "H": "i32", "V": "i64", "stride_g": "i64", "stride_gw": "i64"},
             {"RNE_BF16": False, "BLOCK_J": 16, "BLOCK_H": 256})


# ---------------------------------------------------------------------------------------------
# Host side

def _n_iter(n: int) -> int:
    """Halvings for a binary search over n >= 1 entries: ceil(log2 n)."""
    return max(n - 1, 0).bit_length()


def _check_spans(spans: torch.Tensor, name: str = "spans") -> int:
    if spans.dim() != 2 or spans.shape[1] != SPAN_FIELDS or spans.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 [S, {SPAN_FIELDS}] span table, got "
                         f"{spans.dtype} {tuple(spans.shape)}")
    if spans.shape[0] < 1:
        raise ValueError(f"{name} is empty: a packed micro-batch has at least one span "
                         "(build_span_tables pads empty micro-batches with one token)")
    return spans.shape[0]


def _embed_blocks(H: int) -> tuple[int, int]:
    """(rows, columns) per program: 4096 elements, at most 256 columns and 64 rows."""
    block_h = min(triton.next_power_of_2(max(H, 1)), 256)
    return min(4096 // block_h, 64), block_h


def packed_position_ids(spans: torch.Tensor, time_scale: torch.Tensor, cu_seqlens: torch.Tensor,
                        num_rows: int, *, block: int = 512) -> torch.Tensor:
    """[4, T] int64 position ids of a packed micro-batch: row 0 the per-sample arange (what
    transformers and flash-attn read as text positions), rows 1-3 the mrope (t, h, w) positions
    of Qwen2-VL / Qwen2.5-VL / Qwen3-VL (see staged.packing.spans). No host sync."""
    S = _check_spans(spans)
    if time_scale.shape != (S,) or time_scale.dtype != torch.float32:
        raise ValueError(f"time_scale must be float32 [{S}], got {time_scale.dtype} "
                         f"{tuple(time_scale.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be int32 [B+1] with B >= 1, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    out = torch.empty(4, num_rows, dtype=torch.int64, device=spans.device)
    if num_rows:
        grid = (triton.cdiv(num_rows, block),)
        _position_ids_kernel[grid](spans, time_scale, cu_seqlens, out, num_rows, S, _n_iter(S),
                                   NF=SPAN_FIELDS, BLOCK=block)
    return out


def packed_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, prompt_lens: torch.Tensor, *,
                  ignore_index: int = IGNORE_INDEX, block: int = 512
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted labels [T] int64 (row r predicts the next token of its own sample; the last row of
    each sample gets ignore_index) and the completion loss mask [T] bool (true where that next
    token is a completion token: at or after the sample's prompt). No host sync."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be the packed [T] ids, got shape "
                         f"{tuple(input_ids.shape)}")
    B = cu_seqlens.numel() - 1
    if cu_seqlens.dtype != torch.int32 or B < 1 or prompt_lens.shape != (B,):
        raise ValueError(f"cu_seqlens must be int32 [B+1] (B >= 1) and prompt_lens [B]; got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} and "
                         f"{tuple(prompt_lens.shape)}")
    T = input_ids.numel()
    labels = torch.empty(T, dtype=torch.int64, device=input_ids.device)
    mask = torch.empty(T, dtype=torch.bool, device=input_ids.device)
    if T:
        _labels_kernel[(triton.cdiv(T, block),)](
            input_ids, cu_seqlens, prompt_lens.to(torch.int32), labels, mask.view(torch.uint8),
            T, B, _n_iter(B), ignore_index, BLOCK=block, num_warps=_LABELS_WARPS)
    return labels, mask


class PackEmbedFunction(torch.autograd.Function):
    """out[r] = weight[ids[r]] for text rows, vision[vrow(r)] for vision rows (see pack_embed)."""

    @staticmethod
    def forward(ctx, input_ids, weight, vision, spans, image_token_id, video_token_id, padding_idx,
                check):
        T, H = input_ids.numel(), weight.shape[1]
        S = spans.shape[0]
        out = torch.empty(T, H, dtype=weight.dtype, device=weight.device)
        err = torch.zeros(2, dtype=torch.int32, device=weight.device)
        has_vis = vision is not None and vision.shape[0] > 0
        do_check = bool(check and image_token_id is not None and video_token_id is not None)
        block_t, block_h = _embed_blocks(H)
        if T:
            grid = (triton.cdiv(T, block_t),)
            vis = vision if has_vis else weight
            _pack_embed_fwd_kernel[grid](
                input_ids, weight, vis, spans, out, err, T, H, weight.shape[0], S, _n_iter(S),
                image_token_id if do_check else -1, video_token_id if do_check else -1,
                weight.stride(0), vis.stride(0), out.stride(0),
                NF=SPAN_FIELDS, HAS_VIS=has_vis, CHECK=do_check, BLOCK_T=block_t, BLOCK_H=block_h)
        if do_check:
            torch._assert_async(err[0] == 0, f"pack_embed: some rows of vision spans do not hold "
                                f"the image token {image_token_id} / video token "
                                f"{video_token_id} (T={T} rows, {S} spans): the span table does "
                                f"not match the token ids")
            torch._assert_async(err[1] == 0, f"pack_embed: a text token id is outside the "
                                f"vocabulary [0, {weight.shape[0]}) (T={T} rows)")
        ctx.save_for_backward(input_ids, spans)
        ctx.has_vis = has_vis
        ctx.vision_meta = (vision.shape, vision.dtype) if vision is not None else None
        ctx.weight_meta = (weight.shape, weight.dtype)
        ctx.padding_idx = -1 if padding_idx is None else padding_idx
        ctx.blocks = (block_t, block_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input_ids, spans = ctx.saved_tensors
        need_w, need_v = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_vis
        grad_out = grad_out.contiguous()
        T, H = grad_out.shape
        (V, _), w_dtype = ctx.weight_meta
        dev = grad_out.device
        gw = torch.zeros(V, H, dtype=w_dtype, device=dev) if need_w else None
        gv = None
        if ctx.needs_input_grad[2] and ctx.vision_meta is not None:
            shape, dtype = ctx.vision_meta
            gv = torch.empty(shape, dtype=dtype, device=dev) if need_v else \
                torch.zeros(shape, dtype=dtype, device=dev)
        if T and (need_w or need_v):
            block_t, block_h = ctx.blocks
            S = spans.shape[0]
            keys = torch.empty(T, dtype=torch.int32, device=dev) if need_w else None
            gv_arg = gv if need_v else grad_out
            _pack_embed_bwd_kernel[(triton.cdiv(T, block_t),)](
                grad_out, input_ids, spans, keys if need_w else input_ids, gv_arg, T, H, V, S,
                _n_iter(S), ctx.padding_idx, grad_out.stride(0), gv_arg.stride(0),
                NF=SPAN_FIELDS, HAS_GW=need_w, HAS_GV=need_v, BLOCK_T=block_t, BLOCK_H=block_h)
            if need_w:
                # Deterministic segmented reduction: rows grouped by token (stable: then by
                # row), each token's rows summed in that order. No host sync.
                skeys, perm = torch.sort(keys, stable=True)
                _embed_grad_segments_kernel[(T, triton.cdiv(H, block_h))](
                    grad_out, skeys, perm, gw, T, H, V, grad_out.stride(0), gw.stride(0),
                    RNE_BF16=w_dtype == torch.bfloat16 and dev.type != "cuda",
                    BLOCK_J=16, BLOCK_H=block_h)
        return None, gw, gv, None, None, None, None, None


def pack_embed(input_ids: torch.Tensor, weight: torch.Tensor, vision: torch.Tensor | None,
               spans: torch.Tensor, *, num_vision_rows: int, image_token_id: int | None = None,
               video_token_id: int | None = None, padding_idx: int | None = None,
               check: bool = True) -> torch.Tensor:
    """Packed input embeddings [T, H] in one pass: text rows read the embedding table at their
    token id, vision rows read the vision encoder's output (cast to the table's dtype) -- the
    result equals ``embedding(ids).masked_scatter(image_mask, features)`` bit for bit.

    input_ids: [T] packed ids; weight: [V, H] embedding table; vision: [Nv, H] merged vision
    features of the micro-batch's vision spans in span order (``SpanTable.vision_spans``), or
    None; spans: the span table on the same device; num_vision_rows: the table's host count
    (``SpanTable.num_vision_rows``), checked against ``vision`` on the host.
    image_token_id / video_token_id: when given (and ``check``), the kernel counts vision rows
    whose id is not the kind's token, and out-of-vocabulary text ids, and
    ``torch._assert_async`` fails on either (no host sync).
    padding_idx: like nn.Embedding's: that row of the embedding gradient stays zero.
    Backward: the embedding gradient is a deterministic sort-by-token segmented reduction in
    fp32 that writes only the rows of tokens present; the vision gradient is the rows of
    grad_out at the vision rows; no ``nonzero``, no host sync.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be the packed [T] ids, got shape "
                         f"{tuple(input_ids.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the [V, H] embedding table, got {tuple(weight.shape)}")
    _check_spans(spans)
    got = 0 if vision is None else vision.shape[0]
    if got != num_vision_rows:
        raise ValueError(f"pack_embed: the span table places {num_vision_rows} vision rows but "
                         f"the vision features have {got} rows")
    if vision is not None:
        if vision.dim() != 2 or vision.shape[1] != weight.shape[1]:
            raise ValueError(f"vision features must be [{num_vision_rows}, {weight.shape[1]}] "
                             f"(hidden size of the embedding table), got {tuple(vision.shape)}")
        if vision.dtype != weight.dtype:
            # Cast here, not in the kernel: torch rounds to nearest-even like transformers'
            # `.to(inputs_embeds.dtype)`, and autograd casts the gradient back. (Triton's
            # interpreter truncates fp32 -> bf16 even with fp_downcast_rounding="rtne".)
            vision = vision.to(weight.dtype)
        if vision.stride(1) != 1:
            vision = vision.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("weight must have a contiguous hidden dimension")
    if input_ids.stride(0) != 1:
        input_ids = input_ids.contiguous()
    return PackEmbedFunction.apply(input_ids, weight, vision, spans, image_token_id,
                                   video_token_id, padding_idx, check)
