"""staged.data.files: every format round-trips from files written into tmp_path; every bad row is named."""
from __future__ import annotations

import base64
import io
import json
import sys
import time

import pytest
from PIL import Image

from staged.data.files import DataError, load_dataset_files
from staged.data.images import materialize

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# helpers


def png(w: int, h: int, color=(255, 0, 0), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path, w, h, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(w, h, **kw))
    return path


def write_jsonl(path, rows, raw_lines=None):
    lines = [json.dumps(r) for r in rows]
    for i, line in (raw_lines or {}).items():
        lines.insert(i, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def imgs(tmp_path):
    save_png(tmp_path / "imgs/a.png", 32, 24)
    save_png(tmp_path / "imgs/b.png", 17, 9, mode="RGBA", color=(0, 0, 255, 128))
    return tmp_path


# ---------------------------------------------------------------------------------------------------
# formats round-trip


def test_easyr1_jsonl(imgs):
    f = write_jsonl(imgs / "train.jsonl", [
        {"problem": "<image>Which colour? A. red B. blue", "answer": "A", "images": ["imgs/a.png"],
         "task": "mcq", "pass_rate": 0.25, "source": "clevr", "id": 7},
        {"problem": "Compare <image> and <image>.", "answer": 2, "images": ["imgs/a.png", "imgs/b.png"]},
        {"problem": "What is 2+3?", "answer": "5", "reference_response": "<think>2+3</think>\\boxed{5}"},
    ])
    ds = load_dataset_files([f], default_task="number")
    assert len(ds) == 3 and not ds.skipped
    s0, s1, s2 = ds.samples
    assert (s0.prompt, s0.answer, s0.task, s0.pass_rate) == ("<image>Which colour? A. red B. blue", "A", "mcq", 0.25)
    assert [im.size for im in s0.images] == [(32, 24)] and s0.images[0].mode == "RGB"
    assert s0.extra == {"source": "clevr", "id": 7}
    assert s1.answer == "2" and s1.task == "number" and s1.pass_rate is None
    assert [(im.size, im.mode) for im in s1.images] == [((32, 24), "RGB"), ((17, 9), "RGBA")]  # header: file's mode
    assert [materialize(im).mode for im in s1.images] == ["RGB", "RGB"]  # RGBA -> RGB on use
    assert s1.images[0] is s0.images[0]  # one file, decoded once
    assert s2.images == [] and s2.reference_response.endswith("\\boxed{5}")
    assert ds.files[0].format == "easyr1" and ds.files[0].with_images == 2


def test_image_dir(tmp_path):
    save_png(tmp_path / "pics/x.png", 5, 6)
    (tmp_path / "data").mkdir()
    f = write_jsonl(tmp_path / "data/t.jsonl", [{"problem": "<image>q", "answer": "a", "images": ["x.png"]}])
    ds = load_dataset_files([f], image_dir=tmp_path / "pics", default_task="mcq")
    assert ds.samples[0].images[0].size == (5, 6)
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'images'\[0\]: file not found: x.png"):
        load_dataset_files([f], default_task="mcq")  # default: next to the data file


def test_easyr1_parquet_hf_image_dicts(tmp_path):
    f = write_parquet(tmp_path / "train.parquet", [
        {"problem": "<image>How many?", "answer": "3", "task": "count", "pass_rate": 0.5,
         "images": [{"bytes": png(8, 4), "path": "ignored.png"}]},
        {"problem": "Text only: 1+1?", "answer": "2", "task": "number", "pass_rate": None, "images": []},
    ])
    ds = load_dataset_files([f])
    assert ds.files[0].format == "easyr1"
    s0, s1 = ds.samples
    assert s0.images[0].size == (8, 4) and s0.task == "count" and s0.pass_rate == 0.5
    assert s1.images == [] and s1.pass_rate is None and s1.extra == {}


def test_verl_parquet(tmp_path):
    save_png(tmp_path / "p.png", 11, 13)
    f = write_parquet(tmp_path / "geo.parquet", [
        {"data_source": "geoqa", "ability": "math",
         "prompt": [{"role": "system", "content": "Think first."},
                    {"role": "user", "content": "<image>Find the angle."}],
         "images": [{"bytes": png(20, 10), "path": None}],
         "reward_model": {"style": "rule", "ground_truth": "30"},
         "extra_info": {"split": "train", "index": 0}},
        {"data_source": "geoqa", "ability": "math",
         "prompt": [{"role": "user", "content": "No image here: 6*7?"}],
         "images": None,
         "reward_model": {"style": "rule", "ground_truth": "42"},
         "extra_info": {"split": "train", "index": 1}},
        {"data_source": "geoqa", "ability": "math",
         "prompt": [{"role": "user", "content": "<image>Path image."}],
         "images": [{"bytes": None, "path": "p.png"}],
         "reward_model": {"style": "rule", "ground_truth": "1"},
         "extra_info": {"split": "train", "index": 2}},
    ])
    ds = load_dataset_files([f], default_task="math")
    assert ds.files[0].format == "verl"
    s0, s1, s2 = ds.samples
    assert s0.prompt == "<image>Find the angle." and s0.answer == "30" and s0.task == "math"
    assert s0.images[0].size == (20, 10)
    assert s0.extra["data_source"] == "geoqa" and s0.extra["extra_info"] == {"split": "train", "index": 0}
    assert s0.extra["reward_model"]["style"] == "rule" and s0.extra["system_prompt"] == "Think first."
    assert s1.images == [] and s1.answer == "42" and "system_prompt" not in s1.extra
    assert s2.images[0].size == (11, 13)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])  # Parquet unifies the parts' struct fields (nulls)
