"""Packed (varlen) attention, and the hook that runs transformers' Qwen2-VL / Qwen2.5-VL /
Qwen3-VL on a packed micro-batch.

``varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal)`` attends within each sequence of
a packed [T, heads, head_dim] batch. Backends, the first available wins (``backend="auto"``):

  flash_attn  flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16): cu_seqlens and the
              host int max_seqlen go straight to the kernel; no host sync.
  xformers    ``memory_efficient_attention`` with a block-diagonal (causal) bias built from the
              host sequence lengths (CUDA).
  torch_varlen  torch's own ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, the
              flash-attention kernels built into torch >= 2.10): cu_seqlens and max_seqlen go
              straight to the kernel, like flash-attn's. Its keywords moved between releases
              (2.10: ``is_causal``; 2.11: ``window_size=(-1, 0)`` for causal, ``scale``; 2.12+:
              also ``enable_gqa``), so the call is built from the installed signature; without
              ``enable_gqa`` the kv heads are expanded (what repeat_kv does).
  flex        FlexAttention with a document mask (torch >= 2.5): a block mask built once per
              micro-batch from cu_seqlens on the device (doc id of each row by searchsorted, no
              sync), cached with the host lengths; compiled on CUDA (dynamic shapes: packed T
              varies), eager elsewhere (tests). For a torch without varlen_attn.
  sdpa        an exact loop of ``scaled_dot_product_attention`` over the sequences (CPU, or
              a last resort on CUDA): no [T, T] mask, O(sum L^2) work, one call per sequence.

A GPU without flash-attn and xformers (the lent machines: torch 2.11) therefore runs torch's
varlen kernel, not the Python loop. Dropout (never used by the shipped recipes: Qwen-VL's
attention_dropout is 0) is only implemented by flash_attn, xformers and sdpa; ``auto`` picks
sdpa for dropout_p > 0 when neither package is installed.

The xformers bias and the sdpa loop need the sequence lengths on the host. The collate knows
them (``PackedMicroBatch.seqlens``); ``register_seqlens`` attaches them to the cu_seqlens tensor
so that no layer reads cu_seqlens back from the device. Only a cu_seqlens that was never
registered is read back (one named host sync, then cached for the other layers).

Hook into transformers (public API, same on 5.17 and 5.24): an attention function registered
as ``AttentionInterface.register("staged_varlen", ...)`` and selected for the text model only
with ``model.set_attn_implementation({"text_config": "staged_varlen"})`` (the vision tower
keeps its own). The packed forward (``packed_forward``) calls the text model with
``inputs_embeds`` [1, T, H] from ``pack_embed``, 4-row ``position_ids`` [4, 1, T] (row 0 =
per-sample arange, which the model strips off), the FlashAttentionKwargs ``cu_seq_lens_q/k``
and ``max_length_q/k``, and ``attention_mask={"full_attention": None, ...}``: a prepared mask
mapping, so transformers builds no mask and never scans position ids for packed sequences
(which would sync). Qwen3-VL's text model builds its mask unconditionally: it gets a 4-D
placeholder instead, which ``create_causal_mask`` returns untouched, and its deepstack features
through its own ``visual_pos_masks`` / ``deepstack_visual_embeds`` arguments
(``packed_text_forward``). Calls without ``cu_seq_lens_q`` (rollout generation, padded batches) are
handed to transformers' own sdpa function, with sdpa's mask (registered for the same name), so
the model stays usable unpacked.
"""
from __future__ import annotations

import importlib.util
import inspect
import warnings
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

ATTN_NAME = "staged_varlen"

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def _torch_varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flex_fn():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


HAS_TORCH_VARLEN = _torch_varlen_fn() is not None
HAS_FLEX = _flex_fn() is not None
BACKENDS = ("flash_attn", "xformers", "torch_varlen", "flex", "sdpa")
# Tests (and users who want to compare) can pin the backend the transformers hook uses.
hook_backend = "auto"

# ---------------------------------------------------------------------------------------------
# Host sequence lengths, attached to a cu_seqlens tensor

_HOST: dict[int, tuple[weakref.ref, list[int], dict]] = {}
registry_misses = 0  # cu_seqlens seen without registered host lengths (tests: stays 0)
host_readbacks = 0  # ... of which on a device: each one a host sync


