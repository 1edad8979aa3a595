"""Sampling: per-row counter-based randomness and the inverse-CDF draw.

A row's draws depend only on its seed and its token index: the uniform for token t of a row is
a hash of (seed, t) computed on the device -- no ``torch.multinomial``, no generator state, no
host sync -- so a completion never depends on its slot, its batch, the rank count or a resume.

The draw is an inverse CDF over the tempered distribution, in two levels so that no fp64 cumsum
runs over the whole vocabulary: the unnormalised probabilities are summed per tile of ``TILE``
tokens (fp32 sums; an fp64 cumsum over the ~V/1024 tile sums picks the tile), then an fp64 cumsum
inside the chosen tile picks the token. Same distribution and the same uniform as a full cumsum;
one pass over the row plus ~V/TILE + TILE scan work, instead of V in fp64. On a CPU the passes
over the [B, V] logits run chunk by chunk of the vocabulary (each chunk against its own max, its
tile sums rescaled to the row's), so that a chunk stays in L2 while they run.
"""
from __future__ import annotations

import torch

from staged.rollout.plan import plan_for

_M32 = 0xFFFFFFFF
TILE = 1024
# With the CPU's kernels (staged.rollout.plan) the vocabulary is processed in chunks of this
# many columns (a multiple of TILE): a [40, 8,192] fp32 chunk is 1.3 MB, in L2 while the passes
# over it run (see _chunk_weights).
# Fixed, not sized from the row count: a row's weights depend on its chunks' maxes, and so would
# then depend on how many rows share its step.
CHUNK = 8 * TILE
_LOWEST = torch.finfo(torch.float32).min


