"""The embedded default model: a tiny Qwen2.5-VL built offline, saved as a normal HF checkpoint.

`python -m staged.train` with no arguments trains this model on synthetic data (staged.data.synthetic)
on a CPU in minutes. Nothing here downloads anything: the tokenizer is built with the `tokenizers`
library from a fixed word list, the image processor and model from configs written out below.

What gets built (size="tiny", the CPU default):
  * tokenizer: byte-level BPE over printable ASCII (each digit stays its own token, so arithmetic
    is digit by digit) plus one token per word that the synthetic prompts and the usual format
    instructions use (" circles", "How", ...); the Qwen-VL special tokens; `<think>`, `</think>` and `\\boxed{` as
    plain (non-special) added tokens so they survive `skip_special_tokens=True` decoding.
    eos = <|im_end|>, pad = <|endoftext|>. 300 tokens in all.
  * image processor: Qwen2VLImageProcessorPil (the slow, PIL/numpy one: no torchvision needed),
    patch 14, merge 2, min_pixels 56*56, max_pixels 112*112: a 56x56 image is 16 patches = 4
    <|image_pad|> tokens; anything bigger is shrunk to at most 16 tokens.
  * model: Qwen2_5_VLForConditionalGeneration, text hidden 128 x 4 layers (4 heads, 2 kv heads),
    vision hidden 64 x 2 blocks, untied lm_head (like the 7B, so the fused log-prob kernel sees a
    separate weight). 926k parameters (257k in the vision tower).

The checkpoint directory is then loaded through staged.models.loading like any other checkpoint.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

# Bump when anything below changes what gets written: a directory stamped with another version is rebuilt.
EMBEDDED_VERSION = 1
STAMP_FILE = "staged_embedded.json"

# ----------------------------------------------------------------------------------------------
# Tokenizer

SPECIAL_TOKENS = [  # special: stripped by decode(skip_special_tokens=True)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# Not special: the reward reads them in decoded completions. `\boxed{` as one token keeps the answer
# format short for the tiny model (the byte-level fallback would spend 3 tokens on it).
PLAIN_ADDED_TOKENS = ["<think>", "</think>", "\\boxed{"]

# Whole-word tokens: the synthetic prompts' words (staged.data.synthetic), the chat template's, and the
# common format instructions' (EasyR1 / the paper). Anything else still tokenizes, character by character.
WORDS = """
system user assistant You are a helpful
How many What Where Which Count Describe There is are in the image and add subtract plus minus
number numbers shape shapes colour color of object objects the picture
circle circles square squares triangle triangles diamond diamonds
red green blue yellow top bottom left right
A B C D Answer answer Question question Options options Choose choose letter correct option
FIRST first think about reasoning process as an internal monologue then provide final
The MUST BE must be enclosed within tags put Please step by reason
""".split()

# Printable ASCII + newline + tab: the byte-level base alphabet. Other bytes map to <unk>.
_BASE_CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]

# Qwen2.5-VL's chat template, verbatim (a list-of-parts content gets one vision block per image).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe_vocab() -> dict[str, int]:
    """Byte-level vocabulary: the printable-ASCII alphabet, then each word of WORDS (bare and with
    a leading space, as the GPT-2 split regex cuts them) as one token, then " 7", " +", ... .

    There are no merges: the BPE model runs with `ignore_merges=True`, which emits a pre-token
    found in the vocabulary as one token and spells any other character by character. (Chained
    left-to-right merges would not do: BPE fires the lowest-ranked merge first, so one word's
    chain breaks another's.) Built by hand, not trained, so it is identical everywhere."""
    b2u = dict(zip((chr(b) for b in range(256)), _bytes_to_unicode()))
    vocab: dict[str, int] = {}
    pieces = list(_BASE_CHARS)
    for w in WORDS:
        pieces += [w, " " + w]
    # A space before a digit or an operator is one token too: prompts say "3 + 4" and "(A) 1".
    pieces += [" " + c for c in "0123456789+-=?("]
    for p in pieces:
        vocab.setdefault("".join(b2u[c] for c in p), len(vocab))
    return vocab


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable unicode map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_tokenizer(vocab_size: int | None = None):
    """A PreTrainedTokenizerFast with the Qwen-VL specials and chat template (see module doc).

    ``vocab_size``: pad the vocabulary with filler tokens up to that many (benchmarks at the real
    151,936-token vocabulary): each is a NUL byte and a number, so no text ever encodes to one,
    and every id a model samples decodes to a string."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _bpe_vocab()
    vocab["<unk>"] = len(vocab)
    if vocab_size is not None:
        fill = vocab_size - len(vocab) - len(SPECIAL_TOKENS) - len(PLAIN_ADDED_TOKENS)
        if fill < 0:
            raise ValueError(f"embedded tokenizer: vocab_size {vocab_size} is below its own {vocab_size - fill}")
        nul = _bytes_to_unicode()[0]
        for i in range(fill):
            vocab[f"{nul}{i}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, ignore_merges=True))
    # GPT-2 split regex (words, digit runs, punctuation runs, whitespace) then bytes -> unicode.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])

    # Every word must really come out as one token (see _bpe_vocab).
    broken = [w for w in WORDS if len(tok.encode(w).ids) != 1 or len(tok.encode(" " + w).ids) != 1]
    if broken:
        raise RuntimeError(f"embedded tokenizer: these words do not come out as one token: {broken}")

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        padding_side="left",  # generation batches; SFT batches pad on the right explicitly
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = QWEN_CHAT_TEMPLATE
    return hf


# ----------------------------------------------------------------------------------------------
# Image processor and processor

IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 112 * 112


def build_image_processor():
    """The slow (PIL/numpy) Qwen2-VL image processor with small pixel bounds."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )


def build_processor(tokenizer=None, image_processor=None):
    """staged's image-only VLProcessor (transformers' Qwen2_5_VLProcessor cannot be built without
    torchvision, see staged.models.loading). Saved with processor_class=Qwen2_5_VLProcessor so that
    AutoProcessor builds the real one where it can."""
    from .loading import VLProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = image_processor if image_processor is not None else build_image_processor()
    return VLProcessor(image_processor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------
# Model config

SIZES = {
    # text: hidden, intermediate, layers, heads, kv heads; vision: hidden, intermediate, depth, heads
    "tiny": dict(hidden=128, inter=256, layers=4, heads=4, kv=2, v_hidden=64, v_inter=128, v_depth=2, v_heads=4),
    # for GPU smoke runs: still seconds per step, big enough that kernels see real tiles
    "small": dict(hidden=256, inter=768, layers=6, heads=8, kv=4, v_hidden=128, v_inter=256, v_depth=2, v_heads=4),
    # the rollout / train-step benchmarks' realistic shape (with vocab_size=151_936: 82M parameters)
    "bench": dict(hidden=256, inter=1024, layers=4, heads=4, kv=2, v_hidden=256, v_inter=512, v_depth=2, v_heads=4),
}


def build_config(tokenizer, size: str = "tiny"):
    from transformers import Qwen2_5_VLConfig

    if size not in SIZES:
        raise ValueError(f"embedded model size must be one of {sorted(SIZES)}, got {size!r}")
    s = SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    half = head_dim // 2  # mrope sections (temporal, height, width) share the rotary half-dims
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    ids = {t_: tokenizer.convert_tokens_to_ids(t_) for t_ in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text_config = dict(
        vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["inter"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
        max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False, tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_inter"], num_heads=s["v_heads"],
        in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        window_size=112, fullatt_block_indexes=[s["v_depth"] - 1], out_hidden_size=s["hidden"],
        tokens_per_second=2, hidden_act="silu",
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # Generation defaults live in generation_config; the root ids help code that reads config.eos_token_id.
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, k, text_config[k])
    return cfg


# ----------------------------------------------------------------------------------------------
# Build / reuse

_REQUIRED = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "preprocessor_config.json", "chat_template.jinja", STAMP_FILE)


def _stamp(seed: int, size: str, vocab_size: int | None = None) -> dict:
    import transformers
    # transformers' version is part of it: a checkpoint written by one version's config classes is
    # rebuilt (identically) rather than parsed by another's.
    out = {"version": EMBEDDED_VERSION, "seed": int(seed), "size": size, "transformers": transformers.__version__}
    if vocab_size is not None:
        out["vocab_size"] = int(vocab_size)
    return out


def _is_complete(d: pathlib.Path, stamp: dict) -> bool:
    if not all((d / f).is_file() for f in _REQUIRED):
        return False
    try:
        return json.loads((d / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def build_embedded_checkpoint(out_dir, *, seed: int = 0, size: str = "tiny",
                              vocab_size: int | None = None) -> pathlib.Path:
    """Build the embedded model, tokenizer and processor offline into `out_dir` (an ordinary HF
    checkpoint directory) and return its path.

    Deterministic for (seed, size, vocab_size: None = the tokenizer's own, else padded, see
    build_tokenizer); idempotent: a directory that already holds a complete build of
    the same version is reused untouched. Safe against concurrent callers (e.g. every torchrun rank):
    each builds into a private temporary directory and renames it into place; the loser of the race
    discards its copy.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = pathlib.Path(out_dir).expanduser().resolve()
    stamp = _stamp(seed, size, vocab_size)
    if size not in SIZES:
        raise ValueError(f"embedded model size must be one of {sorted(SIZES)}, got {size!r}")
    if _is_complete(out, stamp):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        processor = build_processor(build_tokenizer(vocab_size))
        tok = processor.tokenizer
        config = build_config(tok, size)

        # Weights from a private generator state: the caller's RNG is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=[config.eos_token_id],
            pad_token_id=config.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        )
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one tiny shard: no "Writing model shards" bar in the demo's log
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        processor.save_pretrained(tmp, processor_class="Qwen2_5_VLProcessor")
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")

        if out.exists():
            if _is_complete(out, stamp):  # someone else finished first
                return out
            shutil.rmtree(out, ignore_errors=True)  # stale or partial build
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_complete(out, stamp):
                raise
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_checkpoint_dir() -> pathlib.Path:
    """Where the embedded default lives unless told otherwise: $STAGED_CACHE or ~/.cache/staged."""
    root = os.environ.get("STAGED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "staged")
    return pathlib.Path(root) / f"embedded-v{EMBEDDED_VERSION}"


# ----------------------------------------------------------------------------------------------
# A tiny Qwen3-VL (tests and CPU smoke runs of the Qwen3-VL path)

QWEN3_VL_PATCH = 16  # Qwen3-VL's vision patch (Qwen2.5-VL: 14)


def build_qwen3_vl_config(tokenizer, *, hidden: int = 64, layers: int = 2, deepstack=(0,)):
    """A tiny Qwen3VLConfig over the embedded tokenizer: text hidden ``hidden`` x ``layers``
    (head_dim 16, interleaved mrope), a 2-block vision tower whose deepstack mergers feed the
    first ``len(deepstack)`` decoder layers (Qwen3-VL-8B: blocks 8, 16, 24 -> decoder layers 0-2)."""
    from transformers import Qwen3VLConfig

    ids = {t_: tokenizer.convert_tokens_to_ids(t_) for t_ in SPECIAL_TOKENS}
    head_dim = 16
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
        rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False)
    vision_config = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=QWEN3_VL_PATCH,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=64,
        deepstack_visual_indexes=list(deepstack), hidden_act="gelu_pytorch_tanh")
    cfg = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, k, text_config[k])
    return cfg


def build_qwen3_vl_checkpoint(out_dir, *, seed: int = 0, **config_kw) -> pathlib.Path:
    """A tiny random Qwen3-VL checkpoint in ``out_dir`` (Qwen3VLForConditionalGeneration built
    from config, ``save_pretrained``), with the embedded tokenizer and a patch-16 image processor
    (64x64 .. 128x128 pixels: 4 .. 16 image tokens). Not cached: the caller owns the directory."""
    import torch
    from transformers import GenerationConfig, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

    out = pathlib.Path(out_dir).expanduser().resolve()
    tok = build_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
        patch_size=QWEN3_VL_PATCH, temporal_patch_size=2, merge_size=2)
    processor = build_processor(tok, image_processor)
    config = build_qwen3_vl_config(tok, **config_kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[config.eos_token_id], pad_token_id=config.pad_token_id,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out, processor_class="Qwen3VLProcessor")
    return out