def register_seqlens(cu_seqlens: torch.Tensor, seqlens: Sequence[int]) -> None:
    """Tell the attention backends the host lengths of ``cu_seqlens`` (kept while it lives)."""
    key = id(cu_seqlens)

    def _drop(_ref, key=key):
        _HOST.pop(key, None)

    _HOST[key] = (weakref.ref(cu_seqlens, _drop), [int(x) for x in seqlens], {})


def _entry(cu_seqlens: torch.Tensor) -> tuple[weakref.ref, list[int], dict]:
    global host_readbacks, registry_misses
    entry = _HOST.get(id(cu_seqlens))
    if entry is not None and entry[0]() is cu_seqlens:
        return entry
    registry_misses += 1
    if cu_seqlens.device.type != "cpu":
        host_readbacks += 1  # HOST SYNC: cu_seqlens was not registered; read once, then cached
    cu = cu_seqlens.tolist()
    register_seqlens(cu_seqlens, [b - a for a, b in zip(cu, cu[1:])])
    return _HOST[id(cu_seqlens)]


def host_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    """The host lengths of a cu_seqlens tensor (registered, or read back once)."""
    return _entry(cu_seqlens)[1]


# ---------------------------------------------------------------------------------------------
# varlen attention


def attention_backend(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                      dropout_p: float = 0.0) -> str:
    """The backend ``backend="auto"`` picks for tensors on ``device`` with ``dtype``."""
    if torch.device(device).type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        if HAS_FLASH_ATTN and half:
            return "flash_attn"
        if HAS_XFORMERS:
            return "xformers"
        if dropout_p == 0.0:
            if HAS_TORCH_VARLEN and half:
                return "torch_varlen"
            if HAS_FLEX:
                return "flex"
    return "sdpa"


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    """torch.nn.attention.varlen.varlen_attn, called with the keywords this torch has."""
    fn = _torch_varlen_fn()
    params = inspect.signature(fn).parameters
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    kw = {}
    if "window_size" in params:            # torch >= 2.11
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:            # torch 2.10
        kw["is_causal"] = causal
    else:
        raise RuntimeError(f"torch {torch.__version__}: varlen_attn has neither window_size nor "
                           f"is_causal ({list(params)})")
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        elif abs(scale - D ** -0.5) > 1e-12 * D ** -0.5:
            q = q * (scale * D ** 0.5)      # its fixed scale is D ** -0.5
    if Hq != Hkv:
        if "enable_gqa" in params:         # torch >= 2.12
            kw["enable_gqa"] = True
        else:
            rep = Hq // Hkv
            k = k[:, :, None].expand(T, Hkv, rep, D).reshape(T, Hq, D)
            v = v[:, :, None].expand(T, Hkv, rep, D).reshape(T, Hq, D)
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    return fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen,
              **kw)


_FLEX_COMPILED = None


