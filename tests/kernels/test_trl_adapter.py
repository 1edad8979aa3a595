"""staged.kernels.trl_adapter against TRL's own GRPOTrainer (trl 1.16), offline and on CPU.

A tiny Qwen2ForCausalLM built from a config and a WordLevel tokenizer built in the test are saved
to a temporary directory (TRL loads the policy and the reference model from there: nothing is
downloaded); the prompts are an in-memory ``datasets.Dataset``; generation is TRL's own
(``use_vllm=False``).

* the same prepared batch through TRL's ``_compute_loss`` and the patched one: loss, every
  parameter gradient and the logged metrics agree, over loss types, KL, off-policy old log-probs,
  sequence-level ratios, gradient accumulation, tool masks and eval mode;
* two optimizer steps of ``GRPOTrainer.train()`` against ``FusedGRPOTrainer.train()`` from the same
  seed: the same logged losses and the same parameters afterwards;
* configurations the fused path does not reproduce raise.
"""
from __future__ import annotations

import os

import pytest
import torch

try:
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    _ERR = None
except Exception as exc:  # noqa: BLE001 - any import failure means: skip with the reason
    _ERR = f"trl / transformers / datasets not importable: {type(exc).__name__}: {exc}"

pytestmark = pytest.mark.skipif(_ERR is not None, reason=_ERR or "")

from staged.kernels.trl_adapter import check_supported, patch_grpo_trainer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(45)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    hf_tok.save_pretrained(d)
    return str(d)


def _reward(completions, **kwargs):
    # varies within a group, so advantages are non-zero
    return [len(set(c.split())) / 4.0 for c in completions]


def _trainer(model_dir, cls=None, **overrides):
    kw = dict(output_dir=os.path.join(model_dir, "out"), per_device_train_batch_size=4, num_generations=4,
              max_completion_length=6, beta=0.04, learning_rate=0.05, optim="sgd", max_steps=2, logging_steps=1,
              report_to="none", use_cpu=True, save_strategy="no", seed=0, bf16=False, dataloader_num_workers=0,
              disable_tqdm=True)
    kw.update(overrides)
    ds = Dataset.from_dict({"prompt": [" ".join(f"w{(i * 3 + j) % 40 + 3}" for j in range(4)) for i in range(8)]})
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return (cls or GRPOTrainer)(model=model_dir, reward_funcs=_reward, args=GRPOConfig(**kw), train_dataset=ds,
                                processing_class=tok)


@pytest.fixture(scope="module")
def prepared(model_dir):
    """One trainer and one generated batch (TRL's own generation and scoring)."""
    tr = _trainer(model_dir)
    tr.model.train()
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    # shorter completions in some rows (as after an early EOS), so masks and lengths vary
    cm = inputs["completion_mask"].clone()
    cm[1, 4:] = 0
    cm[3, 2:] = 0
    inputs["completion_mask"] = cm
    with torch.no_grad():
        lp, _, _ = tr._get_per_token_logps_and_entropies(
            tr.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], cm], 1), inputs["completion_ids"].size(1))
    g = torch.Generator().manual_seed(1)
    old = lp + torch.randn(lp.shape, generator=g) * 0.15
    return tr, inputs, old


def _run(tr, fn, inputs):
    tr.model.zero_grad(set_to_none=True)
    tr._metrics["train"].clear()
    tr._metrics["eval"].clear()
    loss = fn(tr.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for m in tr._metrics.values() for k, v in m.items()}
    return loss.detach(), grads, metrics


