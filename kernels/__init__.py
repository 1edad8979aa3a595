"""Fused Triton kernels of staged, installed as ``staged.kernels``.

Each op lives in one file beside its autograd Function; its plain-PyTorch reference lives in
``staged.kernels.reference`` where tests and benchmarks import it.
"""
from staged.kernels.linear_logprob import fused_linear_logprob, fused_linear_logprob_workspace  # noqa: E402,F401
from staged.kernels.grpo_loss import grpo_loss  # noqa: E402,F401
from staged.kernels.fused_linear_grpo import (  # noqa: E402,F401
    FusedLinearGRPOFunction, FusedLinearGRPOLoss, LigerFusedLinearGRPOFunction, fused_linear_grpo_loss,
    liger_fused_linear_grpo,
)
from staged.kernels.trl_adapter import patch_grpo_trainer  # noqa: E402,F401  (imports trl lazily)