def row_seed(*keys: int) -> int:
    """A 62-bit seed from integer keys (e.g. run seed, step, global row index): splitmix64."""
    x = 0x2545F4914F6CDD1D
    for k in keys:
        x = (x ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x >> 2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflow (split c in 16-bit halves)."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 finaliser: a bijection on 32-bit values with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_from_seed(seeds: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row for token index ``t`` (an int, or [B] per row); seeds [B]
    int64 (any 62-bit values). The token index is added to a key the whole seed is mixed into,
    not to the seed: seeds s and s + 1 (a caller's ``arange``) would otherwise give one stream
    shifted by a token, u(s, t + 1) == u(s + 1, t). Left: the key has 32 bits, so two seeds that
    share their high word and whose keys happen to lie d < T apart still share a stream shifted by
    d tokens (~n^2 T / 2^32 pairs of n such seeds: ~3 among 2,560 arange seeds at T = 2,048; never
    in practice for the trainer's ``row_seed`` seeds, whose high words differ). A second key from
    the whole seed would close that too; it was measured and not kept (RESULTS.md, session 8)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    key = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))
    x = _mix32((key + t) & _M32)
    x = _mix32(x ^ hi)
    return (x.double() + 0.5) / 4294967296.0


def suppress_mask(token_ids, vocab: int, device) -> torch.Tensor | None:
    """[V] bool of the tokens never drawn (ids past ``vocab`` ignored), or None."""
    ids = [i for i in token_ids if 0 <= i < vocab]
    if not ids:
        return None
    m = torch.zeros(vocab, dtype=torch.bool, device=device)
    m[torch.tensor(ids, dtype=torch.long, device=device)] = True
    return m


def suppress_index(token_ids, vocab: int, device) -> torch.Tensor | None:
    """[k] int64 of the tokens never drawn (ids past ``vocab`` ignored), or None: with few of
    them, filling k columns beats a masked pass over the whole [B, V] row block."""
    ids = sorted({i for i in token_ids if 0 <= i < vocab})
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _tile_sums(weights: torch.Tensor) -> torch.Tensor:
    """[B, ceil(V / TILE)] fp32 sums of ``weights`` [B, V] per TILE-token tile."""
    B, V = weights.shape
    full = V // TILE
    if not V % TILE:
        return weights.view(B, full, TILE).sum(-1)
    sums = [weights[:, :full * TILE].view(B, full, TILE).sum(-1)] if full else []
    sums.append(weights[:, full * TILE:].sum(-1, keepdim=True))
    return torch.cat(sums, dim=1)


def _draw(weights: torch.Tensor, u: torch.Tensor, tile_sums: torch.Tensor, tile_scale: torch.Tensor | None = None):
    """Index i of each row with cdf[i-1] < u * total <= cdf[i], the cdf of ``weights`` [B, V] >= 0
    (fp32) taken in two levels: the fp64 cumsum of the tiles' fp32 sums ``tile_sums`` [B, n_tiles]
    picks the tile, an fp64 cumsum inside the tile picks the token. No [B, V] fp64 copy, no padded
    copy. u [B] fp64. ``tile_scale`` [B, n_tiles]: a tile's weights are ``weights`` times its
    scale (``tile_sums`` are scaled already). Returns (tokens [B], log of the total weight [B] fp32)."""
    B, V = weights.shape
    tile_cdf = tile_sums.double().cumsum(-1)                                        # [B, n_tiles]
    n_tiles = tile_cdf.shape[1]
    target = (u * tile_cdf[:, -1])[:, None]
    tile = torch.searchsorted(tile_cdf, target).clamp_(max=n_tiles - 1)             # [B, 1]
    before = torch.where(tile > 0, tile_cdf.gather(-1, (tile - 1).clamp(min=0)), torch.zeros_like(target))
    cols = tile * TILE + torch.arange(TILE, device=weights.device)                 # [B, TILE]
    inside = cols < V
    in_tile = weights.gather(1, cols.clamp(max=V - 1)) * inside
    if tile_scale is not None:
        in_tile *= tile_scale.gather(1, tile)
    cdf = in_tile.double().cumsum(-1)
    j = torch.searchsorted(cdf, target - before).clamp_(max=TILE - 1)
    # Past the tile's last non-zero weight (rounding between the two levels): step back onto it.
    last = ((in_tile > 0).long() * torch.arange(1, TILE + 1, device=weights.device)).amax(-1, keepdim=True) - 1
    j = torch.minimum(j, last.clamp_(min=0))
    tokens = (tile * TILE + j).squeeze(-1).clamp_(max=V - 1)
    return tokens, tile_cdf[:, -1].log().float()


# Column slice of the nucleus search on a CPU: [40, 4,096] in int64 or fp64 is 1.3 MB, in L2.
NUCLEUS_COLS = 4096


def _crossing(mass: torch.Tensor, target: torch.Tensor, above: torch.Tensor):
    """Per row the highest bucket b of ``mass`` [B, n] (fp64, buckets in value order) with
    above + mass[b:].sum() >= target, and the mass above it (above + mass[b + 1:].sum()); [B, 1] each."""
    from_top = above + mass.flip(-1).cumsum(-1).flip(-1)                            # [B, n]
    b = ((from_top >= target).sum(-1, keepdim=True) - 1).clamp_(min=0)
    return b, from_top.gather(-1, b) - mass.gather(-1, b)


def _nucleus_threshold(e: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row the largest weight v with sum(e[e >= v]) >= target, [B, 1] fp32: the nucleus is
    e >= v (ties at v all kept). e [B, V] fp32 >= 0, contiguous; target [B, 1] fp64.

    A radix select instead of a sort: non-negative fp32 values order as their int32 bits, so v's
    bits are found 11, 12 and 8 at a time, each from a per-row histogram of weight mass (fp64
    sums, each row's in vocabulary order: the same bits whatever rows share the call); the second
    and third passes read only the crossing bucket's tokens."""
    B, V = e.shape
    keys = e.view(torch.int32)
    # In column slices, so that their int64 / fp64 copies stay in cache. A row's sums still run
    # over its tokens in vocabulary order (slice after slice), whatever the other rows. (A CPU's:
    # on a GPU scatter_add_ accumulates by atomics, in no fixed order, and nonzero syncs.)
    step = NUCLEUS_COLS
    mass = torch.zeros(B, 2048, dtype=torch.float64, device=e.device)
    for a in range(0, V, step):                                                    # sign 0: 11 bits
        mass.scatter_add_(1, (keys[:, a:a + step] >> 20).long(), e[:, a:a + step].double())
    b1, above = _crossing(mass, target, torch.zeros_like(target))
    rs, ks = [], []
    for a in range(0, V, step):
        part = keys[:, a:a + step]
        r, c = ((part >> 20) == b1).nonzero(as_tuple=True)
        rs.append(r)
        ks.append(part[r, c])
    r, k = torch.cat(rs), torch.cat(ks)
    wk = k.view(torch.float32).double()
    mid = ((k >> 8) & 0xFFF).long()
    mass = torch.zeros(B * 4096, dtype=torch.float64, device=e.device).index_add_(0, r * 4096 + mid, wk)
    b2, above = _crossing(mass.view(B, 4096), target, above)
    inside = mid == b2[r, 0]
    r, k, wk = r[inside], k[inside], wk[inside]
    mass = torch.zeros(B * 256, dtype=torch.float64, device=e.device).index_add_(0, r * 256 + (k & 0xFF).long(), wk)
    b3, _ = _crossing(mass.view(B, 256), target, above)
    return ((b1 << 20) | (b2 << 8) | b3).int().view(torch.float32)


def _chunk_weights(e: torch.Tensor, temperature: float, suppress: torch.Tensor | None):
    """``e`` [B, V] (logits) <- exp(e / T - m) in place, m the row's max within each chunk of CHUNK
    columns (with the CPU's kernels; one chunk elsewhere), every pass over a chunk done before the
    next chunk: it stays in L2 across its passes instead of each pass streaming the whole [B, V]
    block.
    Returns (the chunks' maxes [B, n_chunks], tile sums [B, n_tiles] rescaled to the row's max,
    the tiles' scales [B, n_tiles], the row's max [B, 1], the chunk width)."""
    B, V = e.shape
    width = CHUNK if plan_for(e.device).cpu_kernels else V
    if suppress is not None and suppress.dtype != torch.bool:
        e.index_fill_(1, suppress, float("-inf"))  # a few columns: no pass over the block
    maxes, sums = [], []
    for c0 in range(0, V, width):
        z = e[:, c0:c0 + width]
        if temperature != 1.0:
            z.div_(temperature)
        if suppress is not None and suppress.dtype == torch.bool:
            z.masked_fill_(suppress[c0:c0 + width], float("-inf"))
        # finite even for a chunk of suppressed tokens only: its weights 0, not NaN
        m = z.amax(-1, keepdim=True).clamp_(min=_LOWEST)
        z.sub_(m).exp_()
        maxes.append(m)
        sums.append(_tile_sums(z))
    maxes = torch.cat(maxes, 1)
    top = maxes.amax(-1, keepdim=True)
    per_chunk = -(-width // TILE)
    tile_scale = (maxes - top).exp_()[:, :, None].expand(B, maxes.shape[1], per_chunk).reshape(B, -1)
    tile_scale = tile_scale[:, :-(-V // TILE)]
    return maxes, torch.cat(sums, 1) * tile_scale, tile_scale, top, width


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float,
                  suppress: torch.Tensor | None = None, *, inplace: bool = False):
    """Draw one token per row. logits [B, V] fp32, u [B] in (0, 1), suppress (never drawn): [V] bool
    or the ids [k] int64.
    ``inplace``: ``logits`` is scratch (the engine's fresh lm_head output) and is overwritten.

    Returns (tokens [B] int64, logp [B] fp32 of the token under the distribution drawn from,
    softmax(logits / T) over the tokens not suppressed -- the full distribution, not its top-p
    truncation: what the trainer recomputes)."""
    # The sampler is a memory-bound pass over B x V floats per token: one buffer, shifted and
    # exponentiated in place (exp(z - max): unnormalised probabilities), no softmax output.
    e = logits if inplace else logits.clone()
    if top_p < 1.0:
        if temperature != 1.0:
            e.div_(temperature)
        if suppress is not None:
            if suppress.dtype == torch.bool:
                e.masked_fill_(suppress, float("-inf"))
            else:
                e.index_fill_(1, suppress, float("-inf"))
        e = e.sub_(e.amax(-1, keepdim=True)).exp_().contiguous()
        # The row's total from its tile sums (one thread each), not a sum over the whole row: with
        # more than one thread torch splits a lone row's sum across threads, another rounding than
        # the same row's among others -- its log-probs would follow the rows beside it.
        total = _tile_sums(e).double().sum(-1, keepdim=True)
        # vLLM/TRL nucleus: the fewest most likely tokens whose mass reaches top_p (the first
        # always stays). With the CPU's kernels found without sorting the vocabulary and drawn in
        # vocabulary order; elsewhere by a sort (fast on a GPU, and no host sync or atomics:
        # capturable in a CUDA graph, the same bits every run), drawn in sorted order.
        if plan_for(e.device).cpu_kernels:
            tau = _nucleus_threshold(e, top_p * total)
            for a in range(0, e.shape[1], NUCLEUS_COLS):
                z = e[:, a:a + NUCLEUS_COLS]
                z.masked_fill_(z < tau, 0.0)
            tokens = _draw(e, u, _tile_sums(e))[0]
        else:
            sp, order = torch.sort(e, dim=-1, descending=True)
            sp.masked_fill_(torch.cumsum(sp, dim=-1) - sp >= (top_p * total).float(), 0.0)
            tokens = order.gather(-1, _draw(sp, u, _tile_sums(sp))[0][:, None]).squeeze(-1)
        log_total, shift = total.squeeze(-1).log().float(), 0.0
    else:
        # Each chunk's weights relative to the chunk's own max; its tiles rescaled to the row's max.
        maxes, tile_sums, tile_scale, top, width = _chunk_weights(e, temperature, suppress)
        tokens, log_total = _draw(e, u, tile_sums, tile_scale)
        shift = (maxes.gather(1, (tokens // width)[:, None]) - top).squeeze(-1)
    # log p of the drawn token from its unnormalised weight exp(z_t - max) (relative error ~1e-7)
    # -- its chunk's max, then the chunk's offset: the rescaled weight could underflow where this
    # does not. A drawn token has weight > 0; one rare enough to be denormal (log p < -87) is
    # drawn about never.
    logp = e.gather(-1, tokens[:, None]).squeeze(-1).log() + shift - log_total
    return tokens, logp