def test_trl_chat_parts_and_single_image(imgs, suffix):
    writer = write_jsonl if suffix == ".jsonl" else write_parquet
    f = writer(imgs / f"trl{suffix}", [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}],
         "image": "imgs/a.png", "solution": "circle", "task": "caption"},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Text only"}]}],
         "image": None, "solution": "x", "task": "math"},
    ])
    ds = load_dataset_files([f])
    assert ds.files[0].format == "trl"
    assert ds.samples[0].prompt == "<image>What shape?" and ds.samples[0].images[0].size == (32, 24)
    assert ds.samples[1].images == [] and ds.samples[1].answer == "x" and ds.samples[1].prompt == "Text only"


def test_trl_inline_chat_images_and_answer_column(imgs):
    f = write_jsonl(imgs / "t.jsonl", [
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Left "},
                                                  {"type": "image", "image": "imgs/a.png"},
                                                  {"type": "text", "text": " right "},
                                                  {"type": "image", "path": "imgs/b.png"}]}],
         "answer": "B"},
    ])
    s = load_dataset_files([f], default_task="mcq").samples[0]
    assert s.prompt == "Left <image> right <image>" and [im.size for im in s.images] == [(32, 24), (17, 9)]


def test_bytes_images_raw_dict_and_data_uri(tmp_path):
    f = write_parquet(tmp_path / "b.parquet", [
        {"prompt": "<image><image>two", "answer": "2", "images": [png(3, 4), png(5, 6)]},
    ])
    assert [im.size for im in load_dataset_files([f], default_task="count").samples[0].images] == [(3, 4), (5, 6)]
    uri = "data:image/png;base64," + base64.b64encode(png(7, 2)).decode()
    b64 = base64.b64encode(png(9, 1)).decode()
    g = write_jsonl(tmp_path / "u.jsonl", [
        {"problem": "<image>", "answer": "a", "images": [uri]},
        {"problem": "<image>", "answer": "a", "images": [{"bytes": b64, "path": None}]},
    ])
    ds = load_dataset_files([g], default_task="mcq")
    assert [s.images[0].size for s in ds.samples] == [(7, 2), (9, 1)]


def test_absolute_and_file_uri_paths(tmp_path):
    img = save_png(tmp_path / "elsewhere/abs.png", 4, 4)
    (tmp_path / "d").mkdir()
    f = write_jsonl(tmp_path / "d/t.jsonl", [
        {"problem": "<image>q", "answer": "a", "images": [str(img)]},
        {"problem": "<image>q", "answer": "a", "images": ["file://" + str(img)]},
    ])
    assert len(load_dataset_files([f], default_task="mcq")) == 2


def test_paper_pipeline_rows(imgs):
    """VLM-CapCurriculum's format_for_training.py writes prompt + answer + image_path (EasyR1 image_key)."""
    f = write_jsonl(imgs / "train_stage1_perception.jsonl", [
        {"index": "0", "answer": "A", "example_id": "train_00009", "split": "train", "image_path": ["a.png"],
         "option_A": "red", "option_B": "blue", "option_C": "green", "option_D": "grey",
         "prompt": "<image>In the image, what colour?\nOptions:\nA: red\nB: blue\nC: green\nD: grey\n"}])
    s = load_dataset_files([f], image_dir=imgs / "imgs", default_task="mcq").samples[0]
    assert s.images[0].size == (32, 24) and s.answer == "A" and s.extra["option_B"] == "blue"
    assert "image_path" not in s.extra and "prompt" not in s.extra and "answer" not in s.extra


