"""Datasets from local files: JSONL or Parquet -> validated Samples, every bad row named up front.

    ds = load_dataset_files(["data/perception.jsonl"], image_dir="data/", default_task="mcq")
    print(ds.report())          # rows, formats, skipped rows (on_bad_row="skip")
    samples = ds.samples

Formats (EasyR1, verl, TRL-style), detection and `fields` mapping: staged.data.formats.

What a loaded Sample looks like:
  prompt   the user text with one `<image>` per image, in order. Other placeholders (Qwen's
           <|vision_start|><|image_pad|><|vision_end|>, <|image|>, chat image parts) become `<image>`.
           A prompt with no marker but N images gets N markers PREPENDED (images before the text, the
           way staged.data.prompting places them anyway); with markers, their count must equal N.
  images   staged.data.images.ImageRef per image: its header is read and checked at load (a missing,
           non-image or header-damaged file fails here, not mid-training) but its pixels are decoded only
           when a step uses it (staged.data.images.materialize, a bounded LRU per process). Rows naming
           the same file share one ImageRef. Encoded bytes (Parquet, base64) are kept as bytes.
  task     the row's `task`, else default_task, else an error.
  extra    every column not read into a field above, as it is (verl's data_source, extra_info and
           reward_model dicts included); reward functions receive it. A chat prompt's system message
           goes to extra["system_prompt"].

Images are a path (relative to image_dir, or to the data file's folder when image_dir is None; absolute;
"file://..."), raw bytes, a {"bytes": ..., "path": ...} dict (HF datasets' Image feature; bytes win), a
{"image": ...} dict (verl), or a "data:image/...;base64," URI. URLs are refused: local files only.

Validation: a missing image file, undecodable bytes, a marker count that differs from the image count,
a missing/empty answer, a wrong type (answer a list, pass_rate not a number or outside [0, 1]), a
malformed JSON line -> DataError naming the file, the row (1-based line for JSONL, 0-based "row i" for
Parquet) and the field:  data/train.jsonl:17: field 'images'[1]: file not found: imgs/a.png
With on_bad_row="skip" such rows are skipped and counted: LoadedDataset.skipped / .report(), plus one
warning. File-level problems (no such file, unknown format, a mapped column absent from the whole
file, pyarrow missing for Parquet) always raise: skipping every row of a file helps nobody.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import formats as F
from .images import ImageRef, read_header
from .sample import Sample

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 1024  # rows decoded to Python at a time; bounds the transient memory of a big file


@dataclass
class BadRow:
    """One rejected row. row: the 1-based line (JSONL), the 0-based row index (Parquet), the 0-based item
    (a JSON array file); None for a whole-file problem. field: the column as the file names it, index:
    the position inside a list field (the images' index, a chat message's turn)."""

    file: str
    row: int | None
    field: str | None
    reason: str
    index: int | None = None
    row_kind: str = "line"  # "line" | "row" | "item": how `row` is written

    @property
    def location(self) -> str:
        if self.row is None:
            return self.file
        return f"{self.file}:{self.row}" if self.row_kind == "line" else f"{self.file}:{self.row_kind} {self.row}"

    def __str__(self) -> str:
        if self.field is None:
            return f"{self.location}: {self.reason}"
        index = f"[{self.index}]" if self.index is not None else ""
        return f"{self.location}: field '{self.field}'{index}: {self.reason}"


class DataError(ValueError):
    """A bad dataset file or row; str() names file, row and field. `.bad_row` holds the parts."""

    def __init__(self, bad_row: BadRow):
        super().__init__(str(bad_row))
        self.bad_row = bad_row


@dataclass
class FileStats:
    file: str
    format: str
    rows: int = 0
    loaded: int = 0
    with_images: int = 0


@dataclass
class LoadedDataset:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[BadRow] = field(default_factory=list)
    files: list[FileStats] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def report(self, max_rows: int = 20) -> str:
        """Per file: format, rows read, loaded, with images; then the skipped rows (the first max_rows)."""
        n_img = sum(f.with_images for f in self.files)
        lines = [f"loaded {len(self.samples)} samples ({n_img} with images) from {len(self.files)} "
                 f"file{'s' * (len(self.files) != 1)}; skipped {len(self.skipped)} bad "
                 f"row{'s' * (len(self.skipped) != 1)}"]
        for f in self.files:
            lines.append(f"  {f.file} [{f.format}]: {f.rows} rows, {f.loaded} loaded ({f.with_images} with "
                         f"images), {f.rows - f.loaded} skipped")
        if self.skipped:
            by_field = Counter(b.field or "(row)" for b in self.skipped)
            lines.append("skipped by field: " + ", ".join(f"{k} {v}" for k, v in by_field.most_common()))
            lines += [f"  {b}" for b in self.skipped[:max_rows]]
            if len(self.skipped) > max_rows:
                lines.append(f"  ... and {len(self.skipped) - max_rows} more")
        return "\n".join(lines)


def load_dataset_files(paths, *, image_dir=None, format: str = "auto", fields: dict | None = None,
                       on_bad_row: str = "error", default_task: str | None = None,
                       verify_images: bool = True) -> LoadedDataset:
    """Load JSONL/Parquet files into Samples, validating every row up front (see the module docstring).

    paths: one path or a list; each file's format is detected on its own (format="auto") or forced
        ("easyr1" | "verl" | "trl").
    image_dir: where relative image paths live; None: next to each data file.
    fields: our field name -> your column ({"prompt": "question", "answer": "gt"}; dotted = nested).
    on_bad_row: "error" raises DataError at the first bad row; "skip" skips and counts it.
    default_task: the task of rows without one (task chooses the verifier: mcq, number, math, ...).
    verify_images: PIL's verify() after the header read (reads each whole PNG); False: the header only,
        for files that a preflight has verified already.
    """
    if format not in F.FORMAT_NAMES:
        raise ValueError(f"format must be one of {', '.join(F.FORMAT_NAMES)}, got {format!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    fields = F.check_fields(fields)
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = LoadedDataset()
    images = _ImageRefs(verify_images)
    for path in paths:
        name, p = str(path), Path(path)
        if not p.is_file():
            raise DataError(BadRow(name, None, None, "not a file" if p.exists() else "file not found"))
        suffix = p.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            (columns, rows), row_kind = _read_parquet(p, name), "row"
        elif suffix in JSONL_SUFFIXES:
            columns, rows, row_kind = _read_json(p, name)
        else:
            raise DataError(BadRow(name, None, None, f"unsupported file type {p.suffix!r}: expected "
                                   f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"))
        # no columns: an empty file, or no line is a JSON object (every row then fails on its own below)
        cols = _columns_for(name, columns, format, fields) if columns else None
        stats = FileStats(name, cols.format if cols else "unknown")
        out.files.append(stats)
        base = Path(image_dir) if image_dir is not None else p.parent
        for row_no, record in rows:
            stats.rows += 1
            images.where = BadRow(name, row_no, None, "", None, row_kind).location
            try:
                if isinstance(record, F.FieldError):
                    raise record
                sample = _build_sample(record, cols, base, images, default_task)
            except F.FieldError as e:
                bad = BadRow(name, row_no, e.field, e.reason, e.index, row_kind)
                if on_bad_row == "error":
                    raise DataError(bad) from None
                out.skipped.append(bad)
                continue
            out.samples.append(sample)
            stats.loaded += 1
            stats.with_images += bool(sample.images)
        if stats.rows == 0:
            raise DataError(BadRow(name, None, None, "no rows (empty file)"))
    if out.skipped:
        warnings.warn(f"load_dataset_files: skipped {len(out.skipped)} bad rows (first: {out.skipped[0]}); "
                      "see LoadedDataset.report()", stacklevel=2)
    return out


# ---------------------------------------------------------------------------------------------------
# reading rows: (row number, dict) pairs, or (row number, FieldError) for a row that is not a dict


def _read_json(p: Path, name: str):
    """JSON lines (1-based line numbers; blank lines skipped), or a JSON array of objects (0-based items)
    when a .json file starts with '['. Returns (columns: the union of keys over all rows, rows, row_kind)."""
    with open(p, encoding="utf-8") as fh:
        text = fh.read()
    rows, columns = [], {}
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(BadRow(name, None, None, f"malformed JSON: {e}")) from None
        for i, obj in enumerate(items):
            rows.append((i, _as_record(obj, columns)))
        return list(columns), rows, "item"
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((line_no, F.FieldError(None, f"malformed JSON: {e}")))
            continue
        rows.append((line_no, _as_record(obj, columns)))
    return list(columns), rows, "line"


def _as_record(obj, columns: dict):
    if not isinstance(obj, dict):
        return F.FieldError(None, f"expected a JSON object, got {type(obj).__name__}")
    columns.update(dict.fromkeys(obj))
    return obj


def _read_parquet(p: Path, name: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{name}: reading Parquet needs pyarrow (pip install pyarrow); "
                          f"JSONL files load without it ({e})") from e
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise DataError(BadRow(name, None, None, f"cannot read Parquet: {type(e).__name__}: {e}")) from None

    def rows():
        i = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                yield i, record
                i += 1

    return pf.schema_arrow.names, rows()


def _columns_for(name: str, columns, fmt: str, fields: dict) -> F.Columns:
    spec = F.detect_format(columns, fmt, fields)
    if spec is None:
        raise DataError(BadRow(name, None, None, (
            f"unknown format: columns {sorted(columns)}; expected EasyR1 (problem, answer, images), "
            "verl (prompt chat list, reward_model.ground_truth, images) or TRL-style (prompt, solution or "
            "answer, image or images), or map your columns: data.fields = {prompt = \"...\", answer = \"...\"} "
            "in the stage's config (eval.fields for eval files; fields={...} in load_dataset_files)")))
    cols, missing = F.resolve_columns(spec, columns, fields)
    if cols is None:
        wanted = " or ".join(repr(c) for c in getattr(spec, missing))
        raise DataError(BadRow(name, None, missing, (
            f"column {wanted} not in the file ({spec.name} format); columns: {sorted(columns)}; "
            f"map yours with data.fields = {{{missing} = \"...\"}} in the stage's config (eval.fields for "
            f"eval files; fields={{'{missing}': ...}} in load_dataset_files)")))
    return cols


# ---------------------------------------------------------------------------------------------------
# one row -> Sample


def _build_sample(record: dict, cols: F.Columns, base: Path, images: _ImageRefs,
                  default_task: str | None) -> Sample:
    prompt_value = F.get_value(record, cols.prompt)
    if F.is_missing(prompt_value):
        raise F.FieldError(cols.prompt, "missing prompt")
    text, inline, system = F.parse_prompt(prompt_value, cols.prompt)
    answer = F.parse_answer(F.get_value(record, cols.answer), cols.answer)

    sources, image_field = [], cols.images
    if cols.images is not None:
        value = F.get_value(record, cols.images)
        if not F.is_missing(value):
            sources = list(value) if isinstance(value, (list, tuple)) else [value]
    videos = record.get("videos")
    if videos:
        raise F.FieldError("videos", "video inputs are not supported")
    if any(s is not None for s in inline):  # images carried inside the chat's image parts
        if sources:
            raise F.FieldError(cols.prompt, f"images are given both inside the chat and in '{cols.images}'")
        if any(s is None for s in inline):
            raise F.FieldError(cols.prompt, "some image parts carry an image and some don't")
        sources, image_field = inline, cols.prompt
    pil = [images.open(src, image_field, i, base) for i, src in enumerate(sources)]

    n_markers = text.count(F.IMAGE_MARKER)
    if n_markers == 0 and pil:
        text = F.IMAGE_MARKER * len(pil) + text  # documented: images go before the text
    elif n_markers != len(pil):
        where = (f"'{cols.images}'" if cols.images else
                 "the row (no images column: map yours with data.fields = {images = \"...\"})")
        raise F.FieldError(cols.prompt, f"{n_markers} {F.IMAGE_MARKER} placeholders but {len(pil)} images in {where}")
    if not text.replace(F.IMAGE_MARKER, "").strip() and not pil:
        raise F.FieldError(cols.prompt, "empty prompt")

    task = F.parse_task(F.get_value(record, cols.task) if cols.task else None, cols.task, default_task)
    pass_rate = F.parse_pass_rate(F.get_value(record, cols.pass_rate), cols.pass_rate) if cols.pass_rate else None
    reference = (F.parse_optional_str(F.get_value(record, cols.reference_response), cols.reference_response)
                 if cols.reference_response else None)

    consumed = cols.consumed
    extra = {k: v for k, v in record.items() if k not in consumed}
    if system is not None:
        if "system_prompt" in extra:
            raise F.FieldError(cols.prompt, "the chat has a system message and the row a 'system_prompt' column")
        extra["system_prompt"] = system
    return Sample(prompt=text, answer=answer, task=task, images=pil, pass_rate=pass_rate, extra=extra,
                  reference_response=reference)


class _ImageRefs:
    """Image sources -> ImageRefs, checked by their header (staged.data.images), not decoded. A file
    named by many rows gets one ImageRef (they share its decoded pixels in the cache too)."""

    def __init__(self, verify: bool = True):
        self._by_path: dict[Path, ImageRef] = {}
        self.verify = verify
        self.where = ""  # "file:row" of the row being read, for errors raised on use

    def open(self, src, field: str, index: int, base: Path):
        if isinstance(src, Image.Image):
            return src.convert("RGB")
        if isinstance(src, dict):
            data = src.get("bytes")
            if data is not None:
                return self._from_bytes(_bytes_of(data, field, index), field, index)
            ref = next((src[k] for k in ("image", "path", "url") if src.get(k) is not None), None)
            if ref is None:
                raise F.FieldError(field, f"image dict has no bytes and no path: keys {sorted(src)}", index)
            return self.open(ref, field, index, base)
        if isinstance(src, (bytes, bytearray, memoryview)):
            return self._from_bytes(bytes(src), field, index)
        if not isinstance(src, str):
            raise F.FieldError(field, f"expected an image path, bytes or a {{'bytes', 'path'}} dict, got "
                                      f"{type(src).__name__}", index)
        if src.startswith("data:"):
            head, _, payload = src.partition(",")
            if not head.endswith(";base64"):
                raise F.FieldError(field, f"data URI is not base64: {head!r}", index)
            return self._from_bytes(_b64(payload, field, index), field, index)
        if src.startswith(("http://", "https://")):
            raise F.FieldError(field, f"URLs are not supported (local files only): {src}", index)
        rel = src[len("file://"):] if src.startswith("file://") else src
        if not rel:
            raise F.FieldError(field, "empty image path", index)
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        cached = self._by_path.get(path)
        if cached is not None:
            return cached
        if not path.is_file():
            where = "" if Path(rel).is_absolute() else f" (under {base})"
            raise F.FieldError(field, f"file not found: {rel}{where}", index)
        try:
            size, mode = read_header(path, self.verify)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, DecompressionBombError, ...
            raise F.FieldError(field, f"cannot decode image file {rel}: {type(e).__name__}: {e}", index) from None
        ref = ImageRef(path=path, size=size, mode=mode, where=f"{self.where}: field '{field}'[{index}]")
        self._by_path[path] = ref
        return ref

    def _from_bytes(self, data: bytes, field: str, index: int) -> ImageRef:
        if not data:
            raise F.FieldError(field, "empty image bytes", index)
        try:
            size, mode = read_header(data, self.verify)
        except Exception as e:  # noqa: BLE001
            raise F.FieldError(field, f"corrupt image bytes ({len(data)} bytes): {type(e).__name__}: {e}",
                               index) from None
        return ImageRef(data=data, size=size, mode=mode, where=f"{self.where}: field '{field}'[{index}]")


def _bytes_of(data, field: str, index: int) -> bytes:
    """{"bytes": ...} holds raw bytes (Parquet) or, written out to JSON, a base64 string."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return _b64(data, field, index)
    raise F.FieldError(field, f"image 'bytes' must be bytes or a base64 string, got {type(data).__name__}", index)


def _b64(payload: str, field: str, index: int) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise F.FieldError(field, f"invalid base64 image data: {e}", index) from None
