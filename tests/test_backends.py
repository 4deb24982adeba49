"""Which implementation serves a call: the automatic choice, overrides by environment
variable and set_backend (also a context manager), and clear errors for backends that
cannot serve a call."""

import json
import warnings

import pytest
import torch
from helpers import run_python

import imggen_fast
from imggen_fast import backends, functional
from imggen_fast.ops import leaky_relu

CPU = torch.device("cpu")


def test_auto_picks_cpp_for_cpu_tensors():
    with imggen_fast.set_backend("auto"):
        assert backends.choose("cpu") == "cpp"
        assert leaky_relu.IMPLEMENTATIONS.backend_for(CPU) == "cpp"


def test_set_backend_is_a_setter_and_a_context_manager():
    before = imggen_fast.get_backend()
    with imggen_fast.set_backend("reference"):
        assert imggen_fast.get_backend() == "reference"
        assert leaky_relu.IMPLEMENTATIONS.backend_for(CPU) == "reference"
        with imggen_fast.set_backend("triton"):
            assert leaky_relu.IMPLEMENTATIONS.backend_for(CPU) == "triton"
        assert leaky_relu.IMPLEMENTATIONS.backend_for(CPU) == "reference"
    assert imggen_fast.get_backend() == before
    imggen_fast.set_backend("reference")
    try:
        assert leaky_relu.IMPLEMENTATIONS.backend_for(CPU) == "reference"
    finally:
        imggen_fast.set_backend(before)


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
    code = ("import json, torch, imggen_fast\nfrom imggen_fast.ops import leaky_relu\n"
            "print(json.dumps([imggen_fast.get_backend(), leaky_relu.IMPLEMENTATIONS.backend_for(torch.device('cpu'))]))")
    result = run_python(code, env={"IMGGEN_FAST_BACKEND": "reference"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["reference", "reference"]


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


def test_unsupported_configuration_goes_to_the_reference_with_one_warning():
    implementations = backends.Implementations("example_op", reference=lambda: "reference",
                                               cpp=lambda: (lambda: "cpp"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert implementations.select(CPU, unsupported="groups > 1 is not covered")() == "reference"
        assert implementations.select(CPU)() == "cpp"
    messages = [str(w.message) for w in caught if issubclass(w.category, backends.FallbackWarning)]
    assert messages == ["imggen_fast.example_op: groups > 1 is not covered; using the reference implementation"]


def test_an_op_without_the_asked_backend_is_an_error():
    implementations = backends.Implementations("example_op", reference=lambda: "reference")
    with imggen_fast.set_backend("cpp"):
        with pytest.raises(imggen_fast.BackendUnavailable, match="has no cpp implementation"):
            implementations.select(CPU)


def test_meta_tensors_use_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught, imggen_fast.set_backend("auto"):
        warnings.simplefilter("always")
        result = functional.leaky_relu_backward_from_output(torch.ones(3, device="meta"),
                                                            torch.ones(3, device="meta"))
    assert result.device.type == "meta" and result.shape == (3,)
    assert any("no kernel runs on meta tensors" in str(w.message) for w in caught)
