"""The paged rollout engine: group-shared prefill, a paged KV cache, continuous batching.

One GRPO step asks for G completions of each of its prompts. The engine

1. **prefills each distinct prompt once** (text + images through the vision tower and the
   decoder, transformers' own forward) and stores its keys / values in the block pool; the G
   rows of the prompt share those blocks by reference and sample their first token from the
   prompt's last logits, each with its own uniform;
2. **decodes in a fixed number of slots** (``SamplingParams.batch_size``; 0 = every row at
   once): each decode step runs the decoder layers on the live rows only, one token each,
   writing K/V into the pool in place (staged.rollout.paged_attention); when a row ends, its
   own blocks return to the pool and its slot takes the next pending row;
3. **admits a row only when the blocks it can still need are free** (its prompt's last partial
   block copied on write, plus max_new_tokens), so the pool never runs dry mid-row and a
   budget smaller than one row is an error before any work.

Randomness is per row and counter-based (staged.rollout.sampler): a row's completion depends on
its seed and prompt only, not on its slot, the rows beside it, or the slot count.

Host syncs: on a CPU the host reads each step's tokens (free there). On CUDA it reads the
finished flags only every ``check_every`` steps (one sync each); rows that end in between keep
a slot until then, their extra tokens masked out (a row that has drawn max_new_tokens is not
decoded again: the host knows that one without a sync).
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from staged.models.loading import base_model, vision_module
from staged.rollout.cache import KVCacheTooSmall, PagedKVCache, blocks_for, host_longs, own_blocks, row_blocks
from staged.rollout.cpu_linear import packed_linears
from staged.rollout.graphs import DecodeGraphs
from staged.rollout.interface import (SamplingParams, cache_kwarg, image_ranges, images_per_row, model_inputs,
                                      select_rows)
from staged.rollout.paged_attention import (DecodeStep, choose_backend, paged_attention_enabled, token_index,
                                            triton_decode_agrees)
from staged.rollout.plan import DevicePlan, plan_for
from staged.rollout.prefill import run_packed_prefill, supports_packed_prefill
from staged.rollout.sampler import sample_tokens, suppress_index, uniform_from_seed
from staged.vision_reuse import image_features, injected_image_features, per_row_features, supports_reuse

CPU_CACHE_CAP_BYTES = 4 << 30


# ------------------------------------------------------------------------------------------
# which rows share a prompt


def prompt_groups(batch: dict) -> list[int]:
    """Row -> distinct-prompt index (first-occurrence order). ``batch["prompt_index"]`` when the
    caller knows it (the trainer does); otherwise rows are compared by their tokens and images."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    if "prompt_index" in batch:
        idx = [int(i) for i in batch["prompt_index"]]  # ints, also from a tensor (its 0-d items never compare equal as keys)
        if len(idx) != ids.shape[0]:
            raise ValueError(f"rollout batch: prompt_index has {len(idx)} entries for {ids.shape[0]} rows")
        remap: dict[int, int] = {}
        return [remap.setdefault(i, len(remap)) for i in idx]
    per_row = images_per_row(batch)
    imgs, patches = image_ranges(batch) if sum(per_row) else (None, None)
    keys: dict[bytes, int] = {}
    out = []
    for r in range(ids.shape[0]):
        h = hashlib.blake2b(ids[r][attn[r].bool()].numpy().tobytes(), digest_size=16)
        if per_row[r]:  # the pixels and the grids: the same patches laid out 4x8 or 8x4 are other images
            h.update(batch["pixel_values"][slice(*patches[r])].float().contiguous().numpy().tobytes())
            h.update(torch.as_tensor(batch["image_grid_thw"])[slice(*imgs[r])].long().numpy().tobytes())
        out.append(keys.setdefault(h.digest(), len(keys)))
    return out


# ------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class Prompt:
    rows: list[int]                 # its rows, in order
    length: int                     # prompt tokens P
    blocks: list[int] = field(default_factory=list)  # its KV blocks, once prefilled
    logits: torch.Tensor | None = None               # [V] fp32 after the last prompt token
    vision: torch.Tensor | None = None               # [Nv, H] its images' features (reused in training)
    admitted: int = 0


