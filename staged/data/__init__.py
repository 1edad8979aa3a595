"""Data: the Sample record, synthetic generators for the embedded default, prompt/batch building."""
from .sample import Sample
from .synthetic import KINDS as SYNTHETIC_KINDS, make_synthetic_dataset

__all__ = ["Sample", "make_synthetic_dataset", "SYNTHETIC_KINDS"]
