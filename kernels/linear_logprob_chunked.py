"""Chunked PyTorch linear -> log-prob (+ entropy): the CPU path of ``fused_linear_logprob``.

Shapes and dtypes (validated by the caller, ``staged.kernels.linear_logprob``)
    hidden  : [N, H]  bf16 / fp16 / fp32 / fp64
    weight  : [V, H]  same dtype as hidden
    bias    : [V]     optional
    targets : [N]     int, 0 <= t < V
    out     : logp [N], entropy [N] in fp32 (fp64 for fp64 inputs)

Same maths and same recompute-in-backward design as the Triton kernels, with torch ops on
chunks of C tokens: the forward keeps only lse[N] and entropy[N]; the backward recomputes each
chunk's logits. Peak extra memory is ~3 x C x V x 4 bytes (logits, log-sum-exp's temporary and
p) plus the fp32 dW accumulator [V, H] (which *is* the returned gradient for fp32 weights), never
N x V. bf16/fp16 inputs are upcast to fp32 before the GEMMs (one fp32 copy of W, V x H x 4
bytes), so the CPU path is as accurate as the Triton one, which accumulates in fp32.

FLOPs: 2NHV forward, 6NHV backward (recompute, dH, dW) — 8NHV, as for the kernels.
Measured (benchmarks/bench_linear_logprob.py, fp32, N=4096, V=152064, H=256, forward + backward):
peak extra RSS 155 MB beyond the dH + dW gradients, against 11.7 GB for the naive logits path.
"""
from __future__ import annotations

import torch

# Bytes of one chunk's fp32 logits. 32 MiB at V = 152064 is C = 55 tokens, still a GEMM with
# enough rows for the CPU BLAS while the three C x V buffers stay ~100 MB.
CHUNK_BYTES = 32 * 2**20


def _chunk_rows(V: int, elem: int) -> int:
    return max(1, CHUNK_BYTES // (V * elem))


def _tempered_logits(h_c, w, b, temperature, logit_dtype=None, cd=torch.float32):
    if logit_dtype is not None:
        # TRL's lm_head under autocast: a GEMM in the half dtype whose logits are rounded to it
        # (bias added in it too), then fp32 from there on (trl.kernels.chunked_logprob)
        z = h_c.to(logit_dtype) @ w.t()
        if b is not None:
            z.add_(b)
        z = z.to(cd)
    else:
        z = torch.addmm(b, h_c, w.t()) if b is not None else h_c @ w.t()
    return z.div_(temperature) if temperature != 1.0 else z


class _ChunkedLinearLogprob(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, logit_dtype=None):
        cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        N, V = hidden.shape[0], weight.shape[0]
        w = weight.to(logit_dtype or cd)
        b = bias.to(logit_dtype or cd) if bias is not None else None
        logp = torch.empty(N, dtype=cd, device=hidden.device)
        lse = torch.empty(N, dtype=cd, device=hidden.device)
        ent = torch.zeros(N, dtype=cd, device=hidden.device)
        rows = _chunk_rows(V, torch.finfo(cd).bits // 8)
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            z = _tempered_logits(hidden[n0:n1].to(logit_dtype or cd), w, b, temperature, logit_dtype, cd)
            lse_c = torch.logsumexp(z, dim=1)
            lse[n0:n1] = lse_c
            logp[n0:n1] = z.gather(1, targets[n0:n1, None]).squeeze(1) - lse_c
            if with_entropy:
                logp_all = z.sub_(lse_c[:, None])
                # -sum p log p directly: lse - sum p z would cancel two large numbers.
                ent[n0:n1] = -torch.exp(logp_all).mul_(logp_all).sum(1)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature = temperature
        ctx.logit_dtype = logit_dtype
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        if torch.is_grad_enabled():
            raise RuntimeError("fused_linear_logprob: double backward (create_graph=True) is not supported: "
                               "the backward recomputes the logits in place and is not itself differentiable")
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        ld = ctx.logit_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if (g_logp is None and g_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        T = ctx.temperature
        cd = lse.dtype
        N, V = hidden.shape[0], weight.shape[0]
        w = weight.to(ld or cd)
        b = bias.to(ld or cd) if bias is not None else None
        # with a logit dtype the GEMMs read the operands rounded to it, accumulating in fp32 (TRL)
        w_mm = w.to(cd) if ld is not None else w
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        db = torch.zeros(V, dtype=cd, device=hidden.device) if need_b else None
        g_l = g_logp.to(cd) if g_logp is not None else None
        g_e = g_ent.to(cd) if g_ent is not None else None
        rows = _chunk_rows(V, torch.finfo(cd).bits // 8)
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            h_c = hidden[n0:n1].to(ld or cd)
            logp_all = _tempered_logits(h_c, w, b, T, ld, cd).sub_(lse[n0:n1, None])
            p = torch.exp(logp_all)
            # dz = g_logp (onehot - p) - g_ent p (log p + ent), built in the two buffers above.
            if g_e is not None:
                ent_term = logp_all.add_(ent[n0:n1, None]).mul_(p).mul_(g_e[n0:n1, None])
            if g_l is not None:
                dz = p.mul_(-g_l[n0:n1, None])
                rows_idx = torch.arange(n1 - n0, device=p.device)
                dz[rows_idx, targets[n0:n1]] += g_l[n0:n1]
            else:
                dz = p.zero_()
            if g_e is not None:
                dz.sub_(ent_term)
            if T != 1.0:
                dz.div_(T)
            if ld is not None:
                dz = dz.to(ld).to(cd)  # TRL writes the logits' gradient into its half tile
                h_c = h_c.to(cd)
            if need_h:
                dh[n0:n1] = dz @ w_mm
            if need_w:
                dw.addmm_(dz.t(), h_c)
            if need_b:
                db += dz.sum(0)
            del logp_all, p, dz
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return dh, dw, db, None, None, None, None


def chunked_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           temperature: float = 1.0, bias: torch.Tensor | None = None,
                           with_entropy: bool = True, logit_dtype: torch.dtype | None = None):
    """(logp [N], entropy [N]) by chunks of tokens; entropy is zeros when not ``with_entropy``.
    Inputs are 2-D/1-D and already validated (see ``fused_linear_logprob``). ``logit_dtype``
    (bf16 / fp16): the GEMM runs in it and the logits are rounded to it, as an lm_head under
    autocast does; gradients come back in the inputs' dtypes, accumulated in fp32."""
    return _ChunkedLinearLogprob.apply(hidden, weight, bias, targets, float(temperature),
                                       bool(with_entropy), logit_dtype)


__all__ = ["chunked_linear_logprob", "CHUNK_BYTES"]
