"""On 2 ranks only rank 0 reads the checkpoint's weights (staged.parallel.shard_from_rank0).

Rank 1 is handed a copy of the checkpoint directory WITHOUT its *.safetensors files (config,
generation config, tokenizer and processor only): had it tried to load weights it would fail.
Both ranks then gather the full state dict and every buffer and compare them, bit for bit, with
the checkpoint loaded the ordinary way — which includes the non-persistent rotary ``inv_freq``
buffers that no state dict carries."""
import shutil
import subprocess
import sys
import textwrap

import pytest

from train_helpers import child_env

CHILD = textwrap.dedent('''
    import sys, types, warnings
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from staged import parallel
    from staged.models.loading import load_model_and_processor
    from staged.train import build_model

    warnings.simplefilter("ignore")
    full_dir, weightless_dir = sys.argv[1], sys.argv[2]
    d = parallel.init_distributed("cpu")
    assert d.world_size == 2, d.world_size
    cfg = types.SimpleNamespace(attn_implementation="sdpa", precision="fp32",
                                fsdp=types.SimpleNamespace(activation_checkpointing=False, reshard_after_forward=True))
    # freeze = ["vision"]: frozen and trainable parameters both travel
    model, _ = build_model(full_dir if d.rank == 0 else weightless_dir, cfg, d, ["vision"])
    # cpu_offload=False: every rank gets the full tensors (with offload only rank 0 would)
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    ref, _ = load_model_and_processor(full_dir)
    want = ref.state_dict()
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=lambda m: f"rank {d.rank} {k}: {m}")
    bufs, ref_bufs = dict(model.named_buffers()), dict(ref.named_buffers())
    assert bufs.keys() == ref_bufs.keys() and any("inv_freq" in k for k in bufs), sorted(bufs)
    for k in ref_bufs:
        torch.testing.assert_close(bufs[k].cpu(), ref_bufs[k], atol=0, rtol=0, msg=lambda m: f"rank {d.rank} {k}: {m}")
    eos = model.generation_config.eos_token_id
    assert eos == ref.generation_config.eos_token_id, (eos, ref.generation_config.eos_token_id)
    print(f"rank {d.rank}: {len(want)} tensors and {len(bufs)} buffers match the checkpoint", flush=True)
    if parallel.destroy_distributed():
        parallel.exit_now(0)
''')


@pytest.mark.slow
def test_only_rank0_reads_weights(tmp_path, embedded_dir):
    weightless = tmp_path / "weightless"
    shutil.copytree(embedded_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    assert list(embedded_dir.glob("*.safetensors")) and not list(weightless.glob("*.safetensors"))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(embedded_dir), str(weightless)],
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"rc {p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-8000:]}"
    for r in (0, 1):
        assert f"rank {r}: " in p.stdout and "match the checkpoint" in p.stdout, p.stdout
