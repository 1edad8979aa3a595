"""One training example, whatever its source (synthetic, EasyR1 JSONL, verl parquet, TRL-style)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """A prompt with its images and ground truth.

    prompt: the user text. Images are placed by the prompt builder (staged.data.prompting): one image
        placeholder per image, in order, before the text; or where the prompt says `<image>` (EasyR1's
        convention), one `<image>` per image.
    answer: the ground truth the verifier checks (an MCQ letter, a number, a caption, ...).
    task: chooses the verifier: "mcq" | "number" | "math" | "count" | "caption" | ...
    images: in placeholder order: PIL images (synthetic data) or staged.data.images.ImageRef (rows of
        files: header-checked at load, decoded on use by staged.data.images.materialize).
    pass_rate: difficulty for the curriculum, in [0, 1] (higher = easier); None when unknown.
    extra: metadata handed to reward functions (the synthetic generator records what it drew).
    reference_response: a gold response in the answer format, for the format warm-up / SFT.
    """

    prompt: str
    answer: str
    task: str
    images: list = field(default_factory=list)
    pass_rate: float | None = None
    extra: dict = field(default_factory=dict)
    reference_response: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise TypeError(f"Sample.prompt must be str, got {type(self.prompt).__name__}")
        if not isinstance(self.answer, str):
            self.answer = str(self.answer)
        if self.pass_rate is not None and not (0.0 <= float(self.pass_rate) <= 1.0):
            raise ValueError(f"Sample.pass_rate must be in [0, 1] or None, got {self.pass_rate}")
        if self.images is None:
            self.images = []