def _flex(q, k, v, cu_seqlens, causal, scale, cache):
    """FlexAttention over [1, heads, T, D] with a document (and causal) block mask."""
    flex_attention, create_block_mask = _flex_fn()
    global _FLEX_COMPILED
    T, Hq, _ = q.shape
    key = ("flex_mask", causal, T)
    block_mask = cache.get(key)
    if block_mask is None:
        rows = torch.arange(T, device=q.device, dtype=cu_seqlens.dtype)
        doc = torch.searchsorted(cu_seqlens[1:], rows, right=True)   # device-side, no sync

        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return same & (q_idx >= kv_idx) if causal else same

        block_mask = cache[key] = create_block_mask(mask_mod, None, None, T, T,
                                                    device=q.device)
    fn = flex_attention
    if q.device.type == "cuda":
        if _FLEX_COMPILED is None:
            # Uncompiled flex_attention materialises [T, T] scores; compiled it is a fused
            # kernel. dynamic: every packed micro-batch has its own T.
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=True)
        fn = _FLEX_COMPILED
    with warnings.catch_warnings():
        # Off CUDA the unfused path is the point (tests, exactness); don't warn about it.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=block_mask, scale=scale, enable_gqa=Hq != k.shape[1])
    return out[0].transpose(0, 1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool = True, *, scale: float | None = None,
                     dropout_p: float = 0.0, seqlens: Sequence[int] | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Attention within each packed sequence. q [T, Hq, D], k / v [T, Hkv, D] (Hq a multiple of
    Hkv: grouped-query attention), cu_seqlens int32 [B+1] on q's device, max_seqlen the longest
    sequence (host int). Returns [T, Hq, D]. ``seqlens``: the host lengths, if known (else the
    registered ones, see ``register_seqlens``). ``scale`` defaults to D**-0.5."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention wants [T, heads, head_dim]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != T or v.shape[:2] != k.shape[:2] or Hq % Hkv:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}: same T, and q heads a multiple of kv heads")
    if backend == "auto":
        backend = attention_backend(q.device, q.dtype, dropout_p)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if dropout_p and backend in ("torch_varlen", "flex"):
        raise ValueError(f"backend {backend!r} has no dropout; got dropout_p={dropout_p}")
    if backend == "torch_varlen":
        if not HAS_TORCH_VARLEN:
            raise ValueError(f"backend 'torch_varlen' needs torch.nn.attention.varlen (torch >= "
                             f"2.10); this is torch {torch.__version__}")
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens,
                                      cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout_p,
                                      softmax_scale=scale, causal=causal)
    if seqlens is None:
        entry = _entry(cu_seqlens)
        seqlens, cache = entry[1], entry[2]
    else:
        cache = {}
    if backend == "flex":
        if not HAS_FLEX:
            raise ValueError(f"backend 'flex' needs torch.nn.attention.flex_attention; this is "
                             f"torch {torch.__version__}")
        if sum(seqlens) != T:
            raise ValueError(f"varlen_attention: the sequence lengths sum to {sum(seqlens)} but "
                             f"q has {T} rows")
        return _flex(q, k, v, cu_seqlens, causal, scale, cache)
    if backend == "xformers":
        from xformers.ops import fmha

        key = ("xformers_bias", causal)
        bias = cache.get(key)
        if bias is None:
            mask_cls = fmha.attn_bias.BlockDiagonalCausalMask if causal else \
                fmha.attn_bias.BlockDiagonalMask
            bias = cache[key] = mask_cls.from_seqlens(list(seqlens))
        if Hq != Hkv:  # grouped-query: head h reads kv head h // (Hq / Hkv), as repeat_kv
            rep = Hq // Hkv
            k = k[:, :, None].expand(T, Hkv, rep, D).reshape(T, Hq, D)
            v = v[:, :, None].expand(T, Hkv, rep, D).reshape(T, Hq, D)
        out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias,
                                              p=dropout_p, scale=scale)
        return out[0]
    if sum(seqlens) != T:
        raise ValueError(f"varlen_attention: the sequence lengths sum to {sum(seqlens)} but q has "
                         f"{T} rows")
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, T, D] views
    outs, a = [], 0
    for n in seqlens:
        if n:
            o = F.scaled_dot_product_attention(
                qh[None, :, a:a + n], kh[None, :, a:a + n], vh[None, :, a:a + n],
                dropout_p=dropout_p, is_causal=causal and n > 1, scale=scale,
                enable_gqa=Hq != Hkv)
            outs.append(o[0].transpose(0, 1))
        a += n
    if not outs:
        return q.new_zeros(T, Hq, D)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


# ---------------------------------------------------------------------------------------------
# The transformers hook


def _staged_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None,
                           sliding_window: int | None = None, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key / value [B, Hkv, T, D] ->
    ([B, T, Hq, D], None). Packed when called with ``cu_seq_lens_q``; otherwise sdpa."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal,
                                      sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise NotImplementedError("staged_varlen: sliding-window layers are not supported packed "
                                  "(Qwen-VL configs use use_sliding_window=False)")
    if query.shape[0] != 1:
        raise ValueError(f"staged_varlen: a packed batch is [1, T]; got batch {query.shape[0]}")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    max_len = kwargs.get("max_length_q")
    if max_len is None:
        max_len = max(host_seqlens(cu))
    out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                           value[0].transpose(0, 1), cu, int(max_len), causal=causal,
                           scale=scaling, dropout_p=dropout if module.training else 0.0,
                           backend=hook_backend)
    return out[None], None


_REGISTERED = False


