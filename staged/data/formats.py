"""The dataset formats users already have, and how their columns map onto a Sample.

Three formats, told apart by their columns (`detect_format`):

  easyr1  {"problem": "<image>Which ...?", "answer": "C", "images": ["imgs/a.png"]}
          EasyR1's RLHFDataset with prompt_key="problem"; the paper's release (VLM-CapCurriculum) uses it.
  verl    {"prompt": [{"role": "user", "content": "<image>..."}], "images": [{"bytes": ...}],
           "reward_model": {"style": "rule", "ground_truth": "3"}, "data_source": ..., "extra_info": {...}}
  trl     {"prompt": "..." or a chat list, "image": ... or "images": [...], "solution": "..." (or "answer")}

An `image_path` column also counts as the images (the paper's data pipeline, format_for_training.py, writes
{"prompt": "<image>...", "answer": "A", "image_path": ["x.jpg"]} for EasyR1's image_key=image_path).

Detection (first match wins): a `reward_model` column -> verl; a `problem` column -> easyr1; a `prompt`
column -> trl. `fields` maps our names onto yours ({"prompt": "question", "answer": "gt"}); a dotted
name reaches into a nested dict ("reward_model.ground_truth", "extra_info.pass_rate"). When no format
matches but `fields` names both the prompt and the answer column, the file loads as "custom".

Values are parsed by their type, not by the format: a prompt is a string or a chat list whatever the
format says, and an image is a path, bytes, a {"bytes", "path"} dict (HF datasets' Image feature in
Parquet) or a {"image": ...} dict (verl). This module knows columns and prompts; staged.data.files
reads files, opens images and validates.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

IMAGE_MARKER = "<image>"  # the canonical placeholder; the same string as staged.data.prompting.IMAGE_MARKER

# Our field names (the keys of `fields`). prompt and answer are required in every row; the rest optional.
FIELD_NAMES = ("prompt", "answer", "images", "task", "pass_rate", "reference_response")
FORMAT_NAMES = ("auto", "easyr1", "verl", "trl")

# Placeholders other tools write for one image, all rewritten to IMAGE_MARKER. Qwen's own
# <|vision_start|><|image_pad|><|vision_end|> counts as one image however many pads it holds.
_IMAGE_PLACEHOLDER = re.compile(
    r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>|<\|image_pad\|>|<\|image\|>|<image>")
_VIDEO_PLACEHOLDER = re.compile(r"<video>|<\|video_pad\|>")


class FieldError(Exception):
    """A bad value in one row: `field` (a column name as the file spells it), `index` (the position in
    a list field, else None), `reason`. staged.data.files adds the file and the row."""

    def __init__(self, field: str | None, reason: str, index: int | None = None):
        super().__init__(reason)
        self.field, self.reason, self.index = field, reason, index


@dataclass(frozen=True)
class FormatSpec:
    """Candidate column names for each of our fields, first present wins (resolved once per file)."""

    name: str
    prompt: tuple[str, ...]
    answer: tuple[str, ...]
    images: tuple[str, ...]
    task: tuple[str, ...] = ("task",)
    pass_rate: tuple[str, ...] = ("pass_rate",)
    reference_response: tuple[str, ...] = ("reference_response",)

    def with_fields(self, fields: dict[str, str] | None) -> FormatSpec:
        if not fields:
            return self
        return replace(self, **{k: (v,) for k, v in fields.items()})


FORMATS = {
    "verl": FormatSpec("verl", prompt=("prompt",), answer=("reward_model.ground_truth",), images=("images",)),
    "easyr1": FormatSpec("easyr1", prompt=("problem",), answer=("answer",), images=("images", "image_path")),
    "trl": FormatSpec("trl", prompt=("prompt",), answer=("solution", "answer"),
                      images=("images", "image", "image_path")),
}
_SIGNATURE = {"verl": "reward_model", "easyr1": "problem", "trl": "prompt"}  # the column that names a format
_CUSTOM = FormatSpec("custom", prompt=(), answer=("answer", "solution"), images=("images", "image", "image_path"))


def check_fields(fields: dict | None) -> dict[str, str]:
    """`fields` must map our names (FIELD_NAMES) to non-empty column names: a config error, raised at once."""
    fields = dict(fields or {})
    for k, v in fields.items():
        if k not in FIELD_NAMES:
            raise ValueError(f"fields: unknown field {k!r}; expected one of {', '.join(FIELD_NAMES)} "
                             "(every other column goes to Sample.extra as it is)")
        if not isinstance(v, str) or not v:
            raise ValueError(f"fields[{k!r}] must be a column name (str), got {v!r}")
    return fields


def _top(column: str) -> str:
    return column.split(".", 1)[0]


def _has(columns, column: str) -> bool:
    return column in columns or _top(column) in columns


def detect_format(columns, fmt: str, fields: dict[str, str]) -> FormatSpec | None:
    """The format of a file with these top-level `columns`; None when nothing matches (unknown format)."""
    if fmt != "auto":
        return FORMATS[fmt].with_fields(fields)
    for name, column in _SIGNATURE.items():
        if column in columns:
            return FORMATS[name].with_fields(fields)
    if "prompt" in fields and "answer" in fields:
        return _CUSTOM.with_fields(fields)
    return None


@dataclass(frozen=True)
class Columns:
    """A FormatSpec resolved against one file's columns: the column each field is read from (None: absent)."""

    format: str
    prompt: str
    answer: str
    images: str | None
    task: str | None
    pass_rate: str | None
    reference_response: str | None

    @property
    def consumed(self) -> set[str]:
        """Top-level columns read whole into a Sample field; every other column goes to Sample.extra.
        A dotted name does not consume its parent (verl's reward_model dict stays in extra, style and all)."""
        return {c for c in (self.prompt, self.answer, self.images, self.task, self.pass_rate,
                            self.reference_response) if c is not None and "." not in c}


