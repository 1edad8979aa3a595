"""The two-level inverse-CDF sampler draws from softmax(logits / T) (top-p truncated and
renormalised when top_p < 1) over a vocabulary larger than and not a multiple of its tile:
chi-square against the exact distribution (float64) on many counter-based draws."""
import math

import pytest
import torch

from staged.rollout import plan, sampler
from staged.rollout.sampler import TILE, row_seed, sample_tokens, uniform_from_seed


def expected(logits: torch.Tensor, temperature: float, top_p: float, suppress=None) -> torch.Tensor:
    z = logits.double() / temperature
    if suppress is not None:
        z = z.masked_fill(suppress, float("-inf"))
    p = torch.softmax(z, -1)
    if top_p < 1.0:
        sp, order = torch.sort(p, descending=True)
        keep = (torch.cumsum(sp, 0) - sp) < top_p
        q = torch.zeros_like(p)
        q[order[keep]] = sp[keep]
        p = q / q.sum()
    return p


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """Upper tail of the chi-square statistic (bins with expected count < 5 pooled), by the
    Wilson-Hilferty normal approximation."""
    e = probs * n
    big = e >= 5
    obs, exp = counts[big].double(), e[big]
    rest_obs, rest_exp = counts[~big].double().sum(), e[~big].sum()
    if rest_exp > 0:  # the small bins pooled into one (folded into the last big bin if still < 5)
        if rest_exp >= 5:
            obs, exp = torch.cat([obs, rest_obs.view(1)]), torch.cat([exp, rest_exp.view(1)])
        else:
            obs[-1] += rest_obs
            exp[-1] += rest_exp
    stat = float(((obs - exp) ** 2 / exp).sum())
    k = max(1, len(exp) - 1)
    zscore = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(zscore / math.sqrt(2))


@pytest.mark.parametrize("V,temperature,top_p", [(2500, 1.0, 1.0), (2500, 0.6, 0.95), (TILE, 1.3, 1.0), (37, 1.0, 0.7)])
def test_draws_follow_the_distribution(V, temperature, top_p):
    gen = torch.Generator().manual_seed(V)
    logits = torch.randn(V, generator=gen) * 2.5
    suppress = torch.zeros(V, dtype=torch.bool)
    suppress[torch.randint(0, V, (5,), generator=gen)] = True
    check_draws(logits, temperature, top_p, suppress)


@pytest.mark.parametrize("V,temperature,top_p", [(2500, 0.6, 0.95), (37, 1.0, 0.7)])
def test_sorted_nucleus_draws_follow_the_distribution(monkeypatch, V, temperature, top_p):
    """The nucleus by a sort (the GPU's path: no host sync, no atomics), drawn in sorted order."""
    monkeypatch.setitem(plan.PLANS, "cpu", plan.CUDA)
    test_draws_follow_the_distribution(V, temperature, top_p)


def test_vocabulary_chunks_follow_the_distribution(monkeypatch):
    """On a CPU the sampler takes the vocabulary in chunks of CHUNK columns, each exponentiated
    against its own max and rescaled to the row's (sampler._chunk_weights): chunks of two tiles
    here, a later chunk's max well above the first's and a middle chunk all suppressed -- still
    the whole distribution's draws and log-probs."""
    monkeypatch.setattr(sampler, "CHUNK", 2 * TILE)
    V = 5000
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(V, generator=gen) * 2.5
    logits[4 * TILE:] += 3.0
    suppress = torch.zeros(V, dtype=torch.bool)
    suppress[2 * TILE:4 * TILE] = True
    suppress[torch.randint(0, V, (5,), generator=gen)] = True
    for temperature in (1.0, 0.7):
        check_draws(logits, temperature, 1.0, suppress)


def check_draws(logits, temperature, top_p, suppress):
    """30,000 counter-based draws from one row's ``logits``: their log-probs are the full
    distribution's, no token outside the support, and the counts pass the chi-square test."""
    V = logits.shape[0]
    n, chunk = 30000, 6000
    counts = torch.zeros(V, dtype=torch.long)
    for c in range(0, n, chunk):
        seeds = torch.tensor([row_seed(11, V, i) for i in range(c, c + chunk)])
        tok, logp = sample_tokens(logits.expand(chunk, V), uniform_from_seed(seeds, 0), temperature, top_p, suppress)
        counts += torch.bincount(tok, minlength=V)
        full = torch.log_softmax((logits / temperature).masked_fill(suppress, float("-inf")).double(), -1)
        torch.testing.assert_close(logp.double(), full[tok], atol=1e-5, rtol=0)  # the full distribution's log-prob
    p = expected(logits, temperature, top_p, suppress)
    assert counts[p == 0].sum() == 0, "a token outside the support was drawn"
    assert chi_square_p_value(counts, p, n) > 1e-4