def register_attention() -> None:
    """Register ``staged_varlen`` with transformers' AttentionInterface (and sdpa's mask builder
    under the same name, for unpacked calls). Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _staged_varlen_forward)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


def _vl_parts(model):
    """(the Qwen-VL base model with .visual and .language_model, lm_head or None)."""
    inner = model
    for _ in range(3):
        if hasattr(inner, "language_model") and hasattr(inner, "visual"):
            return inner, getattr(model, "lm_head", None)
        inner = getattr(inner, "model", None)
        if inner is None:
            break
    raise TypeError(f"{type(model).__name__} is not a Qwen-VL model (no .visual and "
                    ".language_model): packed_forward supports Qwen2-VL, Qwen2.5-VL and Qwen3-VL")


def use_packed_attention(model) -> None:
    """Select ``staged_varlen`` for the text model of a Qwen-VL model (the vision tower keeps its
    implementation). Unpacked calls still work (they run sdpa)."""
    register_attention()
    inner, _ = _vl_parts(model)
    text_cfg = inner.language_model.config
    if text_cfg._attn_implementation == ATTN_NAME:
        return
    has_text_config = getattr(model.config, "text_config", None) is not None
    model.set_attn_implementation({"text_config": ATTN_NAME} if has_text_config else ATTN_NAME)
    if inner.language_model.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"could not select {ATTN_NAME} for {type(model).__name__}'s text model "
                           f"(it uses {inner.language_model.config._attn_implementation!r})")


def vision_outputs(model, pixel_values: torch.Tensor,
                   grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The vision tower on ``pixel_values`` (images / frames in span order): its merged output
    [Nv, H] and its deepstack features (Qwen3-VL: one [Nv, H] per deepstack merger, in the
    order of the decoder layers they feed; [] for Qwen2-VL / Qwen2.5-VL)."""
    inner, _ = _vl_parts(model)
    visual = inner.visual
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    deep = getattr(out, "deepstack_features", None)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple)):
        out, deep = out  # transformers 4.5x's Qwen3-VL tower: (merged, deepstack list)
    merged = getattr(out, "pooler_output", out)
    return merged, list(deep or [])


def vision_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision tower's merged output [Nv, H] for pixel values in span order."""
    return vision_outputs(model, pixel_values, grid_thw)[0]


def has_deepstack(model) -> bool:
    """Whether the model feeds vision features into decoder layers (Qwen3-VL's deepstack)."""
    inner, _ = _vl_parts(model)
    return bool(getattr(inner.visual.config, "deepstack_visual_indexes", None))


def _text_takes_deepstack(text) -> bool:
    return "deepstack_visual_embeds" in inspect.signature(type(text).forward).parameters


def vision_row_mask(batch) -> torch.Tensor:
    """[T] bool: the packed rows that hold vision tokens (from the span table, on its device;
    no host sync)."""
    from staged.kernels.reference.packing import SPAN_KIND, row_spans

    t = batch.table
    return t.spans[row_spans(t.spans, t.num_rows), SPAN_KIND] != 0


