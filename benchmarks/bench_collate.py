"""Host collate of one GRPO step, 512 samples with images: packed (C++ span tables / their
Python twin) vs transformers' padding + ``get_rope_index`` path.

What each implementation produces from the same samples and the same micro-batches
(``plan_micro_batches``, 16k-token budget, one rank; planning itself is not timed):

  cpp / python      ``collate_packed``: packed ids [T], span table, cu_seqlens, prompt lengths
                    -- everything the packing kernels need to build embeddings, 4-row position
                    ids and labels on the device. Vision offsets come with the samples (the
                    prompt builder knows them).
  cpp_scan          the same, finding the vision spans in the host ids (one numpy scan/sample).
  cpp+positions     cpp, then position ids, labels and loss mask materialised on the host with
                    the plain-torch references: the same outputs as the transformers path.
  transformers      per micro-batch: right-pad ids to [B, Lmax], attention mask,
                    mm_token_type_ids, ``get_rope_index`` (per-sample Python over token groups)
                    and shifted labels with -100 on prompt and padding.

Pixel values are left out of every path (the same memcpy for all). CPU only: ``device`` is
ignored; torch runs on one thread (a collate worker's budget), which also keeps the numbers
steady on a shared machine. Target: cpp >= 20x transformers.
"""
from __future__ import annotations

import random
import sys

import torch

SAMPLES = 512
GROUP = 8
TOKEN_BUDGET = 16384
IMG, VID, VS, VE = 90, 91, 92, 93


def make_step(seed: int = 0):
    """512 samples: 64 prompts x 8 completions; 80% of prompts hold 1-2 images of 16-196
    tokens each; prompts 40-200 text tokens, completions 32-1024 tokens."""
    from staged.packing.collate import PackSample

    rng = random.Random(seed)
    samples = []
    for _ in range(SAMPLES // GROUP):
        ids, grids, offsets = [], [], []
        ids += [rng.randrange(3, 80) for _ in range(rng.randint(20, 100))]
        if rng.random() < 0.8:
            for _ in range(rng.randint(1, 2)):
                h, w = 2 * rng.randint(4, 14), 2 * rng.randint(4, 14)
                ids.append(VS)
                offsets.append(len(ids))
                ids += [IMG] * (h * w // 4)
                ids.append(VE)
                grids.append([1, h, w])
        ids += [rng.randrange(3, 80) for _ in range(rng.randint(20, 100))]
        prompt = torch.tensor(ids)
        for _ in range(GROUP):
            completion = torch.randint(3, 80, (rng.randint(32, 1024),))
            samples.append(PackSample(
                input_ids=torch.cat([prompt, completion]), prompt_len=len(ids),
                image_grid_thw=torch.tensor(grids) if grids else None,
                vision_offsets=offsets if grids else None))
    return samples


def rope_model():
    """Qwen2.5-VL's get_rope_index needs a model instance; its cost does not depend on size."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=100, hidden_size=16, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [1, 1, 2]}, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=16, spatial_merge_size=2, tokens_per_second=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    return Qwen2_5_VLModel(cfg).eval()


def transformers_collate(model, samples, micro_batches):
    """transformers' path for each micro-batch: padded tensors + get_rope_index + labels."""
    out = []
    for mb in micro_batches:
        ids = [samples[i].input_ids for i in mb]
        lens = torch.tensor([x.shape[0] for x in ids])
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0)
        attention_mask = torch.arange(input_ids.shape[1])[None] < lens[:, None]
        mm = (input_ids == IMG).int() + 2 * (input_ids == VID).int()
        grids = [samples[i].image_grid_thw for i in mb if samples[i].image_grid_thw is not None]
        grid = torch.cat(grids) if grids else None
        with torch.no_grad():
            pos, deltas = model.get_rope_index(input_ids, mm_token_type_ids=mm,
                                               image_grid_thw=grid, attention_mask=attention_mask)
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = input_ids[:, 1:]
        prompt = torch.tensor([samples[i].prompt_len for i in mb])
        col = torch.arange(input_ids.shape[1])[None]
        keep = (col + 1 >= prompt[:, None]) & (col + 1 < lens[:, None])
        labels = labels.masked_fill(~keep, -100)
        out.append((input_ids, attention_mask, pos, labels))
    return out


def run(device: str = "cpu", limits: dict | None = None) -> list[dict]:
    """Rows for benchmarks/__main__.py: case, impl, median/p20/p80 ms, samples/s, ratio."""
    from benchmarks.common import time_ms
    from staged.kernels.reference.packing import labels_reference, position_ids_reference
    from staged.packing import plan_micro_batches
    from staged.packing.collate import PackingConfig, collate_packed
    from staged.packing.spans import HAS_EXT

    samples = make_step()
    scan = [type(s)(**{**s.__dict__, "vision_offsets": None}) for s in samples]
    lengths = [s.input_ids.shape[0] for s in samples]
    plan = plan_micro_batches(lengths, [i // GROUP for i in range(SAMPLES)], TOKEN_BUDGET, 1)
    mbs = plan.micro_batches[0]
    cfg = PackingConfig(image_token_id=IMG, video_token_id=VID, pad_token_id=0)
    model = rope_model()
    tokens = sum(lengths)
    case = f"n={SAMPLES} T={tokens} mb={len(mbs)}"

    def packed(backend, data=samples):
        return lambda: collate_packed(data, mbs, cfg, with_pixels=False, backend=backend)

    def with_positions():
        for b in collate_packed(samples, mbs, cfg, with_pixels=False, backend="cpp"):
            t = b.table
            position_ids_reference(t.spans, t.time_scale, t.cu_seqlens, t.num_rows)
            labels_reference(b.input_ids, t.cu_seqlens, t.prompt_lens)

    impls = {"transformers": lambda: transformers_collate(model, samples, mbs)}
    if HAS_EXT:
        impls.update({"cpp": packed("cpp"), "cpp_scan": packed("cpp", scan),
                      "cpp+positions": with_positions})
    impls["python"] = packed("python")

    rows, base = [], None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a collate worker's budget; also steadier on a shared machine
    try:
        timings = {impl: time_ms(fn, "cpu", warmup=1 if impl == "transformers" else 3,
                                 rep=5 if impl == "transformers" else 20)
                   for impl, fn in impls.items()}
    finally:
        torch.set_num_threads(threads)
    for impl, t in timings.items():
        base = t["median_ms"] if impl == "transformers" else base
        rows.append({"case": case, "impl": impl, **t,
                     "samples_per_s": SAMPLES / t["median_ms"] * 1e3,
                     "speedup_vs_transformers": base / t["median_ms"]})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    from benchmarks.common import markdown_table

    print(markdown_table(run()))
