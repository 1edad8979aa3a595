"""The decode step's CPU linears through oneDNN with reordered weights (staged.rollout.cpu_linear):
the module's numbers up to rounding, every row the same bits whatever the row count, the weight
re-reordered when it changes, the module's own forward back after the block."""
import pytest
import torch
from torch import nn

from staged.rollout import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch has no oneDNN linear ops")

# Fan-ins over 1,024: oneDNN runs a lone row through another kernel (a gemv) unless it is doubled.
SHAPES = [(64, 64, True), (24, 100, False), (256, 151_936, False), (37, 5, True), (1280, 96, True), (1536, 40, False)]


@pytest.mark.parametrize("fan_in,fan_out,bias", SHAPES)
def test_rows_do_not_depend_on_the_row_count(fan_in, fan_out, bias):
    gen = torch.Generator().manual_seed(fan_out)
    lin = nn.Linear(fan_in, fan_out, bias=bias)
    x = torch.randn(40, 1, fan_in, generator=gen)
    ref = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
    with torch.no_grad(), cpu_linear.packed_linears([lin], torch.device("cpu")):
        full = lin(x)
        for n in (1, 2, 3, 7, 16, 17, 33):
            assert torch.equal(lin(x[:n].contiguous()), full[:n]), n
        assert torch.equal(lin(x[5, 0]), full[5, 0])  # one row without a batch dimension
        many = x.repeat(20, 1, 1)[:700]  # a prefill's many rows
        assert torch.equal(lin(many), full.repeat(20, 1, 1)[:700])
        perm = torch.randperm(40, generator=gen)
        assert torch.equal(lin(x[perm]), full[perm])
    torch.testing.assert_close(full.double(), ref, atol=1e-5 * fan_in ** 0.5, rtol=1e-5)


# 18,944: Qwen2.5-VL-7B's MLP width, where a lone bf16 row takes another kernel (here: 3 of 32 rows differ).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fan_in,fan_out", [(1536, 640), (1024, 96), (64, 48), (18944, 256)])
def test_half_rows_do_not_depend_on_the_row_count(fan_in, fan_out, dtype):
    gen = torch.Generator().manual_seed(fan_in)
    lin = nn.Linear(fan_in, fan_out).to(dtype)
    x = torch.randn(100, fan_in, generator=gen).to(dtype)
    with torch.no_grad(), cpu_linear.packed_linears([lin], torch.device("cpu")):
        full = lin(x)
        for n in (1, 2, 31, 32, 33, 36, 37, 64, 65, 99):
            assert torch.equal(lin(x[:n]), full[:n]), n
        for r in range(32):  # each row as the lone 33rd of a call (a chunk of 32, then one row)
            assert torch.equal(lin(torch.cat([x[64:96], x[r:r + 1]]))[32], full[r]), r
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    torch.testing.assert_close(full.double(), ref, atol=2e-2 * fan_in ** 0.5 / 16, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv", [nn.Conv3d(3, 1152, (2, 16, 16), (2, 16, 16), bias=True),  # Qwen3-VL's
                                  nn.Conv2d(3, 40, (14, 14), (14, 14), bias=False)])
def test_a_patch_embedding_does_not_depend_on_the_patches_beside_it(conv, dtype):
    """A Qwen-VL tower's patch embedding (kernel = stride) in bf16 runs as the linear it is: oneDNN's
    bf16 convolution picks its kernel by how many patches are in the call (its fp32 one, kept,
    gives each patch the same bits: checked here too)."""
    gen = torch.Generator().manual_seed(7)
    conv = conv.to(dtype)
    x = torch.randn(68, conv.in_channels, *conv.kernel_size, generator=gen).to(dtype)
    with torch.no_grad():
        ref = conv(x)
        with cpu_linear.packed_linears([nn.Sequential(conv)], torch.device("cpu")):
            full = conv(x)
            for n in (1, 4, 8, 12, 33):
                assert torch.equal(conv(x[:n]), full[:n]), n
    assert full.shape == ref.shape
    torch.testing.assert_close(full.float(), ref.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)


def test_weight_changes_are_seen_and_the_forward_is_restored():
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad(), cpu_linear.packed_linears([nn.Sequential(lin)], torch.device("cpu")):
        assert "forward" in vars(lin)
        a = lin(x)
        lin.weight.mul_(2)  # an optimizer step between rollouts writes in place
        torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)
        lin.weight = nn.Parameter(torch.randn(8, 16))  # FSDP2 swaps in the gathered weight
        torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)
        assert not torch.equal(a, lin(x))
    assert "forward" not in vars(lin)


def test_grad_other_dtypes_and_devices_use_the_modules_own_forward():
    lin, lin64 = nn.Linear(8, 4), nn.Linear(8, 4).double()
    with cpu_linear.packed_linears([lin, lin64], torch.device("cpu")):
        y = lin(torch.randn(2, 8))  # grad enabled: autograd needs the module's own op
        y.sum().backward()
        assert lin.weight.grad is not None
        with torch.no_grad():
            x = torch.randn(2, 8, dtype=torch.float64)
            assert torch.equal(lin64(x), torch.nn.functional.linear(x, lin64.weight, lin64.bias))
    with cpu_linear.packed_linears([lin], torch.device("meta")):
        assert "forward" not in vars(lin)


def test_a_refused_reorder_falls_back_to_the_modules_forward(monkeypatch):
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)

    calls = []

    def refuse(*a):
        calls.append(a)
        raise RuntimeError("oneDNN: unsupported")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse, raising=False)
    with torch.no_grad(), cpu_linear.packed_linears([lin], torch.device("cpu")):
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert len(calls) == 1  # asked once, then the module's own forward
    assert "forward" not in vars(lin)


def test_a_forward_set_on_the_instance_runs_and_stays():
    """accelerate's hooks (and users' wrappers) replace a module's forward on the instance: such a
    module keeps its own during the rollout (a hook may move the weights in first) and after it."""
    lin, plain = nn.Linear(8, 4), nn.Linear(8, 4)
    calls = []
    inner = lin.forward

    def hooked(x):
        calls.append(1)
        return inner(x)

    lin.forward = hooked
    with torch.no_grad(), cpu_linear.packed_linears([nn.Sequential(lin, plain)], torch.device("cpu")):
        lin(torch.randn(2, 8))
        assert calls == [1] and vars(lin)["forward"] is hooked
        assert "forward" in vars(plain)  # the others still packed
    assert vars(lin)["forward"] is hooked and "forward" not in vars(plain)
