"""``imggen-fast check-gpu``: without a GPU it says so and exits 0; ``--dry-run`` lists
exactly the tests ``pytest -m cuda`` collects and a report run for every op and model of
the benchmark registry; the results are written as JSON and markdown."""

import json
import sys

import pytest
import torch
from helpers import REPOSITORY, run_python

from imggen_fast import check_gpu


def collected_cuda_tests() -> list[str]:
    """What ``pytest --collect-only -m cuda -q`` lists, collected here independently."""
    result = run_python("import sys, pytest; sys.exit(pytest.main(['--collect-only', '-m', 'cuda', '-q', "
                        "'-p', 'no:cacheprovider', 'tests']))", env={"TRITON_INTERPRET": None})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line.strip() for line in result.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def dry_run_plan() -> dict:
    result = run_python("from imggen_fast import cli; cli.main(['check-gpu', '--dry-run', '--json'])")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_dry_run_lists_every_cuda_test(dry_run_plan):
    tests = dry_run_plan["tests"]
    assert tests == collected_cuda_tests()
    # The GPU comparisons of every op family are among them.
    for name in ("test_gpu_ops.py", "test_bce_with_logits.py", "test_reparameterize_kl.py", "test_leaky_relu.py",
                 "test_layer_leaky_relu.py"):
        assert any(test.startswith(f"tests/{name}::") for test in tests), name


def test_dry_run_times_every_registered_op_and_model(dry_run_plan):
    registered = check_gpu.registered_cases()
    names = {(case.kind, case.op) for case in registered}
    plan = dry_run_plan["timings"]
    assert {(entry["kind"], entry["name"]) for entry in plan} == names
    identifiers = {case.id for case in registered}
    for entry in plan:
        assert entry["cases"] and set(entry["cases"]) <= identifiers, entry["name"]
        assert entry["arguments"][:2] == ["--device", "cuda"]
        assert entry["name"] in entry["arguments"]


def test_without_a_gpu_it_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: check-gpu would run the whole check")
    result = run_python("import sys; from imggen_fast import cli; sys.exit(cli.main(['check-gpu']))", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA GPU here" in result.stdout


def test_results_are_written_as_json_and_markdown(tmp_path):
    xml = tmp_path / "cuda-tests.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_gpu_ops" name="test_a"/>'
                   '<testcase classname="tests.test_gpu_ops" name="test_b"><failure message="mismatch: 3 elements">'
                   'trace</failure></testcase>'
                   '<testcase classname="tests.test_gpu_ops" name="test_c"><skipped/></testcase>'
                   '</testsuite></testsuites>')
    tests = {"status": 1, "seconds": 12.5, "log": "cuda-tests.log", **check_gpu.junit_summary(xml)}
    assert tests["failures"] == 1 and tests["failing"] == ["tests.test_gpu_ops::test_b: mismatch: 3 elements"]
    machine = {**check_gpu.machine(), "gpus": [{"name": "NVIDIA H100", "capability": "sm_90", "memory_GiB": 79.1}],
               "driver": "560.35"}
    results = {"machine": machine, "setup": {"build": {"available": True}}, "tests": tests,
               "timings": [{"kind": "op", "name": "bce_with_logits", "status": 0, "seconds": 40.2,
                            "report": "timings/bce_with_logits/REPORT.md"}], "seconds": 300.0}
    markdown = check_gpu.write_results(tmp_path, results).read_text()
    assert "NVIDIA H100 (sm_90" in markdown and "driver 560.35" in markdown and f"torch {torch.__version__}" in markdown
    assert "FAILED tests.test_gpu_ops::test_b" in markdown and "timings/bce_with_logits/REPORT.md" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["tests"]["failures"] == 1
    assert sys.version.split()[0] in markdown
