"""Images of file-backed rows: header-checked at load, decoded on use through a bounded LRU, and
resized into data.min_pixels / data.max_pixels the way EasyR1's process_image does, before the
processor; the vision-token counts below are computed by hand from Qwen's smart_resize."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from staged.data import images as I
from staged.data.files import DataError, load_dataset_files
from staged.data.images import ImageRef, materialize, resize_to_bounds
from staged.data.sample import Sample


def _rows(tmp_path, sizes, share=1):
    """JSONL with one image per row; `share` rows per image file."""
    d = tmp_path / "imgs"
    d.mkdir()
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (10 * i % 255, 20, 30)).save(d / f"{i}.png")
        rows += [{"problem": f"<image>q{i}.{k}", "answer": "A", "images": [f"imgs/{i}.png"]} for k in range(share)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture
def cache(monkeypatch):
    c = I.ImageCache(max_mb=1)
    monkeypatch.setattr(I, "CACHE", c)
    return c


def test_load_decodes_nothing_and_use_decodes_once(tmp_path, cache, monkeypatch):
    f = _rows(tmp_path, [(40, 30), (50, 20)], share=2)
    decoded = []
    real = ImageRef.decode
    monkeypatch.setattr(ImageRef, "decode", lambda self: decoded.append(self) or real(self))
    ds = load_dataset_files(f, default_task="mcq")
    assert decoded == [] and cache.decodes == 0  # nothing decoded at load ...
    assert all(isinstance(im, ImageRef) for s in ds.samples for im in s.images)
    assert ds.samples[0].images[0].size == (40, 30)  # ... but the header was read
    assert ds.samples[0].images[0] is ds.samples[1].images[0]  # one ref per file
    a = materialize(ds.samples[0].images[0])
    b = materialize(ds.samples[1].images[0])  # the same file: a cache hit
    assert a is b and a.size == (40, 30) and a.mode == "RGB" and len(decoded) == 1
    assert (cache.decodes, cache.hits) == (1, 1)


def test_cache_is_bounded(tmp_path, cache):
    f = _rows(tmp_path, [(200, 200)] * 12)  # 120 kB each in RGB
    ds = load_dataset_files(f, default_task="mcq")
    cache.set_limit(0.5)  # 512 kB: 4 images
    for s in ds.samples:
        materialize(s.images[0])
    assert len(cache) == 4 and cache.bytes <= cache.max_bytes and cache.decodes == 12
    materialize(ds.samples[-1].images[0])  # the newest is still there
    assert cache.decodes == 12
    materialize(ds.samples[0].images[0])  # the oldest was evicted
    assert cache.decodes == 13


def test_damaged_file_fails_at_load_with_file_row_and_field(tmp_path):
    f = _rows(tmp_path, [(20, 20), (20, 20), (20, 20)])
    (tmp_path / "imgs" / "2.png").write_bytes((tmp_path / "imgs" / "1.png").read_bytes()[:40])  # header only
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'images'\[0\]: cannot decode image file imgs/2\.png"):
        load_dataset_files(f, default_task="mcq")


def test_resize_to_bounds_is_easyr1s(tmp_path):
    big = Image.new("RGB", (4000, 3000))
    # max: factor sqrt(4194304 / 12e6) = 0.59122..., sides truncated: 2364 x 1773
    assert resize_to_bounds(big, 262144, 4194304).size == (2364, 1773)
    # min: factor sqrt(262144 / 1e4) = 5.12: 512 x 512
    assert resize_to_bounds(Image.new("RGB", (100, 100)), 262144, 4194304).size == (512, 512)
    # inside the bounds: untouched; a grey image comes back RGB
    assert resize_to_bounds(Image.new("L", (600, 500)), 262144, 4194304).size == (600, 500)
    assert resize_to_bounds(Image.new("L", (600, 500)), 262144, 4194304).mode == "RGB"
    # no bounds on an in-memory image: the very object (the embedded default's path, bit for bit)
    img = Image.new("RGB", (56, 56))
    assert materialize(img) is img


def _qwen25_processor(embedded_dir):
    """The embedded tokenizer with a PIL Qwen2-VL image processor at Qwen2.5-VL-7B's own bounds
    (preprocessor_config: min_pixels 3136, max_pixels 12845056; patch 14, merge 2)."""
    from transformers import AutoTokenizer

    from staged.models.loading import VLProcessor, _load_pil_image_processor

    ip = _load_pil_image_processor(embedded_dir)
    ip.size = {"shortest_edge": 3136, "longest_edge": 12845056}
    for k, v in (("min_pixels", 3136), ("max_pixels", 12845056)):
        if hasattr(ip, k):
            setattr(ip, k, v)
    return VLProcessor(ip, AutoTokenizer.from_pretrained(embedded_dir))


@pytest.mark.parametrize("size, bounds, tokens", [
    # 4000x3000 -> ours: 2364x1773 -> smart_resize: round(2364/28)=84, round(1773/28)=63 -> 84*63
    ((4000, 3000), (262144, 4194304), 84 * 63),
    # no bounds of ours: smart_resize alone, 4004x2996 > 12845056? no (11,995,984): 143 x 107
    ((4000, 3000), (None, None), 143 * 107),
    # 100x100 -> ours: 512x512 -> round(512/28) = 18 per side
    ((100, 100), (262144, 4194304), 18 * 18),
    # no bounds: 100 -> round(100/28)*28 = 112 per side, 4 x 4 merged tokens
    ((100, 100), (None, None), 4 * 4),
])
def test_pixel_bounds_set_the_vision_token_count(tmp_path, embedded_dir, size, bounds, tokens):
    from staged.data.prompting import build_generation_batch

    proc = _qwen25_processor(embedded_dir)
    p = tmp_path / "x.png"
    Image.new("RGB", size, (200, 30, 30)).save(p)
    from staged.data.images import read_header

    s = Sample(prompt="<image>What?", answer="A", task="mcq",
               images=[ImageRef(path=p, size=read_header(p)[0], mode="RGB")])
    b = build_generation_batch(proc, [s], min_pixels=bounds[0], max_pixels=bounds[1])
    n_pad = int((b["input_ids"] == proc.image_token_id).sum())
    t, h, w = b["image_grid_thw"][0].tolist()
    assert n_pad == tokens == t * h * w // 4


@pytest.mark.parametrize("size, bounds", [((4000, 3000), (262144, 4194304)), ((4000, 3000), (None, None)),
                                          ((100, 100), (262144, 4194304)), ((30, 900), (None, 50000)),
                                          ((511, 511), (262144, None))])
def test_prompt_length_from_the_header_equals_the_built_batch(tmp_path, embedded_dir, size, bounds):
    """data.max_prompt_tokens counts each row's prompt without decoding an image: the count must be
    what build_generation_batch produces (template, chat template, image tokens)."""
    from staged.data.images import bounded_size, read_header
    from staged.data.prompting import build_generation_batch, load_template, prompt_length

    proc = _qwen25_processor(embedded_dir)
    p = tmp_path / "x.png"
    Image.new("RGB", size, (200, 30, 30)).save(p)
    assert bounded_size(size, *bounds) == resize_to_bounds(Image.new("RGB", size), *bounds).size
    s = Sample(prompt="<image>How many?", answer="A", task="mcq",
               images=[ImageRef(path=p, size=read_header(p)[0], mode="RGB")])
    opts = {"prompt_template": load_template("math"), "min_pixels": bounds[0], "max_pixels": bounds[1]}
    built = int(build_generation_batch(proc, [s], **opts)["prompt_lengths"][0])
    assert prompt_length(proc, s, **opts) == built


def test_max_prompt_tokens_drops_and_counts_overlong_rows(tmp_path, embedded_dir, capsys):
    from staged import preflight
    from staged.config import DataConfig, StageConfig
    from staged.data.prompting import prompt_length

    proc = _qwen25_processor(embedded_dir)
    f = _rows(tmp_path, [(100, 100), (2000, 2000), (60, 60)])
    stage = StageConfig(name="s", epochs=1, data=DataConfig(files=[str(f)], default_task="mcq", max_prompt_tokens=400))
    ds = load_dataset_files(f, default_task="mcq")
    lengths = [prompt_length(proc, s) for s in ds.samples]
    assert lengths[0] <= 400 < lengths[1] and lengths[2] <= 400
    kept, dropped = preflight.drop_overlong(ds.samples, stage, proc)
    assert dropped == 1 and [s.prompt for s in kept] == ["<image>q0.0", "<image>q2.0"]
    assert preflight.stage_rows(stage, proc) == 2
    assert "1 rows dropped" in capsys.readouterr().out
