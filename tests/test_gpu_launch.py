"""The launch logic that only bites on a GPU, checked without one: Triton launches on the
tensors' device, grids within CUDA's limits, size products in 64 bits, the Triton
version the noise needs, and the test setup that decides between the interpreter and
the compiled kernels."""

import contextlib
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import imggen_fast
from imggen_fast import backends, functional
from imggen_fast.ops import _registration
from imggen_fast.ops import reparameterize_kl as reparameterize_ops

triton = pytest.importorskip("triton", reason="Triton is not installed (Linux x86-64 only)")
tl = pytest.importorskip("triton.language")
product_int64 = pytest.importorskip("imggen_fast.kernels._triton_utils").product_int64


@triton.jit
def product_kernel(result_ptr, first, second):
    tl.store(result_ptr, product_int64(first, second))


@pytest.fixture
def recorded_devices(monkeypatch):
    """torch.cuda.device replaced by a context that records the device it was given."""
    devices = []

    @contextlib.contextmanager
    def device(which):
        devices.append(torch.device(which))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    return devices


def fake_cuda(*shape, index=1):
    """A tensor on cuda:<index> without a GPU (a fake tensor: metadata only)."""
    with FakeTensorMode():
        return torch.empty(*shape, device=f"cuda:{index}")


def test_launches_run_under_the_device_of_the_cuda_operands(recorded_devices):
    calls = []

    def launcher(*arguments):
        calls.append(len(recorded_devices))
        return "launched"

    launch = _registration.on_tensors_device(launcher)
    # A CPU scalar first (a gradient of 1, say), then the CUDA operands on cuda:1.
    assert launch(torch.ones(()), fake_cuda(4), 0.5) == "launched"
    assert recorded_devices == [torch.device("cuda:1")] and calls == [1]
    # Tensors inside a list argument (bce_with_logits_backward's unit gradients).
    launch(torch.ones(()), [fake_cuda(3, index=2)], 1)
    assert recorded_devices[-1] == torch.device("cuda:2")
    # CPU tensors (the interpreter): no device switch.
    launch(torch.ones(3), 0.2)
    assert len(recorded_devices) == 2 and calls == [1, 2, 2]


def test_launch_device_is_the_first_cuda_tensor():
    assert _registration.launch_device((torch.ones(2), 3, None)) is None
    assert _registration.launch_device((None, [fake_cuda(2, index=3)], fake_cuda(2, index=1))) == torch.device("cuda:3")


def test_every_registered_launcher_is_wrapped_by_the_device_guard(monkeypatch):
    """What register_triton_launchers registers as imggen_fast::_triton_<op> (and as the ops'
    CUDA kernels) is each launcher inside the device guard: recorded by a stand-in library."""
    import importlib

    registered = {}

    class RecordingLibrary:
        def __init__(self, namespace, kind):
            pass

        def define(self, schema):
            pass

        def impl(self, name, function, dispatch_key):
            registered[(name, dispatch_key)] = function

    imggen_fast.load_kernels()  # the ops' schemas, before the stand-in replaces torch's Library
    monkeypatch.setattr(torch.library, "Library", RecordingLibrary)
    monkeypatch.setattr(_registration, "_REGISTERED", False)
    monkeypatch.setattr(_registration, "_LIBRARY", None)
    _registration.register_triton_launchers()
    guard_code = _registration.on_tensors_device(lambda: None).__code__
    for module_name in _registration.kernel_modules():
        for name, launcher in importlib.import_module(f"imggen_fast.kernels.{module_name}").LAUNCHERS.items():
            function = registered[(f"_triton_{name}", "CompositeExplicitAutograd")]
            assert function.__wrapped__ is launcher and function.__code__ is guard_code, name
    assert all(function.__code__ is guard_code for function in registered.values())


