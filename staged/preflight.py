"""Before the model loads: every stage's data and the eval files, opened and checked.

A wrong path or a bad row in stage 3 used to fail after stages 1-2 had trained (each stage read its
files when it started). ``train`` now calls :func:`check_data` on rank 0 before anything heavy: it
loads every stage's files and the eval files as the stages will (format, column mapping, every
row, each image's header), counts each stage's rows (``epochs`` -> steps) and collects every
problem into one :class:`PreflightError`, which every rank raises and the CLI prints once (no
traceback), exit status 2. Images are not decoded here (staged.data.images), so this costs a read
of the data files and of each image's header.
"""
from __future__ import annotations

from staged.config import TrainConfig
from staged.resume import RefuseStart


class PreflightError(RefuseStart):
    """Data or eval files that would fail a stage: all of them, one per line."""


def drop_overlong(samples: list, stage, processor) -> tuple[list, int]:
    """(the samples whose prompt fits data.max_prompt_tokens, how many were dropped)."""
    limit = stage.data.max_prompt_tokens
    if limit is None:
        return samples, 0
    from staged.data.prompting import prompt_length

    opts = {"system_prompt": stage.system_prompt, "prompt_template": stage.prompt_template,
            "min_pixels": stage.data.min_pixels, "max_pixels": stage.data.max_pixels}
    kept = [s for s in samples if prompt_length(processor, s, **opts) <= limit]
    return kept, len(samples) - len(kept)


def stage_rows(stage, processor=None, *, verify_images: bool = True) -> int:
    """Rows of a stage's data, loaded and validated as the stage will load them (overlong prompts
    dropped when data.max_prompt_tokens is set: that needs the processor)."""
    d = stage.data
    if d.synthetic is not None:  # (max_prompt_tokens is for files: DataConfig refuses it here)
        return d.num_samples * (len(d.synthetic) if isinstance(d.synthetic, list) else 1)
    from staged.data.files import load_dataset_files

    ds = load_dataset_files(d.files, image_dir=d.image_dir, format=d.format, fields=d.fields or None,
                            on_bad_row=d.on_bad_row, default_task=d.default_task, verify_images=verify_images)
    if ds.skipped:
        print(f"stage {stage.name!r}: {ds.report()}")
    samples = ds.samples
    samples, dropped = drop_overlong(samples, stage, processor)
    if dropped:
        print(f"stage {stage.name!r}: {dropped} rows dropped, prompt longer than "
              f"data.max_prompt_tokens={d.max_prompt_tokens}")
    if not samples:
        raise ValueError(f"no samples in {d.files}"
                         + (f" with a prompt of <= {d.max_prompt_tokens} tokens" if dropped else ""))
    return len(samples)


def needs_processor(cfg: TrainConfig) -> bool:
    return any(s.data.max_prompt_tokens is not None for s in cfg.stages)


def check_data(cfg: TrainConfig, processor=None) -> list[int]:
    """Rows per stage; raises PreflightError naming every stage (and the eval files) that would fail:
    file not found, unknown format or column, a bad row (file, line, field), a missing or unreadable
    image, an epochs count that leaves no step."""
    rows, problems = [], []
    for i, stage in enumerate(cfg.stages):
        try:
            n = stage_rows(stage, processor)
            if stage.epochs is not None:
                stage.steps_for(n)  # raises when drop_last leaves no step
            rows.append(n)
        except (ValueError, OSError, ImportError) as e:  # DataError is a ValueError
            rows.append(0)
            problems.append(f"stages[{i}] '{stage.name}': {e}")
    if cfg.eval.files:
        from staged.eval import load_benchmarks

        try:
            load_benchmarks(cfg.eval.files, image_dir=cfg.eval.image_dir, fields=cfg.eval.fields or None)
        except (ValueError, OSError, ImportError) as e:
            problems.append(f"eval.files: {e}")
    if problems:
        raise PreflightError("the data would fail before training ends; nothing was trained:\n  "
                             + "\n  ".join(problems))
    return rows


def resolve_steps(cfg: TrainConfig, rows: list[int]) -> list[str]:
    """Set each epochs-stage's steps from its row count; returns one line per such stage."""
    lines = []
    for stage, n in zip(cfg.stages, rows):
        if stage.epochs is not None:
            stage.resolve_steps(n)
            per = n // stage.batch.prompts_per_step if stage.drop_last else -(-n // stage.batch.prompts_per_step)
            lines.append(f"stage '{stage.name}': {n} rows, {per} steps per epoch x {stage.epochs} epochs = "
                         f"{stage.steps} steps" + (" (drop_last)" if stage.drop_last else ""))
    return lines
