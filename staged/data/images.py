"""Images of file-backed rows: checked when the data loads, decoded when a step uses them.

Loading a stage no longer decodes its images (a 20k-image stage decoded to RGB is ~60 GB on every
rank). A loaded row holds an :class:`ImageRef`: the file's path (or the encoded bytes, for Parquet /
base64 rows), its size and mode read from the header, and where it came from. The header check at
load (``PIL.Image.open`` + ``verify()``) finds a missing, truncated-header or non-image file before
the model loads, naming the data file, row and field; pixels are decoded on use by
:func:`materialize`, through one bounded LRU per process (:data:`CACHE`, ``image_cache_mb``).

Pixel bounds (``data.min_pixels`` / ``data.max_pixels``) follow EasyR1's ``process_image``
(verl/utils/dataset.py), which the release (UCSC-VLAA/VLM-CapCurriculum) trains with: an image
above max_pixels is scaled down by sqrt(max_pixels / (w * h)), one below min_pixels up by
sqrt(min_pixels / (w * h)), each side truncated to an integer, with PIL's default filter, in the
image's own mode; then converted to RGB. The processor's own smart_resize (multiples of 28,
within its preprocessor_config bounds) runs after that, as in EasyR1. Doing it here rather than
through the processor's ``size`` keeps the release's token counts (the two differ at the edges:
511 x 511 is left alone here, as in EasyR1, while a processor told min_pixels=512*512 would grow
it to 532 x 532) and works the same with every transformers version and processor class.
"""
from __future__ import annotations

import io
import math
from collections import OrderedDict
from pathlib import Path

from PIL import Image


class ImageRef:
    """An image of a loaded row, not yet decoded: a file ``path`` or encoded ``data`` (bytes),
    its ``size`` (width, height) and ``mode`` from the header, and ``where`` (file:row field[i])
    for error messages. ``.size`` is the original size (box rescaling reads it)."""

    __slots__ = ("path", "data", "size", "mode", "where")

    def __init__(self, *, path: Path | None = None, data: bytes | None = None, size: tuple[int, int],
                 mode: str, where: str = ""):
        if (path is None) == (data is None):
            raise ValueError("ImageRef needs exactly one of path or data")
        self.path, self.data, self.size, self.mode, self.where = path, data, tuple(size), mode, where

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def __repr__(self) -> str:
        src = str(self.path) if self.path is not None else f"<{len(self.data)} bytes>"
        return f"ImageRef({src}, {self.size[0]}x{self.size[1]} {self.mode})"

    def decode(self) -> Image.Image:
        """The pixels, in the file's own mode (no conversion); an error names the row."""
        try:
            with Image.open(self.path if self.path is not None else io.BytesIO(self.data)) as im:
                im.load()  # leaving the block closes the file, the decoded pixels stay
            return im
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
            src = self.path if self.path is not None else f"{len(self.data)} image bytes"
            raise ValueError(f"{self.where or 'image'}: cannot decode {src}: {type(e).__name__}: {e} "
                             "(the header check at load passed; the file is damaged past its header)") from None


def read_header(source: Path | bytes, verify: bool = True) -> tuple[tuple[int, int], str]:
    """(size, mode) of an image file or encoded bytes, without decoding its pixels; ``verify``:
    also check what PIL can check without decoding (PNG chunk CRCs: it reads the whole file).
    Raises what PIL raises."""
    with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
        size, mode = im.size, im.mode
        if verify:
            im.verify()
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"empty image ({size[0]}x{size[1]})")
    return size, mode


def bounded_size(size: tuple[int, int], min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) that resize_to_bounds gives an image of ``size``, from the size alone."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        w, h = max(1, int(w * f)), max(1, int(h * f))
    if min_pixels is not None and w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        w, h = max(1, int(w * f)), max(1, int(h * f))
    return w, h


def resize_to_bounds(img: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """EasyR1's process_image: scale into [min_pixels, max_pixels] (see the module doc), then RGB.
    A side is never truncated below 1 pixel (EasyR1 would fail there)."""
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        img = img.resize((max(1, int(w * f)), max(1, int(h * f))))
        w, h = img.size
    if min_pixels is not None and w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        img = img.resize((max(1, int(w * f)), max(1, int(h * f))))
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageCache:
    """LRU of decoded (and resized) images, bounded by their RGB bytes. Keyed by the ImageRef object
    and the bounds: rows naming the same file share one ImageRef, so they share one entry."""

    def __init__(self, max_mb: float = 1024):
        self.max_bytes = int(max_mb * 2**20)
        self._items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.decodes = 0
        self.hits = 0

    def set_limit(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self._evict()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, ref: ImageRef, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
        key = (ref, min_pixels, max_pixels)
        img = self._items.get(key)
        if img is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return img
        self.decodes += 1
        raw = ref.decode()
        img = (resize_to_bounds(raw, min_pixels, max_pixels) if (min_pixels or max_pixels)
               else raw if raw.mode == "RGB" else raw.convert("RGB"))
        size = img.width * img.height * 3
        if size <= self.max_bytes:
            self._items[key] = img
            self.bytes += size
            self._evict()
        return img

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.width * old.height * 3


CACHE = ImageCache()
"""The process's decoded-image cache (one per rank); train sets its limit from image_cache_mb."""


def materialize(img, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """A PIL image ready for the processor: an ImageRef decoded through CACHE; an in-memory image
    (synthetic data) as it is, or resized when bounds are given."""
    if isinstance(img, ImageRef):
        return CACHE.get(img, min_pixels, max_pixels)
    if min_pixels is None and max_pixels is None:
        return img
    return resize_to_bounds(img, min_pixels, max_pixels)
