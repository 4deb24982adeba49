"""The benchmark cases and their machinery (imggen_fast.bench): the registry contract,
selection, the interleaved timing harness, the checks, the kept-for-backward and
peak-memory measurements, and every case run once at its smallest size, so that
`pytest benchmarks/` and the report cannot rot unnoticed."""

import math
import sys
import textwrap

import pytest
import torch

from imggen_fast.bench import common, layer_leaky_relu, memory, registry, timing, training_steps
from imggen_fast.bench.common import Case, Tolerance


def _case(op="toy", size="1", provider="eager", direction="both", quick=None, kind="op", **fields) -> Case:
    return Case(op, size, provider, direction, lambda: (lambda: None), quick=quick, kind=kind, **fields)


# ---------------------------------------------------------------- registry


def test_discover_in_a_package_finds_cases_lists_functions_and_skips(tmp_path, monkeypatch):
    package = tmp_path / "fake_bench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "listed.py").write_text(textwrap.dedent("""
        from imggen_fast.bench.common import Case
        CASES = [Case("new_op", "8", provider, "both", lambda: (lambda: None)) for provider in ("eager", "imggen_fast")]
        SKIPPED = [("new_op 1G", "too large for this machine")]
    """))
    (package / "function.py").write_text(textwrap.dedent("""
        from imggen_fast.bench.common import Case
        def cases():
            return [Case("old_style", "8", "eager", "forward", lambda: (lambda: None))]
    """))
    (package / "helpers.py").write_text("VALUE = 1\n")
    (package / "_private.py").write_text("raise RuntimeError('a module named _* is never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_bench

    found = registry.discover_in(fake_bench)
    assert [(case.op, case.provider) for case in found.cases] == [
        ("old_style", "eager"), ("new_op", "eager"), ("new_op", "imggen_fast")]
    assert found.skipped == (("new_op 1G", "too large for this machine"),)
    for name in list(sys.modules):
        if name.startswith("fake_bench"):
            monkeypatch.delitem(sys.modules, name)


def test_discover_rejects_a_list_of_other_things(tmp_path, monkeypatch):
    package = tmp_path / "bad_bench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "wrong.py").write_text("CASES = [('op', 'size')]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import bad_bench

    with pytest.raises(TypeError, match="bad_bench.wrong.CASES must hold"):
        registry.discover_in(bad_bench)


def test_every_case_module_of_the_package_is_discovered():
    ops = {(case.kind, case.op) for case in registry.discover().cases}
    assert {("op", "layer_leaky_relu"), ("op", "reparameterize_kl"), ("op", "bce_with_logits"),
            ("op", "gan_d_loss"), ("op", "batch_norm_leaky_relu"), ("op", "batch_norm_relu"),
            ("op", "generator_sampling"), ("model", "gan"), ("model", "dcgan"), ("model", "vae"),
            ("model", "cnn")} <= ops
    ids = [case.id for case in registry.discover().cases]
    assert len(ids) == len(set(ids)), "two cases share an id"


def test_modes_take_the_marked_cases_or_the_first_two_sizes():
    marked = [_case(size=size, quick=size == "2") for size in ("1", "2", "3")]
    assert [case.size for case in registry.in_mode(marked, "quick")] == ["2"]
    unmarked = [_case(size=size, direction=direction) for size in ("1", "2", "3")
                for direction in ("forward", "both")]
    assert [(case.size, case.direction) for case in registry.in_mode(unmarked, "quick")] == [
        ("1", "both"), ("2", "both")]
    assert {case.size for case in registry.in_mode(unmarked, "smallest")} == {"1"}
    assert registry.in_mode(unmarked, "full") == unmarked


def test_select_by_kind_and_name_and_bad_names():
    only_ops = registry.select("smallest", ops=[])
    assert only_ops and {case.kind for case in only_ops} == {"op"}
    one_model = registry.select("smallest", models=["cnn"])
    assert {(case.kind, case.op) for case in one_model} == {("model", "cnn")}
    assert {case.kind for case in registry.select("smallest")} == {"op", "model"}
    with pytest.raises(ValueError, match="ops: unknown op name.*no_such_op.*known: "):
        registry.select("quick", ops=["no_such_op"])
    with pytest.raises(ValueError, match="mode must be one of"):
        registry.select("medium")


def test_quick_mode_covers_every_op_and_the_gan_and_vae_steps():
    quick = registry.select("quick")
    assert {case.op for case in quick} >= set(registry.known_names("op")) | {"gan", "vae"}
    # Forward + backward where an op has a backward; inference cases (sampling) forward only.
    with_backward = {case.op for case in registry.discover().cases if case.direction == "both"}
    assert {case.direction for case in quick if case.op in with_backward} == {"both"}
    assert {case.direction for case in quick if case.kind == "op" and case.op not in with_backward} <= {"forward"}


def test_roles_follow_the_provider_names():
    assert [common.role(name) for name in ("eager", "eager_channels_last", "imggen_fast_eps", "compile",
                                           "compile_imggen_fast", "floor_copy", "imggen_fast[cuda]", "bare")] == [
        "eager", "eager", "imggen_fast", "compile", "imggen_fast", "floor", "imggen_fast", "other"]


def test_imggen_fast_cases_run_once_per_backend_when_several_are_usable():
    case = _case(provider="imggen_fast")
    expanded = registry._per_backend(case, ["triton", "cuda"])
    assert [(one.provider, one.backend) for one in expanded] == [("imggen_fast[triton]", "triton"),
                                                                 ("imggen_fast[cuda]", "cuda")]
    assert registry._per_backend(case, ["cpp"]) == [case]
    eager = _case(provider="eager")
    assert registry._per_backend(eager, ["triton", "cuda"]) == [eager]
    assert registry.usable_backends("cpu") == ["cpp"]


# ---------------------------------------------------------------- timing


def test_time_calls_interleaves_and_reverses_every_other_round():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.time_calls(functions, rounds=3, warmup=1)
    assert calls == list("abc" + "cba" + "abc" + "cba")
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(value >= 0 for values in times.values() for value in values)


def test_spread_and_ties():
    spread = timing.Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (spread.minimum, spread.first_quartile, spread.median, spread.third_quartile, spread.maximum) == (
        1.0, 2.0, 3.0, 4.0, 5.0)
    assert timing.Spread.from_dict(spread.as_dict()) == spread
    assert timing.is_tie(spread, timing.Spread.of([3.5, 3.9, 4.5, 6.0, 7.0]))
    assert not timing.is_tie(spread, timing.Spread.of([4.5, 5.0, 5.5]))
    assert timing.rounds_for(0.1, budget_seconds=1.0, minimum=5, maximum=30) == 10
    assert timing.rounds_for(10.0, budget_seconds=1.0, minimum=5, maximum=30) == 5


# ---------------------------------------------------------------- checks and measurements


def test_compare_passes_within_tolerance_and_names_the_worst_tensor():
    expected = {"out": torch.tensor([1.0, -2.0, 4.0]), "grad_x": torch.tensor([0.5, 0.0])}
    check = common.compare({"out": expected["out"] + 1e-7, "grad_x": expected["grad_x"].clone()}, expected)
    assert check.passed and check.worst == "out" and check.tensors == 2
    assert check.max_abs_error == pytest.approx(1e-7, rel=0.2)
    assert check.max_rel_error == pytest.approx(1e-7 / 4, rel=0.2)


def test_compare_fails_on_errors_shapes_and_nan():
    expected = {"out": torch.tensor([1.0, 2.0])}
    assert not common.compare({"out": torch.tensor([1.0, 2.1])}, expected).passed
    assert not common.compare({"out": torch.tensor([1.0, float("nan")])}, expected).passed
    mismatch = common.compare({"out": torch.tensor([1.0, 2.0, 3.0])}, expected)
    assert not mismatch.passed and math.isinf(mismatch.max_abs_error)
    both_nan = {"out": torch.tensor([1.0, float("nan")])}
    assert common.compare(both_nan, both_nan).passed
    with pytest.raises(ValueError, match="compare: the provider gave"):
        common.compare({"other": torch.ones(1)}, expected)


def test_gradient_tolerance_in_frobenius_norm_forgives_one_flipped_row():
    expected = torch.ones(100, 10)
    flipped = expected.clone()
    flipped[3] *= 0.2  # one LeakyReLU row that took the other slope
    tight = common.compare({"grad_w": flipped}, {"grad_w": expected})
    loose = common.compare({"grad_w": flipped}, {"grad_w": expected},
                           gradient_tolerance=Tolerance(0.1, 0.0, "frobenius"))
    assert not tight.passed and loose.passed
    assert loose.frobenius_rel_error == pytest.approx(0.8 / 10, rel=1e-6)
    assert "gradients frobenius-norm rtol 0.1" in loose.tolerance
    # The tolerance for gradients does not apply to the outputs.
    assert not common.compare({"loss": flipped}, {"loss": expected},
                              gradient_tolerance=Tolerance(0.1, 0.0, "frobenius")).passed


def test_saved_bytes_counts_each_storage_once_and_leaves_out_parameters():
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    # x @ w saves x and w; (x @ w) @ w saves the product and w again (same storage).
    kept = common.saved_bytes(lambda: (x @ weight) @ weight)
    assert kept == x.nbytes + weight.nbytes + 4 * 8 * 4
    assert common.saved_bytes(lambda: (x @ weight) @ weight, exclude=[weight]) == x.nbytes + 4 * 8 * 4


def test_peak_memory_sees_a_temporary_tensor():
    peak = common.peak_memory_bytes(lambda: torch.ones(1 << 20).sum())
    assert peak >= 4 << 20


def test_peak_memory_in_a_fresh_process():
    case = next(case for case in registry.select("smallest", ops=["reparameterize_kl"])
                if case.provider == "eager" and case.direction == "both")
    assert memory.in_fresh_process(case) >= 3 * 128 * 32 * 4  # z, and the gradients of mu and logvar


def test_limits_and_case_figures():
    assert common.copy_bandwidth_gbps(1 << 18) > 0
    assert common.matmul_gflops(64) > 0
    case = _case(bytes_moved=2_000_000_000, flops=3_000_000_000)
    info = case.info(median_seconds=1.0, copy_gbps=4.0, matmul_gflops=6.0)
    assert (info["GB/s"], info["share_of_copy_bandwidth"], info["GFLOP/s"], info["share_of_matmul"]) == (
        2.0, 0.5, 3.0, 0.5)
    counted = _case(flops=lambda: 12)
    assert common.flops_of(counted) == 12


def test_count_flops_of_a_matmul():
    left, right = torch.randn(8, 16), torch.randn(16, 4)
    assert common.count_flops(lambda: left @ right) == 2 * 8 * 16 * 4


# ---------------------------------------------------------------- every case at its smallest size


SMALLEST_OPS = [case for case in registry.select("smallest", ops=[]) if case.role != "compile"]


@pytest.mark.parametrize("case", SMALLEST_OPS, ids=lambda case: case.id)
def test_smallest_op_cases_run_and_their_checks_pass(case):
    """torch.compile's cases are left out here (each compiles afresh: seconds on 2 cores);
    CI runs them once in `pytest benchmarks/ --benchmark-disable --bench-sizes smallest`."""
    function = case.make()
    function()
    check = registry.check_of(case)
    if case.role == "imggen_fast":
        assert check is not None and check.passed, check
    kept = registry.kept_of(case)
    assert kept is None or kept >= 0


def test_one_fused_layer_keeps_what_eager_in_place_keeps():
    # One layer: the input and one activation (eager: the pre-activation instead), weights excluded.
    first = layer_leaky_relu.LAYERS[0]
    kept = {provider: layer_leaky_relu.kept_for_backward(first, provider)
            for provider in ("eager", "eager_inplace", "imggen_fast")}
    assert kept["imggen_fast"] == kept["eager_inplace"] == kept["eager"]
    batch, width = first.input_shape
    assert kept["imggen_fast"] == 4 * batch * (width + first.out_channels)


SMALL_MODELS = [training_steps.Model("gan", 8, True), training_steps.Model("vae", 8, True),
                training_steps.Model("cnn", 8, True)]


@pytest.mark.parametrize("model", SMALL_MODELS, ids=lambda model: model.name)
def test_training_steps_check_and_keep_less_for_backward(model):
    step = training_steps._make(model, "imggen_fast")
    step()
    check = training_steps.check(model, "imggen_fast")
    assert check.passed, check
    assert check.tensors > 2  # the losses and the gradients
    eager = training_steps.kept_for_backward(model, "eager")
    fused = training_steps.kept_for_backward(model, "imggen_fast")
    assert eager.keys() == fused.keys()
    assert sum(fused.values()) < sum(eager.values())
    assert training_steps.step_flops(model) > 0


def test_a_model_kind_the_models_do_not_build_is_listed_as_skipped():
    dcgan = training_steps.Model("dcgan", 32, True)
    reason = training_steps.unavailable(dcgan)
    listed = any(case.op == "dcgan" for case in registry.discover().cases)
    skipped = [what for what, _ in registry.discover().skipped]
    if reason is None:
        assert listed
    else:
        assert not listed and "dcgan 32x32" in skipped and "does not build it yet" in reason
