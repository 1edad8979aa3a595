"""Packing kernels (staged.kernels.packing) against their plain-torch references, bit for bit:
pack_embed forward/backward, 4-row position ids, shifted labels and the completion loss mask,
and the host / device count checks. Shapes are tiny: the kernels run interpreted on CPU.
"""
import pytest
import torch

from staged.kernels.packing import pack_embed, packed_labels, packed_position_ids
from staged.kernels.reference.packing import (labels_reference, pack_embed_reference,
                                              position_ids_reference)
from staged.packing.spans import KIND_IMAGE, KIND_VIDEO, build_span_tables

IMG, VID = 7, 8


def make_batch(seed: int, rope: str = "qwen2_5_vl", pad_multiple: int = 1, n: int = 4):
    """A packed micro-batch (host) with mixed text-only / image / video samples, and its ids
    (vision rows hold the placeholder ids, text rows random ids in [10, 40))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda a, b: int(torch.randint(a, b, (1,), generator=g))  # noqa: E731
    lens, prompts, ptr, offs, kinds, grids, secs = [], [], [0], [], [], [], []
    for i in range(n):
        at = r(0, 3)
        for _ in range(r(0, 3)):
            kind = KIND_IMAGE if r(0, 2) or rope == "qwen3_vl" else KIND_VIDEO
            t = 1 if kind == KIND_IMAGE else r(1, 4)
            h, w = 2 * r(1, 3), 2 * r(1, 4)
            offs.append(at)
            kinds.append(kind)
            grids.append((t, h, w))
            secs.append([0.5, 1.0, 0.53, 2.0][r(0, 4)])
            at += t * h * w // 4 + r(0, 3)
        L = at + r(1, 6)
        lens.append(L)
        prompts.append(r(0, L))
        ptr.append(len(offs))
    [t] = build_span_tables([list(range(n))], lens, prompts, vision_ptr=ptr, vision_offsets=offs,
                            vision_kinds=kinds, vision_grids=grids, vision_seconds=secs,
                            tokens_per_second=25.0, rope=rope, pad_multiple=pad_multiple)
    ids = torch.randint(10, 40, (t.num_rows,), generator=g)
    for row, length, kind in t.spans[:, [2, 3, 1]].tolist():
        if kind:
            ids[row:row + length] = IMG if kind == KIND_IMAGE else VID
    return t, ids


@pytest.mark.parametrize("seed,rope,pad", [(0, "qwen2_5_vl", 1), (1, "qwen2_vl", 8),
                                           (2, "qwen3_vl", 3), (3, "qwen2_5_vl", 5)])
def test_position_ids_and_labels(device, seed, rope, pad):
    t, ids = make_batch(seed, rope, pad)
    td = t.to(device)
    pos = packed_position_ids(td.spans, td.time_scale, td.cu_seqlens, td.num_rows)
    want = position_ids_reference(t.spans, t.time_scale, t.cu_seqlens, t.num_rows)
    assert pos.dtype == torch.int64 and torch.equal(pos.cpu(), want)
    labels, mask = packed_labels(ids.to(device), td.cu_seqlens, td.prompt_lens)
    want_l, want_m = labels_reference(ids, t.cu_seqlens, t.prompt_lens)
    assert torch.equal(labels.cpu(), want_l) and torch.equal(mask.cpu(), want_m)
    # every sample's last row is ignored, the rest predict their next token
    last = (t.cu_seqlens[1:] - 1).long()
    assert (want_l[last] == -100).all()


def test_labels_int32_ids_and_ignore_index(device):
    t, ids = make_batch(4)
    td = t.to(device)
    labels, mask = packed_labels(ids.to(device, torch.int32), td.cu_seqlens, td.prompt_lens,
                                 ignore_index=-1)
    want_l, want_m = labels_reference(ids, t.cu_seqlens, t.prompt_lens, ignore_index=-1)
    assert torch.equal(labels.cpu(), want_l) and torch.equal(mask.cpu(), want_m)


@pytest.mark.parametrize("H,dtype,vdtype", [(24, torch.float32, torch.float32),
                                            (41, torch.bfloat16, torch.float32),
                                            (300, torch.float16, torch.float16)])
def test_pack_embed_forward_backward(device, H, dtype, vdtype):
    t, ids = make_batch(5, pad_multiple=4)
    V = 40
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(V, H, generator=g).to(dtype)
    vision = torch.randn(t.num_vision_rows, H, generator=g).to(vdtype)
    pad_idx = int(ids[0])  # a token that occurs: its gradient row must stay zero
    w = weight.to(device).requires_grad_()
    v = vision.to(device).requires_grad_()
    td = t.to(device)
    out = pack_embed(ids.to(device), w, v, td.spans, num_vision_rows=t.num_vision_rows,
                     image_token_id=IMG, video_token_id=VID, padding_idx=pad_idx)
    want = pack_embed_reference(ids, weight, vision, t.spans)
    assert out.dtype == dtype and torch.equal(out.cpu(), want)  # copies: bit-exact
    grad = torch.randn(t.num_rows, H, generator=g).to(dtype)
    gw, gv = torch.autograd.grad(out, (w, v), grad.to(device))
    # fp64 reference: the embedding gradient sums in fp32 on the device, then rounds once
    w64 = weight.double().requires_grad_()
    v64 = vision.double().requires_grad_()
    ref = pack_embed_reference(ids, w64, v64, t.spans)
    gw64, gv64 = torch.autograd.grad(ref, (w64, v64), grad.double())
    gw64[pad_idx] = 0
    assert gw.dtype == dtype and gv.dtype == vdtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(gw.cpu().double(), gw64, atol=tol, rtol=tol)
    assert (gw[pad_idx] == 0).all()
    assert torch.equal(gv.cpu(), gv64.to(vdtype))  # a gather of grad rows: exact


def test_pack_embed_text_only_and_frozen(device):
    t = build_span_tables([[0, 1]], [5, 3], [2, 1])[0]
    ids = torch.tensor([11, 12, 13, 11, 12, 1, 2, 3])
    weight = torch.randn(20, 16)
    td = t.to(device)
    out = pack_embed(ids.to(device), weight.to(device), None, td.spans, num_vision_rows=0)
    assert torch.equal(out.cpu(), weight[ids])
    w = weight.to(device).requires_grad_()
    v = torch.randn(0, 16, device=device, requires_grad=True)
    out = pack_embed(ids.to(device), w, v, td.spans, num_vision_rows=0)
    gw, gv = torch.autograd.grad(out.sum(), (w, v))
    assert torch.equal(gw.cpu(), torch.zeros(20, 16).index_add_(0, ids, torch.ones(8, 16)))
    assert gv.shape == (0, 16)


def test_host_count_mismatch_names_the_numbers(device):
    t, ids = make_batch(7)
    td = t.to(device)
    vision = torch.randn(t.num_vision_rows + 2, 8, device=device)
    with pytest.raises(ValueError, match=f"places {t.num_vision_rows} vision rows but the vision "
                                         f"features have {t.num_vision_rows + 2} rows"):
        pack_embed(ids.to(device), torch.randn(40, 8, device=device), vision, td.spans,
                   num_vision_rows=t.num_vision_rows)


def test_device_checks_vision_tokens_and_vocab(device):
    t, ids = make_batch(8)
    assert t.num_vision_rows > 0
    td = t.to(device)
    weight = torch.randn(40, 8, device=device)
    vision = torch.randn(t.num_vision_rows, 8, device=device)
    bad = ids.clone()
    vrow = int(t.spans[t.spans[:, 1] != 0][0, 2])
    bad[vrow] = 12  # a vision row whose token is not the placeholder: the table is wrong
    with pytest.raises(RuntimeError, match="do not hold the image token 7"):
        pack_embed(bad.to(device), weight, vision, td.spans, num_vision_rows=t.num_vision_rows,
                   image_token_id=IMG, video_token_id=VID)
        if device == "cuda":
            torch.cuda.synchronize()
    bad = ids.clone()
    bad[int(t.spans[t.spans[:, 1] == 0][0, 2])] = 40  # first row of the first text span
    with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 40\)"):
        pack_embed(bad.to(device), weight, vision, td.spans, num_vision_rows=t.num_vision_rows,
                   image_token_id=IMG, video_token_id=VID)
        if device == "cuda":
            torch.cuda.synchronize()


def test_masked_scatter_equivalence(device):
    """pack_embed == transformers' way: embedding(ids).masked_scatter(mask, features)."""
    t, ids = make_batch(9)
    weight = torch.randn(40, 32)
    vision = torch.randn(t.num_vision_rows, 32)
    mask = ((ids == IMG) | (ids == VID))[:, None].expand(-1, 32)
    want = torch.nn.functional.embedding(ids, weight).masked_scatter(mask, vision)
    td = t.to(device)
    out = pack_embed(ids.to(device), weight.to(device), vision.to(device), td.spans,
                     num_vision_rows=t.num_vision_rows)
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("H,dtype", [(300, torch.bfloat16), (24, torch.float32)])
def test_embedding_grad_segments_long_runs_and_determinism(device, H, dtype):
    """A token repeated over many rows (runs longer than the kernel's 16-row step, in two
    places), tokens absent from the batch (their rows stay exactly zero), the padding token:
    the segmented reduction == fp64 index_add rounded once, identical on a second run."""
    t = build_span_tables([[0, 1]], [60, 27], [5, 3])[0]
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 9, (87,), generator=g)
    ids[4:45] = 11
    ids[70:80] = 11
    ids[50] = 2                                              # padding: no gradient
    V = 15
    weight = torch.randn(V, H, generator=g).to(dtype)
    grad = torch.randn(87, H, generator=g).to(dtype)
    td = t.to(device)
    runs = []
    for _ in range(2):
        w = weight.to(device).requires_grad_()
        out = pack_embed(ids.to(device), w, None, td.spans, num_vision_rows=0, padding_idx=2)
        (gw,) = torch.autograd.grad(out, (w,), grad.to(device))
        runs.append(gw.cpu())
    assert torch.equal(runs[0], runs[1])
    keep = ids != 2
    want = torch.zeros(V, H, dtype=torch.float64).index_add_(0, ids[keep], grad[keep].double())
    assert runs[0].dtype == dtype
    torch.testing.assert_close(runs[0].double(), want.to(dtype).double(), atol=1e-5, rtol=1e-5)
    absent = torch.ones(V, dtype=torch.bool)
    absent[ids[keep]] = False
    assert absent.sum() > 3 and (runs[0][absent] == 0).all()
