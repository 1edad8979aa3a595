"""Span tables: C++ == Python to the byte (and identical ValueError messages), invariants, the
mrope rules against a per-token oracle, padding, and the collate's host-side checks.

The C++ builder (staged._C.build_span_tables) and its pure-Python twin must agree on every
input. Agreement tests skip with a reason where the extension is not built.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from staged.kernels.reference.packing import position_ids_reference, labels_reference
from staged.packing import spans as spans_module
from staged.packing.collate import PackingConfig, PackSample, collate_packed, find_vision_spans
from staged.packing.spans import (HAS_EXT, KIND_IMAGE, KIND_TEXT, KIND_VIDEO, SPAN_KIND, SPAN_LEN,
                                  SPAN_POS, SPAN_ROW, SPAN_VROW, build_python, build_span_tables,
                                  f32, scaled_time)

needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason=f"C++ span builder unavailable: {spans_module._EXT_MISSING_REASON}")


def build_cpp(*args):
    from staged import _C

    return _C.build_span_tables(*args)


# ---------------------------------------------------------------------------------------------
# Random inputs (the raw positional arguments of both builders)

SECONDS = [0.0, 0.5, 1.0, 1.5, 2.0, 1 / 3, 0.7, 2.5]


@st.composite
def builder_inputs(draw, max_n=8, max_len=40):
    m = draw(st.sampled_from([1, 2]))
    rope = draw(st.integers(0, 2))
    n = draw(st.integers(0, max_n))
    seq_lens, prompt_lens, ptr = [], [], [0]
    offsets, kinds, grids, seconds = [], [], [], []
    for _ in range(n):
        L = draw(st.integers(0, max_len))
        seq_lens.append(L)
        prompt_lens.append(draw(st.integers(0, L)))
        at = 0
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from([KIND_IMAGE, KIND_VIDEO]))
            single = (kind == KIND_IMAGE and draw(st.booleans())) or \
                (rope == 2 and kind == KIND_VIDEO)
            t = 1 if single else draw(st.integers(1, 3))
            h, w = m * draw(st.integers(1, 3)), m * draw(st.integers(1, 3))
            need = t * (h // m) * (w // m)
            gap = draw(st.integers(0, 4))
            if at + gap + need > L:
                break
            offsets.append(at + gap)
            kinds.append(kind)
            grids.extend((t, h, w))
            seconds.append(draw(st.sampled_from(SECONDS)))
            at += gap + need
        ptr.append(len(offsets))
    # micro-batches: a shuffled subset of the samples cut into groups, plus some empty ones
    order = draw(st.permutations(range(n)))
    order = order[:draw(st.integers(0, n))]
    cuts = sorted(draw(st.lists(st.integers(0, len(order)), max_size=3)))
    mbs, prev = [], 0
    for c in cuts + [len(order)]:
        mbs.append(list(order[prev:c]))
        prev = c
    if draw(st.booleans()):
        mbs.append([])
    with_seconds = draw(st.booleans())
    tps = draw(st.sampled_from([2.0, 1.0, 25.0, 0.5, 4.0]))
    return [mbs, seq_lens, prompt_lens, ptr, offsets, kinds, grids,
            seconds if with_seconds else None, m, tps, rope, draw(st.integers(0, 1)),
            draw(st.integers(1, 5))]


def corrupt(draw, args):
    """One field of a valid input made (probably) invalid."""
    args = [list(a) if isinstance(a, list) else a for a in args]
    args[0] = [list(mb) for mb in args[0]]
    field = draw(st.integers(0, 14))
    n, V = len(args[1]), len(args[4])
    bad_int = draw(st.sampled_from([-1, -5, 0, 1, 2, 3, 7, 2**31, 2**31 - 1, 2**63, -2**63 - 1]))
    if field == 0 and n:
        args[1][draw(st.integers(0, n - 1))] = bad_int
    elif field == 1 and n:
        args[2][draw(st.integers(0, n - 1))] = bad_int
    elif field == 2:
        args[3][draw(st.integers(0, n))] = bad_int
    elif field == 3 and V:
        args[4][draw(st.integers(0, V - 1))] = bad_int
    elif field == 4 and V:
        args[5][draw(st.integers(0, V - 1))] = bad_int
    elif field == 5 and V:
        args[6][draw(st.integers(0, 3 * V - 1))] = bad_int
    elif field == 6 and V and args[7] is not None:
        args[7][draw(st.integers(0, V - 1))] = draw(st.sampled_from(
            [-1.0, math.nan, math.inf, 1e7, 1e6, 3e5, 0.0]))
    elif field == 7:
        args[8] = bad_int
    elif field == 8:
        args[9] = draw(st.sampled_from([-1.0, math.nan, math.inf, 1e6, 1.5e6, 1e300]))
    elif field == 9:
        args[10] = bad_int
    elif field == 10:
        args[11] = bad_int
    elif field == 11:
        args[12] = bad_int
    elif field == 12 and args[0]:
        args[0][draw(st.integers(0, len(args[0]) - 1))].append(bad_int)
    elif field == 13:
        args[draw(st.sampled_from([2, 5, 6]))].append(0)  # a length mismatch
    elif field == 14 and n:  # duplicate sample
        args[0].append([draw(st.integers(0, n - 1))] * 2)
    return args


@st.composite
def maybe_invalid_inputs(draw):
    return corrupt(draw, draw(builder_inputs()))


def run(fn, args):
    try:
        return "ok", fn(*args)
    except ValueError as exc:
        return "ValueError", str(exc)


# ---------------------------------------------------------------------------------------------
# C++ == Python


@needs_ext
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(builder_inputs())
def test_cpp_equals_python(args):
    assert build_cpp(*args) == build_python(*args)


@needs_ext
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maybe_invalid_inputs())
def test_cpp_equals_python_on_invalid_inputs(args):
    assert run(build_cpp, args) == run(build_python, args)


@needs_ext
def test_cpp_equals_python_large():
    rng = np.random.default_rng(0)
    n = 2000
    lens = rng.integers(100, 3000, n)
    ptr, offs, kinds, grids, secs = [0], [], [], [], []
    for L in lens:
        k = int(rng.integers(0, 3))
        for j in range(k):
            offs.append(10 + 40 * j)
            kinds.append(KIND_IMAGE if j % 2 == 0 else KIND_VIDEO)
            grids.extend((1 + j, 4, 6))
            secs.append(float(rng.choice(SECONDS)))
        ptr.append(len(offs))
    mbs = [list(range(i, min(i + 37, n))) for i in range(0, n, 37)]
    args = [mbs, lens.tolist(), (lens // 3).tolist(), ptr, offs, kinds, grids, secs,
            2, 2.0, 1, 0, 8]
    assert build_cpp(*args) == build_python(*args)


# ---------------------------------------------------------------------------------------------
# Invariants and the position rules against a per-token oracle


def oracle_positions(L, spans, advance):
    """Per-token mrope positions of one sample, straight from transformers 5.x's get_rope_index
    (advance=0) or the 4.x / vLLM rule (advance=1). spans: (offset, t, h', w', scale)."""
    rows = [[], [], []]
    pos, top, at = 0, -1, 0
    for off, t, h, w, scale in spans:
        for _ in range(off - at):
            for r in rows:
                r.append(pos)
            top = max(top, pos)
            pos += 1
        for it in range(t):
            for ih in range(h):
                for iw in range(w):
                    rows[0].append(pos + scaled_time(it, scale))
                    rows[1].append(pos + ih)
                    rows[2].append(pos + iw)
        top = max([top] + [x for r in rows for x in r[-t * h * w:]])
        pos = pos + max(h, w) if advance == 0 else top + 1
        at = off + t * h * w
    for _ in range(L - at):
        for r in rows:
            r.append(pos)
        top = max(top, pos)
        pos += 1
    return rows, (top + 1 - L if L else 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(builder_inputs())
def test_tables_match_the_oracle(args):
    mbs, lens, prompts, ptr, offs, kinds, grids, secs, m, tps, rope, advance, pad = args
    tables = [spans_module.wrap(r) for r in build_python(*args)]
    for mb, t in zip(mbs, tables):
        sp = t.spans
        # spans tile the rows in order, cu_seqlens bound the samples
        assert sp[0, SPAN_ROW] == 0 and (sp[:, SPAN_LEN] > 0).all()
        assert torch.equal(sp[1:, SPAN_ROW], (sp[:, SPAN_ROW] + sp[:, SPAN_LEN])[:-1])
        assert int(sp[-1, SPAN_ROW] + sp[-1, SPAN_LEN]) == t.num_rows == int(t.cu_seqlens[-1])
        assert t.num_rows % pad == 0 and t.num_rows >= 1
        real = sum(lens[i] for i in mb)
        assert t.sample_index.tolist()[:len(mb)] == mb
        assert t.num_samples == len(mb) + (t.num_rows > real)
        assert t.max_seqlen == max(t.seqlens())
        # vision rows are consecutive, in span order
        vis = sp[sp[:, SPAN_KIND] != KIND_TEXT]
        if vis.shape[0]:
            assert vis[0, SPAN_VROW] == 0
            assert torch.equal(vis[1:, SPAN_VROW], (vis[:, SPAN_VROW] + vis[:, SPAN_LEN])[:-1])
        assert t.num_vision_rows == int(vis[:, SPAN_LEN].sum())
        # positions: reference expansion of the table == per-token oracle
        pos = position_ids_reference(t.spans, t.time_scale, t.cu_seqlens, t.num_rows)
        cu = t.cu_seqlens.tolist()
        for slot, i in enumerate(t.sample_index.tolist()):
            a, b = cu[slot], cu[slot + 1]
            assert pos[0, a:b].tolist() == list(range(b - a))
            if i < 0:
                assert pos[1:, a:b].tolist() == [list(range(b - a))] * 3
                assert t.rope_deltas[slot] == 0 and t.prompt_lens[slot] == b - a
                continue
            sample_spans = []
            for j in range(ptr[i], ptr[i + 1]):
                t_, h, w = grids[3 * j: 3 * j + 3]
                scale = 1.0
                if rope == 1 and kinds[j] == KIND_VIDEO:
                    scale = f32(f32(tps) * f32(secs[j] if secs is not None else 1.0))
                sample_spans.append((offs[j], t_, h // m, w // m, scale))
            want, delta = oracle_positions(lens[i], sample_spans, advance)
            assert pos[1:, a:b].tolist() == want
            assert t.rope_deltas[slot] == delta
            assert t.prompt_lens[slot] == prompts[i]


def test_time_scale_is_float32():
    # 25 tokens/s at 0.53 s per grid: float32(25 * float32(0.53)) * 4 = 52.999996 -> 52, where
    # float64 gives 53.0 -> 53. transformers computes in float32 (second_per_grid_ts is a float32
    # tensor), so must we.
    [t] = build_span_tables([[0]], [12], [0], vision_ptr=[0, 1], vision_offsets=[0],
                            vision_kinds=[KIND_VIDEO], vision_grids=[[5, 2, 2]],
                            vision_seconds=[0.53], tokens_per_second=25.0, spatial_merge_size=2)
    pos = position_ids_reference(t.spans, t.time_scale, t.cu_seqlens, t.num_rows)
    s32 = torch.tensor(0.53, dtype=torch.float32) * 25  # what transformers does
    want_t = (torch.arange(5) * s32).long().tolist()
    assert pos[1, :5].tolist() == want_t == [0, 13, 26, 39, 52]
    assert int(4 * 25 * 0.53) == 53  # float64 would differ


def test_empty_and_padded_micro_batches():
    tables = build_span_tables([[], [0], [1]], [5, 3], [2, 1], pad_multiple=4)
    assert [t.num_rows for t in tables] == [4, 8, 4]
    empty = tables[0]
    assert empty.sample_index.tolist() == [-1] and empty.prompt_lens.tolist() == [4]
    labels, mask = labels_reference(torch.zeros(4, dtype=torch.long), empty.cu_seqlens,
                                    empty.prompt_lens)
    assert not mask.any()
    one = build_span_tables([[]], [], [])[0]
    assert one.num_rows == 1 and one.cu_seqlens.tolist() == [0, 1]


def test_backend_fallback_identical():
    args = dict(vision_ptr=[0, 1, 1], vision_offsets=[2], vision_kinds=[KIND_IMAGE],
                vision_grids=[[1, 4, 4]])
    py = build_span_tables([[1, 0]], [10, 5], [7, 5], backend="python", **args)
    auto = build_span_tables([[1, 0]], [10, 5], [7, 5], **args)
    for a, b in zip(py, auto):
        for f in ("spans", "time_scale", "cu_seqlens", "sample_index", "prompt_lens",
                  "rope_deltas", "vision_spans"):
            assert torch.equal(getattr(a, f), getattr(b, f))


def test_no_ext_env_selects_python():
    code = ("from staged.packing import spans; import sys; "
            "sys.exit(0 if spans.backend_name() == 'python' and not spans.HAS_EXT else 1)")
    env = dict(os.environ, STAGED_NO_EXT="1")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_ext)])
@pytest.mark.parametrize("kwargs,message", [
    (dict(seq_lens=[10], prompt_lens=[11]), "prompt_lens[0] is 11 but sample 0 has 10 tokens"),
    (dict(vision_grids=[[1, 4, 5]]), "has grid (1, 4, 5): sizes must be in [1, 2147483647] and "
                                     "h, w divisible by spatial_merge_size=2"),
    (dict(vision_offsets=[8]), "vision span 0 (sample 0) at offset 8 with grid (1, 4, 4) does "
                               "not fit in the sample's 10 tokens"),
    (dict(micro_batches=[[0], [0]]), "sample 0 appears twice (again in micro_batches[1])"),
    (dict(micro_batches=[[3]]), "micro_batches[0] holds sample 3, but there are only 1 samples"),
])
def test_error_messages(backend, kwargs, message):
    args = dict(micro_batches=[[0]], seq_lens=[10], prompt_lens=[5], vision_ptr=[0, 1],
                vision_offsets=[2], vision_kinds=[KIND_IMAGE], vision_grids=[[1, 4, 4]])
    args.update(kwargs)
    with pytest.raises(ValueError) as exc:
        build_span_tables(args.pop("micro_batches"), args.pop("seq_lens"), args.pop("prompt_lens"),
                          backend=backend, **args)
    assert message in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Collate: host checks with the numbers

CFG = PackingConfig(image_token_id=90, video_token_id=91, pad_token_id=0)


def test_find_vision_spans_and_mismatches():
    ids = [5, 90, 90, 90, 90, 6, 7, 90, 90, 8]
    assert find_vision_spans(ids, [(KIND_IMAGE, 1, 4, 4), (KIND_IMAGE, 1, 2, 4)], CFG) == [1, 7]
    with pytest.raises(ValueError, match=r"sample 0: the image placeholder run at token 7 has 2 "
                                         r"tokens but span 1's grid \(1, 4, 4\) needs 4"):
        find_vision_spans(ids, [(KIND_IMAGE, 1, 4, 4), (KIND_IMAGE, 1, 4, 4)], CFG)
    with pytest.raises(ValueError, match=r"but no image grid is left for them \(1 image grids"):
        find_vision_spans(ids, [(KIND_IMAGE, 1, 4, 4)], CFG)
    with pytest.raises(ValueError, match=r"1 image grid\(s\) have no placeholder tokens"):
        find_vision_spans(ids, [(KIND_IMAGE, 1, 4, 4), (KIND_IMAGE, 1, 2, 4),
                                (KIND_IMAGE, 1, 2, 2)], CFG)


def test_collate_orders_vision_and_checks_pixel_rows():
    img = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
    vid = 1000 + torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)
    # video first, then image, inside one sample; a text-only sample; a padding micro-batch
    s0 = PackSample(input_ids=[1, 91, 91, 91, 91, 2, 90, 90, 90, 90, 3, 4], prompt_len=11,
                    image_grid_thw=[[1, 4, 4]], pixel_values=img, video_grid_thw=[[2, 2, 4]],
                    pixel_values_videos=vid, second_per_grid_ts=[0.5])
    s1 = PackSample(input_ids=np.array([7, 8, 9]), prompt_len=1)
    mbs = collate_packed([s0, s1], [[1, 0], []], CFG)
    mb = mbs[0]
    assert mb.input_ids.tolist() == [7, 8, 9] + s0.input_ids
    assert mb.vision_grid_thw.tolist() == [[2, 2, 4], [1, 4, 4]]
    assert torch.equal(mb.pixel_values, torch.cat([vid, img]))
    assert mb.seqlens == [3, 12] and mbs[1].input_ids.tolist() == [0]
    labels, mask = labels_reference(mb.input_ids, mb.cu_seqlens, mb.table.prompt_lens)
    assert labels.tolist()[:3] == [8, 9, -100] and mask.tolist()[:3] == [True, True, False]
    assert mask.tolist()[3:] == [False] * 10 + [True, False]
    bad = PackSample(input_ids=s0.input_ids, prompt_len=3, image_grid_thw=[[1, 4, 4]],
                     pixel_values=img[:12], video_grid_thw=[[2, 2, 4]], pixel_values_videos=vid)
    with pytest.raises(ValueError, match="sample 0: its grids hold 16 patches but pixel_values "
                                         "has 12 rows"):
        collate_packed([bad], [[0]], CFG)


def test_collate_qwen3_splits_video_frames():
    cfg = PackingConfig(image_token_id=90, video_token_id=91, rope="qwen3_vl")
    # <t1> frame (2 tokens) <t2> frame (2 tokens)
    ids = [50, 91, 91, 51, 91, 91, 3]
    vid = torch.randn(2 * 2 * 4, 3)
    [mb] = collate_packed([PackSample(input_ids=ids, prompt_len=7, video_grid_thw=[[2, 2, 4]],
                                      pixel_values_videos=vid)], [[0]], cfg)
    kinds = mb.table.spans[:, SPAN_KIND].tolist()
    assert kinds == [KIND_TEXT, KIND_VIDEO, KIND_TEXT, KIND_VIDEO, KIND_TEXT]
    assert mb.vision_grid_thw.tolist() == [[1, 2, 4], [1, 2, 4]]
    assert torch.equal(mb.pixel_values, vid)
    assert mb.table.spans[:, SPAN_POS].tolist() == [0, 1, 3, 4, 6]
