"""Evaluation on the embedded model: the CLI end to end (EasyR1 JSONL + PNG files -> table, JSON,
completions) and evaluate() directly (greedy is deterministic, sampling gives k per row, scoring wired)."""
import json
import os
import subprocess
import sys
import warnings

import pytest

from staged.data import Sample, make_synthetic_dataset
from staged.eval import evaluate, load_benchmarks, markdown_table, parse_args, summarize
from staged.rewards import compute_rewards

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The embedded checkpoint and three EasyR1-format benchmark files (images as PNG paths); the
    textual file's odd rows carry data_source "textual_odd" (a benchmark of their own)."""
    from staged.models.embedded import build_embedded_checkpoint

    root = tmp_path_factory.mktemp("eval")
    ckpt = build_embedded_checkpoint(root / "ckpt", seed=0)
    (root / "img").mkdir()
    files = []
    for kind, n in (("perception", 5), ("visual", 3), ("textual", 4)):
        rows = []
        for i, s in enumerate(make_synthetic_dataset(kind, n, seed=7)):
            paths = []
            for j, im in enumerate(s.images):
                rel = f"img/{kind}_{i}_{j}.png"
                im.save(root / rel)
                paths.append(rel)
            row = {"problem": "<image>" * len(paths) + s.prompt, "answer": s.answer, "images": paths, "task": s.task}
            if kind == "textual" and i % 2:
                row["data_source"] = "textual_odd"
            rows.append(row)
        f = root / f"{kind}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(f)
    return root, ckpt, files


@pytest.fixture(scope="module")
def model_and_processor(bench):
    from staged.models.loading import load_model_and_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image-only processor fallback without torchvision
        return load_model_and_processor(bench[1])


def _check_metrics(m, n, k):
    assert m["n"] == n and m["k"] == k and m["completions"] == n * k
    for key in ("accuracy", "format", "truncated"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert 0 < m["response_tokens"] <= 12
    assert m["verifier_errors"] == 0 and m["verifier_timeouts"] == 0


def test_cli_end_to_end(bench):
    root, ckpt, files = bench
    out = root / "out"
    cmd = [sys.executable, "-m", "staged.eval", "--model", str(ckpt), "--data", *map(str, files),
           "--greedy", "--max-new-tokens", "12", "--batch-size", "3", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert table.splitlines()[0].startswith("| benchmark | n | k | accuracy (%) |")
    for name in ("perception", "visual", "textual", "textual_odd", "average", "all"):
        assert f"| {name} |" in table

    res = json.loads((out / "results.json").read_text())
    assert list(res["benchmarks"]) == ["perception", "visual", "textual", "textual_odd"]
    for name, n in (("perception", 5), ("visual", 3), ("textual", 2), ("textual_odd", 2)):
        _check_metrics(res["benchmarks"][name], n, 1)
    _check_metrics(res["all"], 12, 1)
    assert res["settings"]["greedy"] is True and res["settings"]["max_new_tokens"] == 12
    assert (out / "results.md").read_text().strip() == table.strip()
    lines = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    assert {"benchmark", "row", "sample", "prompt", "answer", "completion", "accuracy", "response_tokens",
            "truncated"} <= set(lines[0])
    assert sum(r["accuracy"] for r in lines) / 12 == pytest.approx(res["all"]["accuracy"])


def test_evaluate_greedy_is_deterministic_and_scored(bench, model_and_processor):
    model, processor = model_and_processor
    datasets = load_benchmarks(bench[2][:1])
    assert list(datasets) == ["perception"] and len(datasets["perception"]) == 5
    kw = dict(max_new_tokens=6, progress=False)
    r1 = evaluate(model, processor, datasets, batch_size=5, **kw)
    r2 = evaluate(model, processor, datasets, batch_size=2, **kw)
    c1 = [c["completion"] for c in r1["completions"]]
    assert c1 == [c["completion"] for c in r2["completions"]]  # batch composition does not matter
    _check_metrics(r1["benchmarks"]["perception"], 5, 1)

    # scoring is wired: rows whose answer IS the model's greedy output (caption task) score 1
    echo = [Sample(prompt=s.prompt, answer=c or "-", task="caption", images=s.images)
            for s, c in zip(datasets["perception"], c1)]
    r3 = evaluate(model, processor, {"echo": echo}, batch_size=5, **kw)
    want = compute_rewards(c1, echo)["accuracy"].mean().item()
    assert want > 0 and r3["benchmarks"]["echo"]["accuracy"] == pytest.approx(want)


def test_evaluate_sampled_k_and_text_only(model_and_processor):
    model, processor = model_and_processor
    data = {"textual": make_synthetic_dataset("textual", 3, seed=1),
            "visual": make_synthetic_dataset("visual", 2, seed=1)}
    r = evaluate(model, processor, data, greedy=False, temperature=1.0, samples=2, max_new_tokens=5,
                 batch_size=2, progress=False)
    assert r["settings"]["samples"] == 2 and r["settings"]["temperature"] == 1.0
    for name, n in (("textual", 3), ("visual", 2)):
        m = r["benchmarks"][name]
        assert m["n"] == n and m["completions"] == 2 * n and 0.0 <= m["pass@2"] <= 1.0
        assert m["accuracy"] <= m["pass@2"] + 1e-9
    assert [(c["row"], c["sample"]) for c in r["completions"][:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "| accuracy (%) | pass@2 (%) |" in markdown_table(r).splitlines()[0]


def test_summarize_and_table_by_hand():
    recs = [{"benchmark": "a", "row": 0, "sample": s, "accuracy": acc, "format": 1.0, "response_tokens": 10,
             "truncated": False} for s, acc in ((0, 1.0), (1, 0.0))]
    recs += [{"benchmark": "b", "row": r, "sample": s, "accuracy": 0.0, "format": 0.0, "response_tokens": 30,
              "truncated": True} for r in range(2) for s in range(2)]
    res = summarize(recs, ["a", "b"], 2, {"b": [1, 2]})
    assert res["benchmarks"]["a"]["accuracy"] == 0.5 and res["benchmarks"]["a"]["pass@2"] == 1.0
    assert res["benchmarks"]["b"]["verifier_timeouts"] == 2 and res["all"]["verifier_errors"] == 1
    assert res["average"]["accuracy"] == 0.25 and res["all"]["accuracy"] == pytest.approx(1 / 6)
    assert res["average"]["response_tokens"] == 20 and res["all"]["response_tokens"] == pytest.approx(70 / 3)
    table = markdown_table(res).splitlines()
    assert table[2] == "| a | 1 | 2 | 50.00 | 100.00 | 100.00 | 10.0 | 0.00 |"
    assert table[-2].startswith("| average |  |  | 25.00 | 50.00 |")


def test_cli_argument_errors():
    base = ["--model", "m", "--data", "f.jsonl"]
    assert parse_args(base).temperature is None
    for bad in (["--samples", "4"], ["--greedy", "--temperature", "1"], ["--temperature", "0"],
                ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(None, None, {"x": []})