def test_bias_gradient_grid_folds_channels_into_x():
    from imggen_fast.kernels import leaky_relu

    # A Linear with 70,000 outputs and a bias: more channels than a grid's y extent, in
    # tiles of TILE_CHANNELS; and an NCHW tensor of 70,000 channels, one program per
    # (channel, block).
    programs, chunks = leaky_relu.bias_gradient_grid(outer=64, channels=70_000, inner=1)
    assert chunks == 1 and programs == triton.cdiv(70_000, leaky_relu.TILE_CHANNELS)
    programs, chunks = leaky_relu.bias_gradient_grid(outer=300, channels=70_000, inner=1)
    assert chunks == triton.cdiv(300, leaky_relu.TILE_ROWS) and programs == chunks * triton.cdiv(70_000, 32)
    programs, chunks = leaky_relu.bias_gradient_grid(outer=2, channels=70_000, inner=9)
    assert (programs, chunks) == (70_000, 1)
    programs, chunks = leaky_relu.bias_gradient_grid(outer=8, channels=3, inner=1000)
    assert chunks == triton.cdiv(8000, leaky_relu.REDUCTION_BLOCK) and programs == 3 * chunks
    with pytest.raises(ValueError, match="more than a CUDA grid holds"):
        leaky_relu.bias_gradient_grid(outer=2**31, channels=2**12, inner=1)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape,channel_dim,channels_last", [((2, 3, 40, 40), 1, False), ((2, 35, 10, 10), 1, True),
                                                           ((150, 70), -1, False)])
def test_folded_bias_gradient_grid_in_the_interpreter(shape, channel_dim, channels_last):
    """Several programs per channel on the grid's x axis, against the reference: blocks of an
    NCHW channel (inner > 1); tiles of rows by channels where inner = 1 (channels_last,
    Linear), with partial tiles on both axes."""
    from imggen_fast import reference
    from imggen_fast.kernels import leaky_relu

    generator = torch.Generator().manual_seed(0)
    output = torch.randn(shape, generator=generator)
    output = output.contiguous(memory_format=torch.channels_last) if channels_last else output
    grad_output = torch.randn(shape, generator=generator)
    grad_input, grad_bias = leaky_relu.bias_leaky_relu_backward(grad_output, output, 0.2, channel_dim)
    expected_input, expected_bias = reference.bias_leaky_relu_backward(grad_output, output, 0.2, channel_dim)
    torch.testing.assert_close(grad_input, expected_input)
    torch.testing.assert_close(grad_bias, expected_bias)


@pytest.mark.interpreter
def test_size_products_are_64_bit_for_32_bit_arguments():
    """Sizes below 2**31 arrive as i32 (the interpreter types them as the runtime does); their
    product past 2**31 must not wrap."""
    result = torch.zeros(1, dtype=torch.int64)
    product_kernel[(1,)](result, 65_536, 65_537)
    assert result.item() == 65_536 * 65_537
    product_kernel[(1,)](result, 1, 3_000_000_000)
    assert result.item() == 3_000_000_000


def test_convolution_refuses_sizes_of_2_31():
    from imggen_fast.kernels import layer_leaky_relu

    input = torch.empty(2**31, 1, 1, 1, device="meta")
    weight = torch.empty(4, 1, 1, 1, device="meta")
    with pytest.raises(ValueError, match="below 2\\*\\*31"):
        layer_leaky_relu.conv2d_leaky_relu(input, weight, None, [1, 1], [0, 0], [1, 1], 1, 0.2)


@pytest.mark.parametrize("version,refused", [("3.2.0", True), ("3.3.1", True), ("3.4.0", False), ("3.9.0", False),
                                             ("3.5.0+git1234", False), ("4.0.0", False)])
def test_triton_noise_needs_triton_3_4(version, refused):
    gap = reparameterize_ops.triton_noise_gap(version)
    assert (gap is not None) == refused
    if refused:
        assert version in gap and "triton>=3.4" in gap


@pytest.mark.interpreter
def test_old_triton_sends_the_noise_to_the_reference_with_a_warning(monkeypatch):
    """With Triton < 3.4 the Triton backend makes no noise of its own (it would not match the
    other backends'); noise given as eps still runs the kernel."""
    gap = reparameterize_ops.triton_noise_gap
    monkeypatch.setattr(reparameterize_ops, "triton_noise_gap", lambda: gap("3.3.1"))
    monkeypatch.setattr(backends, "_warned", set())
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    with backends.set_backend("triton"):
        with pytest.warns(backends.FallbackWarning, match="Triton 3.3.1"):
            functional.reparameterize_kl(mu, logvar)
        eps = torch.randn(2, 3)
        z, _ = functional.reparameterize_kl(mu, logvar, eps=eps)
    torch.testing.assert_close(z, eps)


def test_the_interpreter_is_on_exactly_where_no_gpu_exists():
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available():
        pytest.skip("a GPU exists: the interpreter is on only if the environment asked for it")
    assert interpreting


@pytest.mark.cuda
def test_cuda_marked_tests_run_only_with_a_gpu():
    assert torch.cuda.is_available()
