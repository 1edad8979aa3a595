"""Plain-PyTorch references of the packing kernels (``staged.kernels.packing``).

Vectorised torch over the packed rows; they expand the span table on the host-visible side
(``repeat_interleave`` of span lengths), which the kernels avoid. Tests compare the kernels
against these bit for bit (all outputs are copies or integers), and these against
transformers (masked_scatter, get_rope_index) in tests/packing/test_packed_qwen.py.
"""
from __future__ import annotations

import torch

# Span-table columns (staged.packing.spans).
SPAN_SAMPLE, SPAN_KIND, SPAN_ROW, SPAN_LEN, SPAN_POS, SPAN_T, SPAN_H, SPAN_W, SPAN_VROW = range(9)


def row_spans(spans: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[T] int64: the span of each packed row."""
    s = torch.repeat_interleave(torch.arange(spans.shape[0], device=spans.device),
                                spans[:, SPAN_LEN], output_size=num_rows)
    return s


def position_ids_reference(spans: torch.Tensor, time_scale: torch.Tensor, cu_seqlens: torch.Tensor,
                           num_rows: int) -> torch.Tensor:
    """[4, T] int64: row 0 the per-sample arange, rows 1-3 the mrope (t, h, w) positions."""
    s = row_spans(spans, num_rows)
    rows = torch.arange(num_rows, device=spans.device)
    sp = spans[s]
    local = rows - sp[:, SPAN_ROW]
    base = sp[:, SPAN_POS]
    gw = sp[:, SPAN_W].clamp(min=1)
    hw = (sp[:, SPAN_H] * sp[:, SPAN_W]).clamp(min=1)
    it = local // hw
    ih = (local % hw) // gw
    iw = local % gw
    t_off = (it.to(torch.float32) * time_scale[s]).to(torch.int64)  # float32, like transformers
    text = sp[:, SPAN_KIND] == 0
    out = torch.empty(4, num_rows, dtype=torch.int64, device=spans.device)
    out[0] = rows - cu_seqlens.long()[sp[:, SPAN_SAMPLE]]
    out[1] = torch.where(text, base + local, base + t_off)
    out[2] = torch.where(text, base + local, base + ih)
    out[3] = torch.where(text, base + local, base + iw)
    return out


def pack_embed_reference(input_ids: torch.Tensor, weight: torch.Tensor, vision: torch.Tensor | None,
                         spans: torch.Tensor) -> torch.Tensor:
    """[T, H] in weight's dtype: text rows = weight[token], vision rows = vision[row] (cast)."""
    T = input_ids.numel()
    s = row_spans(spans, T)
    sp = spans[s]
    is_vis = sp[:, SPAN_KIND] != 0
    text_ids = torch.where(is_vis, torch.zeros_like(input_ids), input_ids)
    out = torch.nn.functional.embedding(text_ids, weight)
    if vision is not None and vision.shape[0]:
        vidx = sp[:, SPAN_VROW] + torch.arange(T, device=spans.device) - sp[:, SPAN_ROW]
        out = torch.where(is_vis[:, None], vision.to(weight.dtype)[vidx.clamp(min=0)], out)
    return out


def labels_reference(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, prompt_lens: torch.Tensor,
                     ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [T] int64 (the next token of the same sample, else ignore_index) and the completion
    loss mask [T] bool (the next token exists and lies at or after the sample's prompt)."""
    T = input_ids.numel()
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    sample = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens,
                                     output_size=T)
    nxt = torch.arange(T, device=cu.device) + 1
    valid = nxt < cu[1:][sample]
    tok = input_ids.long()[nxt.clamp(max=T - 1)]
    labels = torch.where(valid, tok, torch.full_like(tok, ignore_index))
    mask = valid & (nxt - cu[:-1][sample] >= prompt_lens.long()[sample])
    return labels, mask