CASES = [
    dict(),  # the trainer's config: dapo, beta 0.04, on-policy
    dict(loss_type="grpo", old=True),
    dict(loss_type="bnpo", old=True, delta=1.5, epsilon_high=0.28),
    dict(loss_type="dr_grpo", beta=0.0, old=True),
    dict(loss_type="dapo", old=True, importance_sampling_level="sequence", use_bias_correction_kl=False),
    dict(loss_type="cispo", old=True, epsilon_high=1.1, ga=2, spg=4),
    dict(loss_type="sapo", old=True, tool_mask=True),
    dict(loss_type="luspo", old=True, importance_sampling_level="sequence"),
    dict(loss_type="grpo", old=True, ga=3, eval=True),
    dict(loss_type="dapo", old=True, ga=2, spg=2),
    # TRL trains these with delta set and ignores it (issue 16: we raised at the first loss call)
    dict(loss_type="sapo", old=True, delta=1.5),
    dict(loss_type="cispo", old=True, epsilon_high=1.1, delta=2.0),
    dict(loss_type="vespo", old=True),
    dict(loss_type="vespo", old=True, importance_sampling_level="sequence", ga=2, spg=2),
]
# (temperature is covered by test_train_steps_match_trl: TRL bakes it into its fused head at init)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_compute_loss_matches_trl(case, prepared):
    tr, inputs, old = prepared
    base = dict(loss_type=tr.loss_type, beta=tr.beta, importance_sampling_level=tr.importance_sampling_level,
                epsilon_high=tr.epsilon_high)
    case = dict(case)
    inp = dict(inputs)
    if case.pop("old", False):
        inp["old_per_token_logps"] = old
    if case.pop("tool_mask", False):
        tm = torch.ones_like(inp["completion_mask"])
        tm[0, 1:3] = 0
        inp["tool_mask"] = tm
    tr.current_gradient_accumulation_steps = case.pop("ga", 1)
    spg = tr.args.steps_per_generation
    tr.args.steps_per_generation = case.pop("spg", spg)
    eval_mode = case.pop("eval", False)
    args_fields = {k: case.pop(k) for k in ("delta", "use_bias_correction_kl") if k in case}
    saved_args = {k: getattr(tr.args, k) for k in args_fields}
    for k, v in case.items():
        setattr(tr, k, v)
    for k, v in args_fields.items():
        setattr(tr.args, k, v)
    if eval_mode:
        tr.model.eval()
    try:
        want = _run(tr, lambda m, i: GRPOTrainer._compute_loss(tr, m, i), inp)
        patched = patch_grpo_trainer(tr)
        assert patched is tr
        got = _run(tr, tr._compute_loss, inp)
    finally:
        del tr._compute_loss  # back to TRL's method for the next case
        tr.model.train()
        tr.args.steps_per_generation = spg
        for k, v in base.items():
            setattr(tr, k, v)
        for k, v in saved_args.items():
            setattr(tr.args, k, v)
    (l1, g1, m1), (l2, g2, m2) = want, got
    assert torch.isfinite(l2)
    assert abs(l1.item() - l2.item()) <= 1e-5 * max(1.0, abs(l1.item())) + 1e-7, f"TRL {l1.item()} fused {l2.item()}"
    assert set(g1) == set(g2) and len(g1) > 10
    for name in g1:
        s = g1[name].abs().max().item()
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=2e-5 * s + 1e-8, msg=lambda m, n=name: f"{n}: {m}")
    assert set(m2) <= set(m1) and "entropy" in m2
    assert set(m1) - set(m2) <= {"clip_ratio/low_min", "clip_ratio/high_max"}
    for k in m2:
        assert abs(m1[k] - m2[k]) <= 1e-5 * max(1.0, abs(m1[k])), f"metric {k}: TRL {m1[k]} fused {m2[k]}"


