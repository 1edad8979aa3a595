"""staged: staged RL post-training of vision-language models on fused Triton kernels."""

__version__ = "0.1.0"