@dataclass
class Live:
    row: int
    prompt: int
    length: int                     # tokens in the cache for this row
    blocks: list[int]               # block table (shared prefix blocks first)
    own: int                        # blocks this row took itself so far
    worst: int                      # blocks this row may take at most


class Scheduler:
    """Host-side state of one generate() call: prompts, pending rows, slots, block accounting."""

    def __init__(self, groups: list[int], prompt_lens: list[int], block_size: int, slots: int, max_new: int):
        self.cache: PagedKVCache | None = None  # bind(): sized from worst_case_blocks() and a budget
        self.bs, self.max_new = block_size, max_new
        self.prompts: list[Prompt] = []
        for r, g in enumerate(groups):
            if g == len(self.prompts):
                self.prompts.append(Prompt(rows=[], length=prompt_lens[r]))
            self.prompts[g].rows.append(r)
        self.groups = groups
        # Rows of one prompt next to each other: a prompt's prefix is freed once its last row is
        # admitted, so a prompt whose rows were spread out could hold its blocks while the row
        # ahead of its next one waits for them (a deadlock under a tight cache budget). The
        # order a row is decoded in never changes its tokens.
        self.pending = deque(sorted(range(len(groups)), key=lambda r: groups[r]))
        self.slots: list[Live | None] = [None] * slots
        self.reserved = 0           # blocks promised to live rows / prefilled prompts' next row

    def own_worst(self, p: Prompt) -> int:
        return own_blocks(p.length, self.max_new, self.bs)

    def worst_case_blocks(self) -> int:
        """Blocks this call can need at most: every prefix and every row's worst case at once."""
        return sum(blocks_for(p.length, self.bs) + len(p.rows) * self.own_worst(p) for p in self.prompts)

    def bind(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.check_fits()

    def check_fits(self) -> None:
        """A budget that cannot hold the longest single row is an error now, not a hang later."""
        nb = self.cache.pool.num_blocks
        worst = max(self.prompts, key=lambda p: row_blocks(p.length, self.max_new, self.bs))
        need = row_blocks(worst.length, self.max_new, self.bs)
        if need > nb:
            raise KVCacheTooSmall(
                f"rollout KV cache too small for one row: a prompt of {worst.length} tokens + max_new_tokens "
                f"{self.max_new} needs {need} blocks of {self.bs} tokens ({need * self.bs} tokens), the cache has "
                f"{nb} blocks ({nb * self.bs} tokens); raise the cache (SamplingParams.kv_cache_tokens / "
                f"kv_cache_memory_fraction; in a recipe rollout.kv_cache_tokens / kv_cache_memory_fraction) or lower "
                f"max_new_tokens (a stage's grpo.max_response_tokens)")

    @property
    def available(self) -> int:
        return self.cache.pool.num_free - self.reserved

    def prompts_to_prefill(self, token_budget: int) -> list[int]:
        """Distinct prompts of the pending rows, in order, not yet prefilled, that fit the pool
        (prefix + their next row's worst case) and the prefill token budget (at least one)."""
        out, avail, tokens, seen = [], self.available, 0, set()
        for r in self.pending:
            g = self.groups[r]
            p = self.prompts[g]
            if g in seen or p.blocks:
                continue
            need = row_blocks(p.length, self.max_new, self.bs)
            if need > avail or (out and tokens + p.length > token_budget):
                break
            out.append(g)
            seen.add(g)
            avail -= need
            tokens += p.length
        return out

    def take_prefix(self, g: int) -> list[int]:
        p = self.prompts[g]
        p.blocks = self.cache.pool.take(blocks_for(p.length, self.bs))
        self.reserved += self.own_worst(p)  # its next row is promised its worst case
        return p.blocks

    def admit(self, slot: int) -> Live | None:
        """The next pending row into ``slot`` if its prompt is prefilled and its blocks fit."""
        if not self.pending:
            return None
        r = self.pending[0]
        g = self.groups[r]
        p = self.prompts[g]
        if not p.blocks:
            return None
        worst = self.own_worst(p)
        if p.admitted:  # the first row's worst case was promised when the prompt was prefilled
            if worst > self.available:
                return None
            self.reserved += worst
        self.pending.popleft()
        full, tail = divmod(p.length, self.bs)
        shared = p.blocks[:full]
        self.cache.pool.share(shared)
        live = Live(row=r, prompt=g, length=p.length, blocks=list(shared), own=0, worst=worst)
        if tail:  # copy on write: the row's first own block starts as the prompt's partial block
            b = self.take_blocks(live, 1)
            self.cache.copy_block(p.blocks[full], b, tail)
        p.admitted += 1
        if p.admitted == len(p.rows):  # every row holds what it needs: the prompt lets go
            self.cache.pool.release(p.blocks)
        self.slots[slot] = live
        return live

    def take_blocks(self, live: Live, n: int) -> int:
        b = self.cache.pool.take(n)
        live.blocks += b
        live.own += n
        self.reserved -= n
        return b[-1]

    def finish(self, slot: int) -> None:
        live = self.slots[slot]
        self.cache.pool.release(live.blocks)
        self.reserved -= live.worst - live.own
        self.slots[slot] = None


# ------------------------------------------------------------------------------------------
# the engine


def _layer_kv(cache, layer: int):
    """A DynamicCache's keys / values of ``layer`` [B, kv_heads, T, head_dim] (transformers 5.x
    keeps them per layer object; older releases in key_cache / value_cache lists)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _text_geometry(model):
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def _cache_blocks(params: SamplingParams, worst_tokens: int, bytes_per_token: int, block_size: int, device) -> int:
    if params.kv_cache_tokens:
        return max(1, params.kv_cache_tokens // block_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * params.kv_cache_memory_fraction) // bytes_per_token
    else:
        budget = CPU_CACHE_CAP_BYTES // bytes_per_token
    # never more than this call can use: the cache is allocated per call
    return max(1, min(budget, worst_tokens) // block_size)


@torch.no_grad()
def generate_paged(model, batch: dict, params: SamplingParams, seeds: torch.Tensor, device, dtype):
    """(ids, mask, logps) [B, Tc], engine stats, the distinct prompts' image features (None
    without reuse) and row -> distinct prompt; see the module doc. ``dtype``: what pixel values
    are cast to (the cache takes the decoder weights' dtype)."""
    plan = plan_for(device)  # what this kind of device runs (staged.rollout.plan)
    # The CPU's kernels: the decoder's, lm_head's and vision tower's linears run with reordered
    # weights: faster, and a row's numbers do not depend on how many rows share a step, nor an
    # image's features on the images beside it in a tower call (staged.rollout.cpu_linear).
    # The prompts of a prefill go packed (no padding: a prompt's K/V and logits are the same
    # bits whatever prompts share the forward; staged.rollout.prefill); elsewhere left-padded.
    packed = plan.cpu_kernels and supports_packed_prefill(model)
    modules = [base_model(model).language_model, model.get_output_embeddings()]
    if packed:
        modules.append(vision_module(model))
    linears = packed_linears(modules, device) if plan.cpu_kernels else contextlib.nullcontext()
    # Triton launches and graph captures go to the current CUDA device, not the tensors': made
    # ``device`` for the call (generate(device="cuda:1") from a process whose current device is 0)
    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with current, linears:
        return _generate_paged(model, batch, params, seeds, device, dtype, plan, packed)


def _generate_paged(model, batch: dict, params: SamplingParams, seeds: torch.Tensor, device, dtype,
                    plan: DevicePlan, packed: bool):
    t_start = time.perf_counter()
    B = batch["input_ids"].shape[0]
    groups = prompt_groups(batch)
    prompt_lens = batch["attention_mask"].sum(-1).tolist()
    text_cfg, n_layers, kv_heads, head_dim = _text_geometry(model)
    base = base_model(model)
    text = base.language_model
    kv_dtype = text.embed_tokens.weight.dtype  # K/V come out of the decoder layers in their weights' dtype
    want = params.attention
    bs = params.block_size or (256 if want in ("auto", "flash") and choose_backend(device, kv_dtype, 256) == "flash"
                               else 16)
    backend = choose_backend(device, kv_dtype, bs, want)
    if (backend == "triton" and device.type == "cuda"
            and not triton_decode_agrees(device, kv_dtype, text_cfg.num_attention_heads, kv_heads, head_dim, bs)):
        if want == "triton":  # asked for by name: not silently swapped
            raise RuntimeError("rollout.attention = 'triton': the kernel failed its check on this device (see the "
                               "warning above); use 'auto' or 'torch'")
        backend = "torch"
    per_token = PagedKVCache.bytes_per_token(n_layers, kv_heads, head_dim, kv_dtype)
    S = min(params.batch_size or B, B)
    sched = Scheduler(groups, prompt_lens, bs, S, params.max_new_tokens)
    cache = PagedKVCache(n_layers, _cache_blocks(params, sched.worst_case_blocks() * bs, per_token, bs, device), bs,
                         kv_heads, head_dim, kv_dtype, device)
    sched.bind(cache)
    reuse = params.reuse_vision_features and supports_reuse(model)

    layers = list(text.layers)
    layer_cache_kw = cache_kwarg(type(layers[0]))
    model_cache_kw = cache_kwarg(model)
    lm_head = model.get_output_embeddings()
    V = text_cfg.vocab_size
    suppress = suppress_index(params.suppress_token_ids, V, device)
    # A lookup table rather than torch.isin (whose sorting path syncs for large end-token sets).
    is_end = torch.zeros(V, dtype=torch.bool, device=device)
    is_end[torch.tensor([e for e in set(params.eos_token_ids) if 0 <= e < V], dtype=torch.long, device=device)] = True
    # Row B and slot S: the scratch row / slot of static-shape decode steps' padding rows.
    seeds_dev = torch.cat([seeds, seeds.new_zeros(1)]).to(device)
    next_pos = (batch["position_ids"].amax(dim=(0, 2)) + 1).tolist()  # first completion position per row

    T = params.max_new_tokens
    out_ids = torch.full((B + 1, T), params.pad_token_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B + 1, T), dtype=torch.float32, device=device)
    n_out = torch.zeros(B + 1, dtype=torch.long, device=device)          # tokens emitted per row
    done = torch.zeros(B + 1, dtype=torch.bool, device=device)
    # decode steps between the host's looks at which rows finished (each a host sync on CUDA)
    check = max(1, params.check_every) if plan.host_syncs else 1
    clock = DecodeClock(device)
    stats = {"prefill_s": 0.0, "prefill_tokens": 0, "prefill_forwards": 0, "decode_row_steps": 0, "cache_blocks": cache.pool.num_blocks, "block_size": bs,
             "cache_mb": cache.pool.num_blocks * bs * per_token / 2**20,
             "peak_blocks": 0, "slots": S, "attention": backend,
             "kv_bytes_per_token": per_token}

    # per slot: the row decoded there and its step counter (host)
    t_of = [0] * S
    cur_tok = torch.zeros(S + 1, dtype=torch.long, device=device)

    has_images = images_per_row(batch)

    def prefill(gs: list[int]) -> None:
        t0 = time.perf_counter()
        (prefill_packed if packed else prefill_padded)(gs)
        stats["prefill_s"] += time.perf_counter() - t0
        stats["prefill_tokens"] += sum(sched.prompts[g].length for g in gs)
        stats["prefill_forwards"] += 1

    def store_prefix(g: int, k_of, v_of, logits: torch.Tensor) -> None:
        """Prompt ``g``'s K/V (``k_of(layer)`` / ``v_of(layer)``: [P, kv_heads, head_dim]) into
        its blocks, its last logits kept for its rows' first tokens."""
        blocks = sched.take_prefix(g)
        slots = cache.prompt_slots(blocks, sched.prompts[g].length, device)
        for layer in range(n_layers):
            cache.write_token(layer, slots, k_of(layer).to(kv_dtype), v_of(layer).to(kv_dtype))
        sched.prompts[g].logits = logits

    def prefill_packed(gs: list[int]) -> None:
        """Distinct prompts ``gs`` as one packed sequence (staged.rollout.prefill); the tower once
        over their images, the features kept for training."""
        from transformers import DynamicCache

        rows = [sched.prompts[g].rows[0] for g in gs]
        ids, pos = [], []
        for r in rows:
            keep = batch["attention_mask"][r].bool()
            ids.append(batch["input_ids"][r][keep].to(device))
            pos.append(batch["position_ids"][:, r][:, keep].to(device))
        feats = [None] * len(gs)
        if any(has_images[r] for r in rows):  # one tower call for all their images
            inputs = model_inputs(select_rows(batch, rows), device, dtype)
            feats = per_row_features(model, image_features(model, inputs["pixel_values"], inputs["image_grid_thw"]),
                                     inputs["image_grid_thw"], [has_images[r] for r in rows])
        if reuse:
            for g, f in zip(gs, feats):
                sched.prompts[g].vision = f
        dc = DynamicCache(config=model.config)
        logits = run_packed_prefill(model, ids, pos, feats, dc)
        start = 0
        for i, g in enumerate(gs):
            a, b = start, start + sched.prompts[g].length
            store_prefix(g, lambda layer: _layer_kv(dc, layer)[0][0, :, a:b].transpose(0, 1),
                         lambda layer: _layer_kv(dc, layer)[1][0, :, a:b].transpose(0, 1), logits[i])
            start = b

    def prefill_padded(gs: list[int]) -> None:
        """Distinct prompts ``gs`` through the full model once (left-padded to the longest), their
        K/V into the pool, their last logits kept for their rows' first tokens."""
        rows = [sched.prompts[g].rows[0] for g in gs]
        sub = select_rows(batch, rows)
        keep = int(max(prompt_lens[r] for r in rows))
        Tp = sub["input_ids"].shape[1]
        for k in ("input_ids", "attention_mask"):
            sub[k] = sub[k][:, Tp - keep:]
        sub["position_ids"] = sub["position_ids"][:, :, Tp - keep:]
        from transformers import DynamicCache

        dc = DynamicCache(config=model.config)
        inputs = model_inputs(sub, device, dtype)
        feats = None
        if reuse and "pixel_values" in inputs:  # the tower once per distinct prompt, kept for training
            feats = image_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
            for g, f in zip(gs, per_row_features(model, feats, inputs["image_grid_thw"], images_per_row(sub))):
                sched.prompts[g].vision = f
        with injected_image_features(model, feats) if feats is not None else contextlib.nullcontext():
            out = model(**inputs, use_cache=True, logits_to_keep=1, **{model_cache_kw: dc})
        logits = out.logits[:, -1].float()
        for i, g in enumerate(gs):
            a = keep - sched.prompts[g].length
            store_prefix(g, lambda layer: _layer_kv(dc, layer)[0][i, :, a:].transpose(0, 1),
                         lambda layer: _layer_kv(dc, layer)[1][i, :, a:].transpose(0, 1), logits[i])

    def emit(rows: torch.Tensor, t: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Sample token t of each of ``rows`` and record it (nothing recorded once a row is done)."""
        tok, lp = sample_tokens(logits, uniform_from_seed(seeds_dev[rows], t), params.temperature, params.top_p,
                                suppress, inplace=True)
        live = ~done[rows]
        out_ids[rows, t] = torch.where(live, tok, out_ids[rows, t])
        out_logp[rows, t] = torch.where(live, lp, out_logp[rows, t])
        n_out[rows] += live.long()
        done[rows] |= is_end[tok] | (t + 1 >= T)
        return tok

    def first_tokens(rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``emit`` of the rows' first tokens from their prompts' logits [n, V]; with fixed shapes
        in draws of exactly that many rows (padded with copies into the scratch row B)."""
        n = rows.shape[0]
        if not fixed:
            return emit(rows, torch.zeros_like(rows), logits)
        pad = -n % fixed
        logits = torch.cat([logits, logits[:1].expand(pad, -1)])
        rows = torch.cat([rows, rows.new_full((pad,), B)])
        toks = [emit(rows[a:a + fixed], torch.zeros_like(rows[a:a + fixed]), logits[a:a + fixed])
                for a in range(0, n + pad, fixed)]
        return torch.cat(toks)[:n]

    def device_step(buf: torch.Tensor, n: int, mb: int, by_length=None) -> None:
        """One decode step of ``n`` rows on the device, its inputs in ``buf`` (see _step_inputs)."""
        _device_step(buf, n, mb, cache, backend, cur_tok, text, layers, layer_cache_kw, lm_head, emit, by_length)

    # Fixed-shape steps (CUDA's plan, or static_shapes for tests): exactly `fixed` rows per step
    # and tables always the widest a row can reach, so that no shape follows the batch.
    fixed = params.invariant_rows if plan.fixed_shapes or params.static_shapes else 0
    graphs = None
    if params.static_shapes or (plan.fixed_shapes and (params.cuda_graphs or fixed)):
        widest = max(p.length // bs + sched.own_worst(p) for p in sched.prompts)
        graphs = DecodeGraphs(device_step, S, widest, pad_row=[cache.scratch_block * bs, 1, 0, B, 0, S],
                              scratch_block=cache.scratch_block, device=device,
                              capture=params.cuda_graphs and device.type == "cuda",  # a GPU's only
                              # flash / triton read each row's own length only. The torch path's
                              # reductions follow the table width: fixed, it is the widest the
                              # call's longest prompt lets a row grow, not the live rows' (a row's
                              # bits then follow that prompt, no longer the live rows beside it).
                              fixed_width=backend in ("flash", "triton") or bool(fixed), rows=fixed)
    per_length = graphs is None and plan.cpu_kernels and backend == "torch"

    def fill_slots() -> int:
        """Pending rows into free slots (prefilling their prompts as needed); their first tokens."""
        new = []
        for s in range(S):
            if sched.slots[s] is not None:
                continue
            live = sched.admit(s)
            if live is None and sched.pending:
                # A padded prefill with the CPU's kernels (a model the packed one cannot run) goes
                # one prompt per forward: no padding to a neighbour's length, so a prompt's K/V
                # stay its own bits. Fixed shapes: one prompt per forward too (a padded batch of
                # prompts has shapes, and padding, set by the neighbours).
                gs = sched.prompts_to_prefill(params.prefill_tokens if packed or not (plan.cpu_kernels or fixed)
                                              else 1)
                if gs:
                    prefill(gs)
                    live = sched.admit(s)
            if live is None:
                break
            new.append(s)
        if new:
            lives = [sched.slots[s] for s in new]
            logits = torch.stack([sched.prompts[lv.prompt].logits for lv in lives])  # a copy: sampled in place
            rows = torch.tensor([lv.row for lv in lives], device=device)
            cur_tok[torch.tensor(new, device=device)] = first_tokens(rows, logits)
            for s, lv in zip(new, lives):
                t_of[s] = 1
                p = sched.prompts[lv.prompt]
                if p.admitted == len(p.rows):
                    p.logits = None
        return len(new)

    def release_done() -> None:
        # Host sync (on CUDA; every `check` steps): which rows are done.
        done_host = done.tolist()
        for s in range(S):
            if sched.slots[s] is not None and done_host[sched.slots[s].row]:
                sched.finish(s)

    def decodable() -> list[int]:
        # A row that has drawn all T tokens is done (the host knows it without asking the device)
        # but keeps its slot until the next look: it must not be decoded again -- its token index
        # T is past out_ids (an index out of range: a device-side assert on CUDA), and a second
        # extra step would write past the blocks reserved for it.
        return [s for s in range(S) if sched.slots[s] is not None and t_of[s] < T]

    step_i = 0
    while True:
        live_slots = decodable()
        if step_i % check == 0 or not live_slots:
            release_done()
            while fill_slots():
                release_done()  # rows whose first token ended them leave at once
            live_slots = decodable()
            if not live_slots:
                if sched.pending:
                    raise RuntimeError("rollout scheduler: rows pending but none admitted (this is a bug)")
                break
        stats["peak_blocks"] = max(stats["peak_blocks"], cache.pool.num_blocks - cache.pool.num_free)
        captures = graphs.captures if graphs is not None else 0
        mark = clock.start()
        with paged_attention_enabled(text_cfg):  # prefill (in fill_slots) keeps the model's own
            kv_read = _decode_step(live_slots, sched, t_of, next_pos, device_step, graphs, device, per_length,
                                   lambda: clock.device_start(mark))
        clock.stop(mark, kv_read, captured=graphs is not None and graphs.captures != captures)
        stats["decode_row_steps"] += len(live_slots)
        step_i += 1
    n_out = n_out[:B]  # row B: the padding rows' scratch
    stats.update(clock.totals())
    stats["total_s"] = time.perf_counter() - t_start
    stats["decode_tokens"] = int(n_out.sum()) - B
    stats["free_blocks_end"] = cache.pool.num_free
    if graphs is not None:
        stats.update(graph_captures=graphs.captures, graph_replays=graphs.replays, cuda_graphs=graphs.capture)
    vision = [p.vision for p in sched.prompts] if reuse else None
    Tc = max(1, int(n_out.max()))
    mask = (torch.arange(T, device=device)[None] < n_out[:, None]).long()
    return out_ids[:B, :Tc], mask[:, :Tc], out_logp[:B, :Tc], stats, vision, groups


class DecodeClock:
    """The decode steps' count, KV read and time. On CUDA the time is the device's, from an event
    pair around each step: the host queues steps ahead of the GPU (it syncs every few steps only),
    so its clock would count the queueing, not the work (``decode_host_s`` is that clock). Steps
    that captured a CUDA graph (a one-off cost per shape and rollout) are also kept apart:
    ``steady_*`` is the rest, what a step costs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list = []  # (host seconds, start event, end event, KV tokens read, captured)

    def _event(self):
        if not self.cuda:
            return None
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        return mark

    def start(self) -> list:
        """A step begins on the host (its inputs built next)."""
        return [time.perf_counter(), None]

    def device_start(self, mark: list) -> None:
        """Its device work is queued next: the start event goes here, after the host's part, or a
        step queued on an idle GPU (after each of the host's looks) would count that part too."""
        mark[1] = self._event()

    def stop(self, mark: list, kv_read: int, captured: bool) -> None:
        if mark[1] is None:
            self.device_start(mark)
        end = self._event()
        self.steps.append((time.perf_counter() - mark[0], mark[1], end, kv_read, captured))

    def totals(self) -> dict:
        if self.cuda and self.steps:
            self.steps[-1][2].synchronize()
        secs = [a.elapsed_time(b) / 1e3 if self.cuda else host for host, a, b, _, _ in self.steps]
        steady = [(t, kv) for t, (*_, kv, captured) in zip(secs, self.steps) if not captured]
        return {"decode_s": sum(secs), "decode_host_s": sum(st[0] for st in self.steps),
                "decode_steps": len(self.steps), "kv_tokens_read": sum(st[3] for st in self.steps),
                "steady_decode_s": sum(t for t, _ in steady), "steady_decode_steps": len(steady),
                "steady_kv_tokens_read": sum(kv for _, kv in steady)}


def _decode_step(live_slots, sched, t_of, next_pos, device_step, graphs, device, per_length: bool,
                 device_start=lambda: None):
    """One token for every live slot: the host's part (block tables, write slots, positions, in
    one int64 buffer and one copy -- pinned and asynchronous on CUDA), then the device's
    (``device_start`` called between the two). Returns the cache tokens the step's attention
    read. ``per_length``: the torch attention once per row length (eager CPU steps)."""
    bs = sched.bs
    if per_length:  # rows of one length side by side: each length group's attention takes a slice
        live_slots = sorted(live_slots, key=lambda s: sched.slots[s].length)
    slot_idx, rows, pos, writes, lens, tables = [], [], [], [], [], []
    for s in live_slots:
        live = sched.slots[s]
        L = live.length  # where this step's input token goes
        if L // bs == len(live.blocks):
            if live.own >= live.worst:
                raise RuntimeError(f"row {live.row}: decoded past its reserved blocks (this is a bug)")
            sched.take_blocks(live, 1)
        writes.append(live.blocks[L // bs] * bs + L % bs)
        live.length = L + 1
        lens.append(L + 1)
        tables.append(live.blocks)
        rows.append(live.row)
        pos.append(next_pos[live.row] + t_of[s] - 1)
        slot_idx.append(s)
    cols = [writes, lens, pos, rows, [t_of[s] for s in slot_idx], slot_idx]
    widest = max(len(b) for b in tables)
    device_start()
    if graphs is not None:  # in passes of at most graphs.pass_rows rows (fixed shapes: exactly that many)
        step = graphs.pass_rows
        for a in range(0, len(slot_idx), step):
            part = tables[a:a + step]
            shape = graphs.shape(len(part), max(len(b) for b in part))
            graphs.run(graphs.pack([c[a:a + step] for c in cols], part, shape), shape)
    else:
        n = len(slot_idx)
        host = host_longs([x for c in cols for x in c] + [x for b in tables for x in b + [0] * (widest - len(b))],
                          device)
        by_length = _length_groups(lens) if per_length else None
        device_step(host.to(device, non_blocking=True), n, widest, by_length)
    for s in slot_idx:
        t_of[s] += 1
    return sum(lens)


def _length_groups(lens: list[int]) -> list[tuple[int, int, int]]:
    """[(first row, end row, length)] of the runs of equal length in ``lens`` (sorted): one
    attention call per row length (staged.rollout.paged_attention)."""
    starts = [i for i in range(len(lens)) if i == 0 or lens[i] != lens[i - 1]]
    return [(a, b, lens[a]) for a, b in zip(starts, starts[1:] + [len(lens)])]


def _device_step(buf, n, mb, cache, backend, cur_tok, text, layers, layer_cache_kw, lm_head, emit, by_length=None):
    """The decode step's device work, static in (n, mb): embed each row's current token, run the
    decoder layers with paged attention, lm_head, sample. No host reads (capturable), except for
    ``by_length`` (eager CPU steps: attention per row length, staged.rollout.paged_attention)."""
    write, seqlens, pos_t, rows_t, t, idx = buf[:6 * n].view(6, n)
    table = buf[6 * n:6 * n + n * mb].view(n, mb)
    step = DecodeStep(cache=cache, slot=write, block_table=table.int(), seqlens=seqlens.int(), backend=backend,
                      by_length=by_length)
    if by_length is not None:  # shared by every layer's gather
        step.token_index = token_index(table, seqlens, cache.block_size)
    if backend == "torch" and by_length is None:
        step.mask = (torch.arange(mb * cache.block_size, device=buf.device)[None] < seqlens[:, None])[:, None, None]
    h = text.embed_tokens(cur_tok[idx][:, None])
    pe = text.rotary_emb(h, pos_t.view(1, -1, 1).expand(3, -1, 1))
    for layer in layers:
        h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=None, paged=step,
                  **{layer_cache_kw: None})
        if isinstance(h, tuple):
            h = h[0]
    h = text.norm(h)[:, 0]
    logits = lm_head(h).float()
    cur_tok[idx] = emit(rows_t, t, logits)