def test_a_wrong_distribution_fails_the_check():
    """The chi-square check has power: draws from T = 1.0 judged against T = 1.1 fail."""
    V, n = 2500, 30000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2.5
    seeds = torch.tensor([row_seed(3, i) for i in range(n)])
    counts = torch.zeros(V, dtype=torch.long)
    for c in range(0, n, 6000):
        tok, _ = sample_tokens(logits.expand(6000, V), uniform_from_seed(seeds[c:c + 6000], 0), 1.0, 1.0)
        counts += torch.bincount(tok, minlength=V)
    assert chi_square_p_value(counts, expected(logits, 1.0, 1.0), n) > 1e-4
    assert chi_square_p_value(counts, expected(logits, 1.1, 1.0), n) < 1e-6


def test_per_row_token_index():
    seeds = torch.tensor([row_seed(0, i) for i in range(6)])
    t = torch.tensor([0, 5, 2, 9, 1, 3])
    u = uniform_from_seed(seeds, t)
    assert torch.equal(u, torch.stack([uniform_from_seed(seeds[i:i + 1], int(t[i]))[0] for i in range(6)]))


def test_nearby_seeds_give_unrelated_streams():
    """A caller's seeds ``arange(B)`` (or base + i): row s + 1 must not replay row s's uniforms one
    token later (the token index once went into the seed's low bits: u(s, t + 1) == u(s + 1, t))."""
    seeds = torch.arange(2000)
    u = torch.stack([uniform_from_seed(seeds, t) for t in range(17)], 1)  # [2000, 17]
    for shift in (1, 2, 5):
        assert not (u[shift:, :-shift] == u[:-shift, shift:]).any(), shift
    first = u[:, 0]  # across rows at one token: uniform (Kolmogorov-Smirnov, n = 2000: D < 0.05)
    ks = (torch.sort(first).values - (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000).abs().max()
    assert ks < 0.05, float(ks)


def test_suppress_by_ids_equals_suppress_by_mask():
    from staged.rollout.sampler import suppress_index, suppress_mask

    gen = torch.Generator().manual_seed(12)
    V = 3000
    ids = torch.randint(0, V, (40,), generator=gen).tolist() + [V + 5]  # one id past the vocabulary
    logits = torch.randn(64, V, generator=gen) * 3
    u = uniform_from_seed(torch.tensor([row_seed(4, i) for i in range(64)]), 0)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        a = sample_tokens(logits, u, temperature, top_p, suppress_mask(ids, V, "cpu"))
        b = sample_tokens(logits.clone(), u, temperature, top_p, suppress_index(ids, V, "cpu"), inplace=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not set(a[0].tolist()) & set(ids)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_rows_draw_ignores_the_rows_beside_it_with_two_threads(top_p):
    """With more than one thread torch splits a lone row's reduction across threads (another
    rounding than the same row's among others): the sampler's totals come from per-tile sums, so a
    row's token and log-prob are the same bits alone and among 40 rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(3)
        logits = torch.randn(40, 151_936, generator=gen) * 0.5  # flat: totals large, log-probs near -12
        u = torch.rand(40, generator=gen, dtype=torch.float64)
        tok, lp = sample_tokens(logits, u, 0.8, top_p)
        for r in range(40):
            t1, l1 = sample_tokens(logits[r:r + 1], u[r:r + 1], 0.8, top_p)
            assert int(t1) == int(tok[r]) and torch.equal(l1[0], lp[r]), r
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("V,scale", [(151_936, 0.5), (151_936, 2.0), (151_936, 8.0), (2500, 3.0), (37, 1.0)])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_the_nucleus_is_the_most_likely_tokens_whose_mass_reaches_top_p(V, scale, top_p):
    """The radix-select nucleus (no sort of the vocabulary) against a float64 sort: the same tokens
    for rows from flat (a random model's: ~120k tokens at 0.9) to peaked (a handful)."""
    gen = torch.Generator().manual_seed(V + int(scale * 10))
    logits = torch.randn(6, V, generator=gen) * scale
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    total = e.double().sum(-1, keepdim=True)
    tau = sampler._nucleus_threshold(e.contiguous(), top_p * total)
    sp, order = torch.sort(e.double(), -1, descending=True)
    want = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, order, (sp.cumsum(-1) - sp) < top_p * total)
    got = e >= tau
    # the same tokens, but for ties at the boundary: a sort keeps some of equal weights (which
    # ones is the sort's choice), the threshold keeps them all
    assert (want & ~got).sum() == 0
    assert torch.equal(e[got & ~want], tau.expand_as(e)[got & ~want])
    assert torch.equal(e.masked_fill(~want, float("inf")).amin(-1, keepdim=True), tau)
