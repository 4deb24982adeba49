"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with the real Triton
compiler (no GPU needed), in the variants its launcher actually launches, and spills
nothing (cuobjdump's STACK:0). The variants are derived, not written down: the launchers
run on representative arguments in Triton's interpreter with every launch recorded
(tests/triton_launches.py), and each recorded launch is specialised as Triton's runtime
specialises it (tests/triton_aot.py): i32 or i64 integers, integers equal to 1 as
constants, 16-byte alignment, every autotune configuration, and the variant with its
integers widened to 64 bits. New kernel modules are picked up automatically; a kernel no
representative call launches fails the first test."""

import functools
import json

import pytest
from helpers import REPOSITORY, run_python

pytest.importorskip("triton", reason="Triton is not installed (Linux x86-64 only)")

MODULES = sorted(path.stem for path in (REPOSITORY / "kernels").glob("*.py") if not path.stem.startswith("_"))
LAUNCHES = REPOSITORY / "tests" / "triton_launches.py"
AOT = REPOSITORY / "tests" / "triton_aot.py"


@functools.cache
def recorded_launches(module: str) -> str:
    """The JSON lines of the launches the representative calls of ``module`` make."""
    result = run_python(f"import runpy, sys; sys.argv = ['triton_launches', {module!r}]; "
                        f"runpy.run_path({str(LAUNCHES)!r}, run_name='__main__')", env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def specialised(module: str, tmp_path, *options: str) -> list[dict]:
    """One row per distinct (variant, target) of the module's recorded launches."""
    path = tmp_path / f"{module}.jsonl"
    path.write_text(recorded_launches(module))
    code = (f"import runpy, sys; sys.argv = ['triton_aot', {str(path)!r}, *{list(options)!r}]; "
            f"runpy.run_path({str(AOT)!r}, run_name='__main__')")
    result = run_python(code, env={"TRITON_INTERPRET": None})
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def defined_kernels(module: str) -> set[str]:
    """Names of the module's kernels (``*_kernel``)."""
    code = (f"import json, imggen_fast.kernels.{module} as m, triton\n"
            "print(json.dumps([n for n, v in vars(m).items() if n.endswith('_kernel')\n"
            "                  and isinstance(v, (triton.runtime.JITFunction, triton.runtime.Autotuner))]))")
    result = run_python(code, env={"TRITON_INTERPRET": None})
    assert result.returncode == 0, result.stderr[-4000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", MODULES)
def test_every_kernel_is_launched_by_the_representative_calls(module):
    defined = defined_kernels(module)
    launches = [json.loads(line) for line in recorded_launches(module).splitlines()]
    launched = {launch["kernel"] for launch in launches if launch["module"] == module}
    assert defined, f"kernels/{module}.py defines no *_kernel"
    assert defined == launched, (f"kernels/{module}.py: tests/triton_launches.py must reach every *_kernel; "
                                 f"never launched: {defined - launched}")


def rows_of(rows: list[dict], kernel: str, variant: str = "launched", target: str = "sm_90") -> list[dict]:
    return [row for row in rows if row["kernel"] == kernel and row["variant"] == variant and row["target"] == target]


def test_signatures_are_the_ones_triton_derives_at_launch(tmp_path):
    """The typing of integers as the runtime does it: a small count is i32 (and was typed
    i64 by the hand-written table this replaced), an inner size of 1 (channels_last,
    Linear) a constant, and the widened variant i64."""
    rows = specialised("leaky_relu", tmp_path, "--signatures-only")
    bias = rows_of(rows, "bias_leaky_relu_kernel")
    assert any("numel" in row["i32"] and "inner" in row["i32"] for row in bias)
    assert any(row["constants"].get("inner") == 1 for row in bias), "channels_last / Linear launch inner == 1"
    backward = rows_of(rows, "bias_leaky_relu_backward_kernel")
    assert any(row["constants"].get("outer") == 1 for row in backward), "a one-sample launch has outer == 1"
    widened = rows_of(rows, "bias_leaky_relu_backward_kernel", "widened")
    assert widened and all("channels" in row["i64"] and not row["i32"] for row in widened)
    assert {row["dtype"] for row in bias} == {"float32", "bfloat16", "float16"}
    # The 2-D tile reduction (inner = 1): one tile (counts of 1, constants) and several.
    tiles = rows_of(rows, "bias_gradient_rows_kernel")
    assert any(row["constants"].get("tiles") == 1 for row in tiles)
    assert any({"tiles", "chunks"} <= set(row["i32"]) for row in tiles)


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_compiles_for_sm80_sm90_without_spills(module, record_gpu_usage, tmp_path):
    rows = specialised(module, tmp_path)
    assert rows, f"kernels/{module}.py: nothing compiled"
    failures = [row for row in rows if "error" in row]
    assert not failures, "\n".join(f"{row['kernel']} {row['variant']} {row['dtype']} {row['target']} "
                                   f"{row['constants']}: {row['error']}" for row in failures)
    for row in rows:
        record_gpu_usage(("triton", row["kernel"], row["variant"], row["dtype"], row["target"],
                          f"warps={row['num_warps']}", f"REG={row['registers']}", f"STACK={row['stack']}"))
    spilling = [row for row in rows if row["stack"] or row["local"]]
    assert not spilling, "spills (STACK/LOCAL > 0):\n" + "\n".join(json.dumps(row) for row in spilling)
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
    assert any(row["i64"] for row in rows if row["variant"] == "widened") or module == "layer_leaky_relu"