PRECISIONS = {
    "fp32": dict(),
    # bf16 autocast with fp32 weights (the usual GPU setting): TRL's lm_head runs under autocast
    "bf16": dict(bf16=True),
    "bf16-fp32_head": dict(bf16=True, cast_lm_head_to_fp32=True),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_train_steps_match_trl(model_dir, precision):
    """Two optimizer steps of real GRPO training (generation, rewards, loss, SGD; temperature 0.7,
    KL to the reference model) from the same seed: TRL's trainer and FusedGRPOTrainer log the same
    losses and metrics and end at the same weights, in fp32 and under bf16 autocast."""
    from staged.kernels.trl_adapter import FusedGRPOTrainer

    results = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        tr = _trainer(model_dir, cls=cls, temperature=0.7, loss_type="grpo", **PRECISIONS[precision])
        tr.train()
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        results.append((losses, params, tr.state.log_history))
    (l1, p1, h1), (l2, p2, h2) = results
    assert len(l1) == len(l2) == 2
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)) + 1e-7, (l1, l2)
    start = {n: p.detach() for n, p in Qwen2ForCausalLM.from_pretrained(model_dir).named_parameters()}
    moved = max((p1[n] - start[n]).abs().max().item() for n in p1)
    assert moved > 1e-4, "the trainer did not update the weights; the comparison would be vacuous"
    for n in p1:
        torch.testing.assert_close(p2[n], p1[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    for step in (0, 1):
        for k in ("kl", "entropy", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"):
            assert abs(h1[step][k] - h2[step][k]) <= 1e-5 * max(1.0, abs(h1[step][k])), (step, k, h1[step][k], h2[step][k])
    # on-policy first step: TRL's reference log-probs are the current ones up to fp32 rounding
    # (an lm_head run in another precision than TRL's puts 1e-6 here)
    assert abs(h1[0]["kl"]) <= 1e-8 and abs(h2[0]["kl"]) <= 1e-8, (h1[0]["kl"], h2[0]["kl"])


@pytest.mark.parametrize("attr,value,needle", [
    ("top_entropy_quantile", 0.2, "top_entropy_quantile"),
    ("epsilon_high", 0.0, "eps_high"),  # with cispo below: rejected at patch time, not at the first loss
    ("sapo_temperature_neg", 0.0, "sapo_temperature_neg"),
    ("off_policy_mask_threshold", 0.5, "off_policy_mask_threshold"),
    ("_entropy_bonus_enabled", True, "entropy bonus"),
    ("aux_loss_enabled", True, "aux loss"),
])
def test_unsupported_configurations_raise(attr, value, needle, prepared):
    tr = prepared[0]
    obj = tr.args if attr == "sapo_temperature_neg" else tr
    old, old_lt = getattr(obj, attr), tr.loss_type
    setattr(obj, attr, value)
    tr.loss_type = {"epsilon_high": "cispo", "sapo_temperature_neg": "sapo"}.get(attr, old_lt)
    try:
        with pytest.raises(ValueError, match=needle):
            patch_grpo_trainer(tr)
    finally:
        setattr(obj, attr, old)
        tr.loss_type = old_lt
    assert "_compute_loss" not in vars(tr)


def test_scaled_logits_model_raises(prepared):
    tr = prepared[0]
    cfg = tr.model.config
    cfg.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match="final_logit_softcapping"):
            check_supported(tr)
    finally:
        cfg.final_logit_softcapping = None


def test_importing_the_adapter_does_not_import_trl():
    import subprocess
    import sys
    code = ("import sys; import staged.kernels.trl_adapter as a; assert 'trl' not in sys.modules, 'trl imported'; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32_weights", "bf16_weights"])
def test_lm_head_precision_matches_trl_chunked_logprob(weight_dtype, bias, backend):
    """The lm_head as TRL's fused head runs it under bf16 autocast (trl.kernels.ChunkedLogProbFunction,
    its CPU path; on CUDA its tile is the same bf16 GEMM output): log-probs, entropy and the gradients
    to hidden / weight / bias, on odd sizes. ``triton``: our kernels (the CUDA path; here under
    TRITON_INTERPRET), which round their logit tile to bf16 in-kernel."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1")
    from trl.kernels import ChunkedLogProbFunction

    from staged.kernels import fused_linear_logprob

    g = torch.Generator().manual_seed(3)
    N, H, V, temp = 37, 24, 301, 0.7
    h0 = torch.randn(N, H, generator=g)
    w0 = (torch.randn(V, H, generator=g) * 0.2).to(weight_dtype)
    b0 = (torch.randn(V, generator=g) * 0.1).to(weight_dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)
    outs = []
    for which in ("trl", "ours"):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True) if bias else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if which == "trl":
                lp, ent, *_ = ChunkedLogProbFunction.apply(h, w, b, t, temp, 64, None, 1.0, ("entropy",))
            else:
                lp, ent = fused_linear_logprob(h.to(w.dtype), w, t, temperature=temp, bias=b, return_entropy=True,
                                               backend=backend, logit_dtype=torch.bfloat16)
        ((lp * gl).sum() + (ent * ge).sum()).backward()
        outs.append((lp.detach(), ent.detach(), h.grad, w.grad, b.grad if bias else None))
    (l1, e1, gh1, gw1, gb1), (l2, e2, gh2, gw2, gb2) = outs
    # the logits are the same bf16 numbers; what is left is fp32 summation order
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e2, e1, rtol=1e-5, atol=1e-5)
    for a, b_, n in ((gh2, gh1, "hidden"), (gw2, gw1, "weight"), (gb2, gb1, "bias")):
        if b_ is None:
            continue
        assert a.dtype == b_.dtype, n
        # the logits' gradient is rounded to bf16 on both sides: an fp32-order difference may
        # round one element to the neighbouring bf16 value (2^-8 relative)
        torch.testing.assert_close(a.float(), b_.float(), rtol=4e-3, atol=4e-3 * b_.float().abs().max().item(),
                                   msg=lambda m, n=n: f"grad {n}: {m}")
    # without the logit dtype the fp32 head is measurably different (this test would notice)
    lp32 = fused_linear_logprob(h0.to(w0.dtype), w0, t, temperature=temp, bias=b0, backend="torch")
    assert (lp32 - l1).abs().max().item() > 1e-3
