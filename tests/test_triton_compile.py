"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with the real Triton
compiler (no GPU needed), in every configuration the code can launch, and spills
nothing (cuobjdump's STACK:0). New kernel modules are picked up automatically."""

import json

import pytest
from helpers import REPOSITORY, run_python

pytest.importorskip("triton", reason="Triton is not installed (Linux x86-64 only)")

MODULES = sorted(path.stem for path in (REPOSITORY / "kernels").glob("*.py") if not path.stem.startswith("_"))


def compile_module(module: str) -> list[dict]:
    code = f"import runpy, sys; sys.argv = ['triton_aot', {module!r}]; " \
           f"runpy.run_path({str(REPOSITORY / 'tests' / 'triton_aot.py')!r}, run_name='__main__')"
    result = run_python(code, env={"TRITON_INTERPRET": None})
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def launched_kernels(module: str) -> set[str]:
    """Names of the module's kernels (``*_kernel``) and of those its AOT_KERNELS lists."""
    code = (f"import json, imggen_fast.kernels.{module} as m, triton\n"
            "names = [n for n, v in vars(m).items() if n.endswith('_kernel')\n"
            "         and isinstance(v, (triton.runtime.JITFunction, triton.runtime.Autotuner))]\n"
            "print(json.dumps({'defined': names, 'listed': [k.name for k in m.AOT_KERNELS]}))")
    result = run_python(code, env={"TRITON_INTERPRET": None})
    assert result.returncode == 0, result.stderr[-4000:]
    names = json.loads(result.stdout.splitlines()[-1])
    return set(names["defined"]), set(names["listed"])


@pytest.mark.parametrize("module", MODULES)
def test_every_kernel_is_listed_for_aot(module):
    defined, listed = launched_kernels(module)
    assert defined, f"kernels/{module}.py defines no *_kernel"
    assert defined == listed, f"kernels/{module}.py: AOT_KERNELS must list every *_kernel; missing {defined - listed}"


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_compiles_for_sm80_sm90_without_spills(module, record_gpu_usage):
    rows = compile_module(module)
    assert rows, f"kernels/{module}.py: nothing compiled"
    failures = [row for row in rows if "error" in row]
    assert not failures, "\n".join(f"{row['kernel']} {row['dtype']} {row['target']}: {row['error']}"
                                   for row in failures)
    for row in rows:
        record_gpu_usage(("triton", row["kernel"], row["dtype"], row["target"], json.dumps(row["config"]),
                          f"warps={row['num_warps']}", f"REG={row['registers']}", f"STACK={row['stack']}"))
    spilling = [row for row in rows if row["stack"] or row["local"]]
    assert not spilling, "spills (STACK/LOCAL > 0):\n" + "\n".join(json.dumps(row) for row in spilling)
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
