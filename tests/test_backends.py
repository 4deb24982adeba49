"""Which implementation serves a call: the automatic choice, overrides by environment
variable and set_backend (also a context manager, per thread), one op reached by every
backend, and clear errors for backends that cannot serve a call."""

import json
import threading
import warnings

import pytest
import torch
from helpers import kernel_op, run_python

import imggen_fast
from imggen_fast import backends, functional


def test_auto_picks_cpp_for_cpu_tensors():
    with imggen_fast.set_backend("auto"):
        assert backends.choose("cpu") == "cpp"
        assert backends.auto_choice("cpu")[0] == "cpp"


@pytest.mark.interpreter
def test_set_backend_is_a_setter_and_a_context_manager():
    before = imggen_fast.get_backend()
    with imggen_fast.set_backend("reference"):
        assert imggen_fast.get_backend() == "reference"
        assert backends.choose("cpu") == "reference"
        with imggen_fast.set_backend("triton"):
            assert backends.choose("cpu") == "triton"
        assert backends.choose("cpu") == "reference"
    assert imggen_fast.get_backend() == before
    imggen_fast.set_backend("reference")
    try:
        assert backends.choose("cpu") == "reference"
    finally:
        imggen_fast.set_backend(before)


@pytest.mark.interpreter
def test_the_choice_is_per_thread_and_overlapping_contexts_restore_it():
    """Two threads in overlapping set_backend contexts see only their own choice, the C++
    kernels of each thread too, and the setting is as before once both exit."""
    before = imggen_fast.get_backend()
    inside, released = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def worker(name, backend):
        with imggen_fast.set_backend(backend):
            inside.wait()
            seen[name] = (imggen_fast.get_backend(), backends.choose("cpu"),
                          torch.ops.imggen_fast._triton_chosen())
            released.wait()
        seen[name + " after"] = imggen_fast.get_backend()

    threads = [threading.Thread(target=worker, args=("a", "triton")),
               threading.Thread(target=worker, args=("b", "reference"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen["a"] == ("triton", "triton", True)
    assert seen["b"] == ("reference", "reference", False)
    assert seen["a after"] == seen["b after"] == before
    assert imggen_fast.get_backend() == before and not torch.ops.imggen_fast._triton_chosen()


@pytest.mark.interpreter
def test_one_op_serves_every_backend_and_backward_keeps_the_forward_choice():
    """torch.ops.imggen_fast.<op> runs the C++ kernel, or the Triton launcher when Triton is
    chosen; a backward run after leaving the Triton context still runs Triton's kernels."""
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    op = kernel_op("conv2d_leaky_relu")

    def ops_run(function):
        with torch.autograd.profiler.profile() as profile:
            function()
        return {event.name for event in profile.function_events if event.name.startswith("imggen_fast::")}

    with imggen_fast.set_backend("triton"):
        y = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, 0.2)
    backward_ops = ops_run(lambda: y.backward(torch.ones_like(y)))
    assert any(name.startswith("imggen_fast::_triton_bias_leaky_relu_backward") for name in backward_ops), backward_ops
    forward_ops = ops_run(lambda: op(x, w, b, [1, 1], [1, 1], [1, 1], 1, 0.2))
    assert not any("_triton_" in name for name in forward_ops), forward_ops


@pytest.mark.interpreter
def test_every_backend_gives_the_same_result():
    grad_output, output = torch.randn(17, 5), torch.randn(17, 5)
    results = {}
    for name in ("reference", "cpp", "triton"):
        with imggen_fast.set_backend(name):
            results[name] = functional.leaky_relu_backward_from_output(grad_output, output, 0.3)
    assert torch.equal(results["cpp"], results["reference"])
    assert torch.equal(results["triton"], results["reference"])


@pytest.mark.parametrize("name", ["fast", "", "CPP ", None, 3])
def test_unknown_backend_name_is_a_clear_error(name):
    with pytest.raises(ValueError, match="unknown backend"):
        imggen_fast.set_backend(name)


def test_names_are_case_insensitive():
    with imggen_fast.set_backend("Reference"):
        assert imggen_fast.get_backend() == "reference"


def test_environment_variable_selects_the_backend():
    code = ("import json, torch, imggen_fast, threading\nfrom imggen_fast import backends\n"
            "other = []\nthread = threading.Thread(target=lambda: other.append(backends.choose('cpu')))\n"
            "thread.start(); thread.join()\n"
            "print(json.dumps([imggen_fast.get_backend(), backends.choose('cpu'), other[0]]))")
    result = run_python(code, env={"IMGGEN_FAST_BACKEND": "reference"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["reference", "reference", "reference"]


def test_unknown_environment_value_names_the_variable():
    code = "import torch, imggen_fast\nimggen_fast.functional.leaky_relu_backward_from_output(torch.ones(2), torch.ones(2))"
    result = run_python(code, env={"IMGGEN_FAST_BACKEND": "gpu-please"})
    assert result.returncode != 0
    assert "IMGGEN_FAST_BACKEND: unknown backend 'gpu-please'" in result.stderr


def test_triton_on_cpu_without_the_interpreter_is_an_error():
    code = ("import torch, imggen_fast\nimggen_fast.set_backend('triton')\n"
            "imggen_fast.functional.leaky_relu_backward_from_output(torch.ones(2), torch.ones(2))")
    result = run_python(code, env={"TRITON_INTERPRET": None})
    assert result.returncode != 0
    assert "BackendUnavailable" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


def test_cuda_backend_without_a_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the cuda backend can serve CUDA tensors here")
    with imggen_fast.set_backend("cuda"):
        with pytest.raises(imggen_fast.BackendUnavailable, match="need CUDA tensors"):
            functional.leaky_relu_backward_from_output(torch.ones(2), torch.ones(2))
    assert "no CUDA GPU" in backends.why_not("cuda", "cuda")


def test_cpp_backend_never_serves_other_devices():
    for device_type in ("cuda", "meta"):
        assert backends.why_not("cpp", device_type) is not None
    with imggen_fast.set_backend("cpp"):
        with pytest.raises(imggen_fast.BackendUnavailable, match="runs on CPU tensors"):
            functional.leaky_relu_backward_from_output(torch.ones(3, device="meta"), torch.ones(3, device="meta"))


def test_unsupported_configuration_goes_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.falls_back("example_op", "triton", "groups > 1 is not covered")
        assert not backends.falls_back("example_op", "triton", None)
        assert not backends.falls_back("example_op", "reference", "groups > 1 is not covered")
    messages = [str(w.message) for w in caught if issubclass(w.category, backends.FallbackWarning)]
    assert messages == ["imggen_fast.example_op: groups > 1 is not covered; using the reference implementation"]


def test_meta_tensors_use_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught, imggen_fast.set_backend("auto"):
        warnings.simplefilter("always")
        result = functional.leaky_relu_backward_from_output(torch.ones(3, device="meta"),
                                                            torch.ones(3, device="meta"))
    assert result.device.type == "meta" and result.shape == (3,)
    assert any("no kernel runs on meta tensors" in str(w.message) for w in caught)