def test_placeholders_normalised_and_prepended(imgs):
    f = write_jsonl(imgs / "t.jsonl", [
        {"problem": "A <|vision_start|><|image_pad|><|vision_end|> B <|image|>", "answer": "a",
         "images": ["imgs/a.png", "imgs/b.png"]},
        {"problem": "no markers", "answer": "a", "images": ["imgs/a.png", "imgs/b.png"]},
    ])
    s0, s1 = load_dataset_files([f], default_task="mcq").samples
    assert s0.prompt == "A <image> B <image>"
    assert s1.prompt == "<image><image>no markers"  # images prepended, one marker each


def test_loaded_sample_builds_messages(imgs):
    from staged.data.prompting import IMAGE_MARKER, build_messages

    from staged.data.formats import IMAGE_MARKER as OURS
    assert OURS == IMAGE_MARKER
    f = write_jsonl(imgs / "t.jsonl", [{"problem": "x <image> y", "answer": "a", "images": ["imgs/a.png"]}])
    msgs = build_messages(load_dataset_files([f], default_task="mcq").samples[0])
    assert [p["type"] for p in msgs[-1]["content"]] == ["text", "image", "text"]


def test_mixed_rows_and_multiple_files(imgs):
    f = write_jsonl(imgs / "a.jsonl", [{"problem": "<image>q", "answer": "A", "images": ["imgs/a.png"]},
                                       {"problem": "text", "answer": "1"},
                                       {"problem": "text", "answer": "1", "images": []}])
    g = write_parquet(imgs / "b.parquet", [{"prompt": "hi", "solution": "x"}])
    ds = load_dataset_files([f, str(g)], default_task="mcq")
    assert [len(s.images) for s in ds.samples] == [1, 0, 0, 0]
    assert [x.format for x in ds.files] == ["easyr1", "trl"]


# ---------------------------------------------------------------------------------------------------
# detection and field mapping


@pytest.mark.parametrize("row, fmt", [
    ({"problem": "q", "answer": "a"}, "easyr1"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "a"}}, "verl"),
    ({"prompt": "q", "solution": "a"}, "trl"),
    ({"prompt": "q", "answer": "a"}, "trl"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_auto_detection(tmp_path, row, fmt, suffix):
    path = tmp_path / f"d{suffix}"
    (write_jsonl if suffix == ".jsonl" else write_parquet)(path, [row])
    ds = load_dataset_files([path], default_task="math")
    assert ds.files[0].format == fmt and ds.samples[0].answer == "a" and ds.samples[0].prompt == "q"


def test_field_mapping(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"question": "q?", "gt": "7", "kind": "number", "meta": {"difficulty": 0.75}, "pics": []},
    ])
    ds = load_dataset_files([f], fields={"prompt": "question", "answer": "gt", "task": "kind",
                                         "pass_rate": "meta.difficulty", "images": "pics"})
    s = ds.samples[0]
    assert ds.files[0].format == "custom"
    assert (s.prompt, s.answer, s.task, s.pass_rate) == ("q?", "7", "number", 0.75)
    assert s.extra == {"meta": {"difficulty": 0.75}}  # a dotted field leaves its parent in extra


def test_forced_format_and_override(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [{"problem": "q", "answer": "a", "ans2": "b"}])
    ds = load_dataset_files([f], format="easyr1", fields={"answer": "ans2"}, default_task="mcq")
    assert ds.samples[0].answer == "b" and ds.samples[0].extra == {"answer": "a"}


# ---------------------------------------------------------------------------------------------------
# errors name file, row and field


def _rows_with(bad: dict) -> list[dict]:
    good = {"problem": "<image>q", "answer": "A", "images": ["imgs/a.png"], "task": "mcq"}
    return [good, good, {**good, **bad}]  # the bad row is line 3