def resolve_columns(spec: FormatSpec, columns, fields: dict[str, str]) -> tuple[Columns | None, str | None]:
    """(Columns, None), or (None, the missing field) when the prompt or answer column is absent, or a
    column the user named in `fields` is (a mapping that matches nothing is a mistake, not an option)."""
    picked = {}
    for name in FIELD_NAMES:
        picked[name] = next((c for c in getattr(spec, name) if _has(columns, c)), None)
    for required in ("prompt", "answer", *fields):
        if picked[required] is None:
            return None, required
    return Columns(format=spec.name, **picked), None


_MISSING = object()


def get_value(row: dict, column: str):
    """row[column]; a dotted column reaches into nested dicts unless the row has that literal key.
    Returns _MISSING when absent (a null value reads as None)."""
    if column in row:
        return row[column]
    if "." not in column:
        return _MISSING
    value = row
    parts = column.split(".")
    for i, part in enumerate(parts):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise FieldError(column, f"{'.'.join(parts[:i])!r} is a {type(value).__name__}, not a dict")
        if part not in value:
            return _MISSING
        value = value[part]
    return value


def is_missing(value) -> bool:
    return value is _MISSING or value is None


# ---------------------------------------------------------------------------------------------------
# prompts

_IMAGE_SOURCE_KEYS = ("image", "path", "url", "image_url")


def normalise_text(text: str, field: str) -> str:
    """Every known image placeholder -> IMAGE_MARKER; video placeholders are an error."""
    if _VIDEO_PLACEHOLDER.search(text):
        raise FieldError(field, "video inputs are not supported (found a <video> placeholder)")
    return _IMAGE_PLACEHOLDER.sub(IMAGE_MARKER, text)