def packed_text_forward(model, batch, embeds: torch.Tensor, position_ids: torch.Tensor, *,
                        deepstack: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The text model on a packed micro-batch's rows (``text_forward_varlen`` over its
    ``table.cu_seqlens``; Qwen3-VL's deepstack into its vision rows). Returns [T, H]."""
    t = batch.table
    return text_forward_varlen(model, embeds, position_ids, t.cu_seqlens, batch.seqlens, t.max_seqlen,
                               deepstack=deepstack, vision_rows=vision_row_mask(batch) if len(deepstack) else None)


def text_forward_varlen(model, embeds: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                        seqlens: Sequence[int], max_seqlen: int, *, deepstack: Sequence[torch.Tensor] = (),
                        vision_rows: torch.Tensor | None = None, cache=None) -> torch.Tensor:
    """The text model on packed rows: ``embeds`` [T, H], ``position_ids`` [4, T] (row 0 the
    per-sample arange, rows 1-3 mrope), varlen attention over ``cu_seqlens`` (host lengths
    ``seqlens``), and for Qwen3-VL the ``deepstack`` features [Nv, H] (span order) added to the
    ``vision_rows`` ([T] bool) after the first ``len(deepstack)`` decoder layers. ``cache``: a
    DynamicCache to fill with every layer's keys / values (the rollout's prefill), or None.
    Returns the final hidden states [T, H]. The text model's attention must be ``staged_varlen``.

    Masks: Qwen2-VL / Qwen2.5-VL's text model takes a ready mask per layer type (a dict of
    None: nothing is built). Qwen3-VL's text model always calls ``create_causal_mask``, which
    returns a 4-D mask as it is (its documented contract): it gets an empty [1, 1, 0, 0]
    placeholder that ``staged_varlen`` never reads (packed calls carry cu_seqlens), so no
    [T, T] mask is built and no packed-sequence detection runs.

    Deepstack goes through the text model's own ``visual_pos_masks`` /
    ``deepstack_visual_embeds`` arguments (transformers >= 4.57, 5.x): the features of the
    vision rows in packed order, which is span order. Host sync: transformers indexes the
    hidden states with the boolean row mask (one ``nonzero`` per deepstack layer, on CUDA)."""
    from staged.rollout.interface import cache_kwarg

    inner, _ = _vl_parts(model)
    register_seqlens(cu_seqlens, seqlens)  # host lengths for the sdpa loop: no readback
    text = inner.language_model
    kw = {}
    if _text_takes_deepstack(text):
        mask = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=embeds.device)
        if len(deepstack):
            # sets past the decoder's layers are ignored, as the model's own forward ignores them
            # (it adds set i after layer i, for the layers it has)
            kw = dict(visual_pos_masks=vision_rows[None], deepstack_visual_embeds=list(deepstack)[:len(text.layers)])
    else:
        if len(deepstack):
            raise ValueError(f"packed_text_forward: {type(text).__name__} takes no deepstack features")
        layer_types = getattr(text.config, "layer_types", None) or ["full_attention"]
        mask = {k: None for k in set(layer_types) | {"full_attention"}}
    if cache is not None:
        kw[cache_kwarg(text)] = cache
    out = text(inputs_embeds=embeds[None], position_ids=position_ids[:, None, :], attention_mask=mask,
               use_cache=cache is not None, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
               max_length_q=max_seqlen, max_length_k=max_seqlen, **kw)
    return out.last_hidden_state[0]


def packed_forward(model, batch, *, vision: torch.Tensor | None = None,
                   deepstack: Sequence[torch.Tensor] | None = None,
                   return_logits: bool = False) -> torch.Tensor:
    """Run a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model on a packed micro-batch
    (``PackedMicroBatch`` on the model's device): vision tower on the micro-batch's
    images/videos (or ``vision``, features computed elsewhere, with ``deepstack`` for Qwen3-VL),
    ``pack_embed``, 4-row position ids, the text model with varlen attention (and deepstack).
    Returns the final hidden states [T, H] (or logits [T, V] with ``return_logits``). No host
    sync of our own (the vision tower's are transformers', and so is deepstack's row mask).

    Under FSDP2 call it inside the root module's forward (``staged.parallel.bind_forward_method``)
    so that the embedding table and lm_head are unsharded while it runs."""
    from staged.kernels.packing import pack_embed

    inner, lm_head = _vl_parts(model)
    use_packed_attention(model)
    table = batch.table
    if vision is None and batch.pixel_values is not None:
        vision, deepstack = vision_outputs(model, batch.pixel_values, batch.vision_grid_thw)
    if vision is not None and has_deepstack(model) and deepstack is None:
        raise ValueError("packed_forward: a Qwen3-VL model given vision features needs their "
                         "deepstack features too (staged.attention.vision_outputs)")
    emb = inner.get_input_embeddings()
    cfg = batch.config
    embeds = pack_embed(batch.input_ids, emb.weight, vision, table.spans,
                        num_vision_rows=table.num_vision_rows, image_token_id=cfg.image_token_id,
                        video_token_id=cfg.video_token_id,
                        padding_idx=getattr(emb, "padding_idx", None))
    hidden = packed_text_forward(model, batch, embeds, batch.position_ids(),
                                 deepstack=(deepstack or ()) if vision is not None else ())
    if return_logits:
        if lm_head is None:
            raise ValueError("return_logits: the model has no lm_head")
        return lm_head(hidden)
    return hidden