@pytest.mark.parametrize("bad, pattern", [
    ({"images": ["imgs/a.png", "imgs/missing.png"], "problem": "<image><image>"},
     r"train.jsonl:3: field 'images'\[1\]: file not found: imgs/missing.png"),
    ({"images": ["imgs/corrupt.png"]}, r"train.jsonl:3: field 'images'\[0\]: cannot decode image file imgs/corrupt.png"),
    ({"images": ["imgs/trunc.png"]}, r"train.jsonl:3: field 'images'\[0\]: cannot decode image file imgs/trunc.png"),
    ({"images": [{"bytes": base64.b64encode(b"not an image").decode()}]},
     r"train.jsonl:3: field 'images'\[0\]: corrupt image bytes"),
    ({"images": [42]}, r"train.jsonl:3: field 'images'\[0\]: expected an image path"),
    ({"images": ["https://x.org/a.png"]}, r"train.jsonl:3: field 'images'\[0\]: URLs are not supported"),
    ({"problem": "<image><image>q"}, r"train.jsonl:3: field 'problem': 2 <image> placeholders but 1 images"),
    ({"problem": "q", "images": []}, None),  # fine: text-only
    ({"problem": "<image>q", "images": []}, r"train.jsonl:3: field 'problem': 1 <image> placeholders but 0 images"),
    ({"answer": ""}, r"train.jsonl:3: field 'answer': empty answer"),
    ({"answer": None}, r"train.jsonl:3: field 'answer': missing answer"),
    ({"answer": ["A", "B"]}, r"train.jsonl:3: field 'answer': expected a string or a number, got list"),
    ({"answer": True}, r"train.jsonl:3: field 'answer': expected a string or a number, got bool"),
    ({"pass_rate": "easy"}, r"train.jsonl:3: field 'pass_rate': expected a number in \[0, 1\], got str"),
    ({"pass_rate": 1.5}, r"train.jsonl:3: field 'pass_rate': expected a number in \[0, 1\], got 1.5"),
    ({"task": None}, r"train.jsonl:3: field 'task': missing task"),
    ({"task": 3}, r"train.jsonl:3: field 'task': expected a non-empty string"),
    ({"problem": 5}, r"train.jsonl:3: field 'problem': expected a string or a chat list, got int"),
    ({"problem": "", "images": []}, r"train.jsonl:3: field 'problem': empty prompt"),
    ({"problem": "<video>q"}, r"train.jsonl:3: field 'problem': video inputs are not supported"),
    ({"reference_response": 1}, r"train.jsonl:3: field 'reference_response': expected a string"),
])
def test_bad_row_errors(imgs, bad, pattern):
    (imgs / "imgs/corrupt.png").write_bytes(b"\x89PNG garbage")
    (imgs / "imgs/trunc.png").write_bytes(png(64, 64, color=(1, 2, 3))[:60])
    f = write_jsonl(imgs / "train.jsonl", _rows_with(bad))
    if pattern is None:
        assert len(load_dataset_files([f])) == 3
        return
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset_files([f])
    assert info.value.bad_row.row == 3 and isinstance(info.value, ValueError)


def test_malformed_json_and_non_object_lines(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"problem": "q", "answer": "a"}] * 2,
                    raw_lines={1: "", 2: '{"problem": "q", "answer": '})  # blank line 2 still counts
    with pytest.raises(DataError, match=r"train.jsonl:3: malformed JSON"):
        load_dataset_files([f], default_task="mcq")
    g = write_jsonl(tmp_path / "g.jsonl", [{"problem": "q", "answer": "a"}], raw_lines={1: "[1, 2]"})
    with pytest.raises(DataError, match=r"g.jsonl:2: expected a JSON object, got list"):
        load_dataset_files([g], default_task="mcq")