def _content_text(content, field: str, turn: int) -> tuple[str, list]:
    """One message's content (a string, or a list of {"type": "text"|"image", ...} parts) -> (text with
    IMAGE_MARKER per image part, the inline image sources of the image parts, None where a part has none)."""
    if isinstance(content, str):
        return normalise_text(content, field), []
    if not isinstance(content, list):
        raise FieldError(field, f"message content must be a string or a list of parts, got "
                                f"{type(content).__name__}", turn)
    pieces, inline = [], []
    for part in content:
        if isinstance(part, str):
            pieces.append(normalise_text(part, field))
            continue
        if not isinstance(part, dict):
            raise FieldError(field, f"content part must be a dict, got {type(part).__name__}", turn)
        kind = part.get("type") or ("text" if part.get("text") is not None else None)
        if kind == "text":
            pieces.append(normalise_text(part.get("text") or "", field))
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_MARKER)
            source = next((part[k] for k in _IMAGE_SOURCE_KEYS if part.get(k) is not None), None)
            if isinstance(source, dict) and "url" in source:  # OpenAI's {"image_url": {"url": ...}}
                source = source["url"]
            inline.append(source)
        elif kind == "video":
            raise FieldError(field, "video inputs are not supported (found a video content part)", turn)
        else:
            raise FieldError(field, f"unknown content part type {kind!r} (expected text or image)", turn)
    return "".join(pieces), inline


def parse_prompt(value, field: str) -> tuple[str, list, str | None]:
    """A prompt value -> (text with canonical markers, inline image sources, system prompt or None).

    A string is the user text. A chat list may hold system messages and exactly one user message; its
    other turns (assistant, tool, a second user) are an error: a prompt here is one user turn.
    """
    if isinstance(value, str):
        return normalise_text(value, field), [], None
    if not isinstance(value, list):
        raise FieldError(field, f"expected a string or a chat list, got {type(value).__name__}")
    system, user = [], None
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise FieldError(field, "expected a chat message {'role': ..., 'content': ...}, got "
                                    f"{_short(message)}", turn)
        role = message["role"]
        text, inline = _content_text(message["content"], field, turn)
        if role == "system":
            if inline:
                raise FieldError(field, "images in a system message are not supported", turn)
            system.append(text)
        elif role == "user":
            if user is not None:
                raise FieldError(field, "more than one user message: multi-turn prompts are not supported", turn)
            user = (text, inline)
        else:
            raise FieldError(field, f"role {role!r} not supported: a prompt is one user turn "
                                    "(optionally after a system message)", turn)
    if user is None:
        raise FieldError(field, "chat has no user message")
    return user[0], user[1], ("\n".join(system) if system else None)


# ---------------------------------------------------------------------------------------------------
# scalar fields


def _short(value, n: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_answer(value, field: str) -> str:
    """A string, or a number (written as str); not empty, not a list/dict/bool, not NaN."""
    if is_missing(value):
        raise FieldError(field, "missing answer")
    if _is_number(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldError(field, f"answer is {value}")
        return str(value)
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string or a number, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise FieldError(field, "empty answer")
    return value


def parse_pass_rate(value, field: str) -> float | None:
    """None when absent; else a real number in [0, 1] (NaN, strings and bools are errors)."""
    if is_missing(value):
        return None
    if not _is_number(value):
        raise FieldError(field, f"expected a number in [0, 1], got {type(value).__name__} {_short(value)}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise FieldError(field, f"expected a number in [0, 1], got {value}")
    return value


def parse_task(value, field: str | None, default: str | None) -> str:
    if is_missing(value):
        if default is None:
            raise FieldError(field or "task", "missing task (it chooses the verifier): add a 'task' column, "
                                              "map one with fields={'task': ...}, or pass default_task")
        return default
    if not isinstance(value, str) or not value.strip():
        raise FieldError(field, f"expected a non-empty string, got {_short(value)}")
    return value.strip()


def parse_optional_str(value, field: str) -> str | None:
    if is_missing(value):
        return None
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type(value).__name__} {_short(value)}")
    return value