def test_parquet_errors_name_row_index(tmp_path):
    f = write_parquet(tmp_path / "train.parquet", [
        {"problem": "<image>q", "answer": "A", "images": [png(2, 2)]},
        {"problem": "<image>q", "answer": "A", "images": [b"\x89PNG\r\n\x1a\n broken"]},
    ])
    with pytest.raises(DataError, match=r"train.parquet:row 1: field 'images'\[0\]: corrupt image bytes"):
        load_dataset_files([f], default_task="mcq")
    g = write_parquet(tmp_path / "v.parquet", [
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": None}}])
    with pytest.raises(DataError, match=r"v.parquet:row 0: field 'reward_model.ground_truth': missing answer"):
        load_dataset_files([g], default_task="mcq")


def test_chat_errors(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "solution": "x"},
            {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "solution": "x"},
            {"prompt": [{"content": "no role"}], "solution": "x"},
            {"prompt": [{"role": "system", "content": "only system"}], "solution": "x"}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.warns(UserWarning):
        ds = load_dataset_files([f], default_task="math", on_bad_row="skip")
    reasons = [str(b).removeprefix(f"{tmp_path}/") for b in ds.skipped]
    assert reasons[0].startswith("c.jsonl:1: field 'prompt'[1]: role 'assistant' not supported")
    assert reasons[1].startswith("c.jsonl:2: field 'prompt'[1]: more than one user message")
    assert reasons[2].startswith("c.jsonl:3: field 'prompt'[0]: expected a chat message")
    assert reasons[3] == "c.jsonl:4: field 'prompt': chat has no user message"


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_dataset_files([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.csv: unsupported file type '.csv'"):
        load_dataset_files([tmp_path / "x.csv"])
    f = write_jsonl(tmp_path / "odd.jsonl", [{"q": "x", "a": "y"}])
    with pytest.raises(DataError, match=r"odd.jsonl: unknown format: columns \['a', 'q'\]"):
        load_dataset_files([f], on_bad_row="skip")  # file-level: raises even in skip mode
    with pytest.raises(DataError, match=r"odd.jsonl: field 'answer': column 'gt' not in the file"):
        load_dataset_files([f], fields={"prompt": "q", "answer": "gt"})
    g = write_jsonl(tmp_path / "noimg.jsonl", [{"prompt": "<image>q", "answer": "a", "pics": ["x.png"]}])
    with pytest.raises(DataError, match=r"noimg.jsonl:1: field 'prompt': 1 <image> placeholders but 0 images "
                                        r"in the row \(no images column: map yours"):
        load_dataset_files([g], default_task="mcq")
    with pytest.raises(DataError, match=r"odd.jsonl: field 'pass_rate': column 'difficulty' not in the file"):
        load_dataset_files([f], fields={"prompt": "q", "answer": "a", "pass_rate": "difficulty"})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows"):
        load_dataset_files([tmp_path / "empty.jsonl"])
    (tmp_path / "junk.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"junk.jsonl:1: malformed JSON"):
        load_dataset_files([tmp_path / "junk.jsonl"])
    with pytest.raises(ValueError, match=r"fields: unknown field 'question'"):
        load_dataset_files([f], fields={"question": "q"})
    with pytest.raises(ValueError, match=r"format must be one of"):
        load_dataset_files([f], format="sharegpt")
    with pytest.raises(ValueError, match=r"on_bad_row must be"):
        load_dataset_files([f], on_bad_row="ignore")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: cannot read Parquet"):
        load_dataset_files([tmp_path / "bad.parquet"])


# ---------------------------------------------------------------------------------------------------
# skip mode, size, missing pyarrow


def test_skip_mode_counts_and_reports(imgs):
    rows = [{"problem": "<image>q", "answer": "A", "images": ["imgs/a.png"]} for _ in range(6)]
    rows[1]["images"] = ["imgs/gone.png"]
    rows[3]["answer"] = ""
    rows[4]["pass_rate"] = -0.1
    f = write_jsonl(imgs / "train.jsonl", rows, raw_lines={6: "{oops"})  # line 7
    with pytest.warns(UserWarning, match=r"skipped 4 bad rows"):
        ds = load_dataset_files([f], default_task="mcq", on_bad_row="skip")
    assert len(ds) == 3 and [b.row for b in ds.skipped] == [2, 4, 5, 7]
    assert [b.field for b in ds.skipped] == ["images", "answer", "pass_rate", None]
    rep = ds.report()
    assert "loaded 3 samples (3 with images) from 1 file; skipped 4 bad rows" in rep
    assert "train.jsonl [easyr1]: 7 rows, 3 loaded (3 with images), 4 skipped" in rep
    assert "train.jsonl:2: field 'images'[0]: file not found: imgs/gone.png" in rep
    assert "train.jsonl:7: malformed JSON" in rep
    assert ds.report(max_rows=1).endswith("... and 3 more")


def test_large_text_only_file_loads_quickly(tmp_path):
    f = write_jsonl(tmp_path / "big.jsonl", [
        {"problem": f"What is {i} + {i}?", "answer": str(2 * i), "pass_rate": (i % 100) / 100, "idx": i}
        for i in range(5000)])
    t0 = time.perf_counter()
    ds = load_dataset_files([f], default_task="number")
    assert time.perf_counter() - t0 < 5.0
    assert len(ds) == 5000 and ds.samples[4999].answer == "9998" and ds.samples[4999].extra == {"idx": 4999}


def test_missing_pyarrow_only_breaks_parquet(tmp_path, monkeypatch):
    f = write_parquet(tmp_path / "p.parquet", [{"prompt": "q", "solution": "a"}])
    j = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "q", "solution": "a"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"p.parquet: reading Parquet needs pyarrow"):
        load_dataset_files([f], default_task="math")
    assert len(load_dataset_files([j], default_task="math")) == 1


def test_json_array_file(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([{"problem": "q", "answer": "a"}, {"problem": "q", "answer": []}]))
    with pytest.raises(DataError, match=r"arr.json:item 1: field 'answer'"):
        load_dataset_files([f], default_task="mcq")
