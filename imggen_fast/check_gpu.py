"""``imggen-fast check-gpu``: everything a lent GPU should run, in one command, in under 8
minutes, on a machine with a CUDA GPU and nothing but this repository and pip.

1. Installs what the tests need (``pip install -e .[dev]`` when pytest is missing) and
   builds the kernels (the C++ library, with the CUDA kernels where a CUDA toolkit is found).
2. Runs every test marked ``cuda`` (``pytest -m cuda``), without Triton's interpreter: the
   compiled Triton kernels and the CUDA C++ kernels against the reference, fp32/fp16/bf16.
3. Times every op case and training step of the benchmark registry on the GPU with
   ``imggen-fast report --device cuda`` (CUDA events, warm-up excluded, torch.compile's
   compile time apart), one report per op or model, so that what ran before the time
   ran out is kept.
4. Writes ``results.json`` and ``RESULTS.md`` (GPU, driver, torch / triton / CUDA / cuDNN
   versions, the tests' outcome, where each report is) into the results folder.

Without a GPU it says so and exits 0. ``--dry-run`` lists the tests and the cases it would
run, without a GPU. The exit status is 0 when every part passed, 1 otherwise."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 470  # under 8 minutes, with room for the results and the start
# Of what is left after installing and building: the share the tests may take before
# they are stopped (the timings get the rest).
TEST_SHARE = 0.45


def _print(message: str) -> None:
    print(f"[check-gpu] {message}", flush=True)


def _tests_folder() -> Path:
    folder = REPOSITORY / "tests"
    if not (folder / "conftest.py").is_file():
        raise SystemExit("imggen-fast check-gpu: the tests are not here (no tests/ beside the package): run it from a "
                         "clone of the repository installed with pip install -e .")
    return folder


def _test_environment() -> dict[str, str]:
    """The environment of the test runs: Triton compiles for the GPU (no interpreter)."""
    environment = dict(os.environ)
    environment.pop("TRITON_INTERPRET", None)
    return environment


def collect_cuda_tests() -> list[str]:
    """Node ids of the tests marked ``cuda`` (``pytest --collect-only -m cuda -q``)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-m", "cuda", "-q",
                             "-p", "no:cacheprovider", str(_tests_folder())],
                            capture_output=True, text=True, cwd=REPOSITORY, env=_test_environment(), timeout=300)
    if result.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"collecting the cuda tests failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return [line.strip() for line in result.stdout.splitlines() if "::" in line]


# ----------------------------------------------------------------------------- cases


def registered_cases() -> list:
    """Every benchmark case of the report's registry (imggen_fast.bench.registry)."""
    from .bench import registry

    return list(registry.discover().cases)


def timing_plan(mode: str) -> list[dict]:
    """One report run per op or model: its kind, name, report arguments and case ids."""
    from .bench.registry import in_mode

    names: dict[tuple[str, str], list] = {}
    for case in registered_cases():
        names.setdefault((case.kind, case.op), []).append(case)
    plan = []
    for (kind, name), members in names.items():
        selected, run_mode = in_mode(members, mode), mode
        if not selected:  # a model step only in --full (CNN, DCGAN) is still timed on a GPU
            selected, run_mode = members, "full"
        flag = "--models" if kind == "model" else "--ops"
        arguments = ["--device", "cuda", flag, name, "--no-progress"] + ([f"--{run_mode}"] if run_mode != "quick" else [])
        plan.append({"kind": kind, "name": name, "arguments": arguments, "cases": [case.id for case in selected]})
    return plan


def run_report(arguments: list[str]) -> int:
    """``imggen-fast report`` with ``arguments`` (its entry point, imggen_fast.report.main)."""
    from . import report

    parser = argparse.ArgumentParser(prog="imggen-fast report")
    report.add_arguments(parser)
    return report.main(parser.parse_args(arguments))


# ----------------------------------------------------------------------------- machine


def _command_output(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine() -> dict[str, object]:
    """The GPU, its driver, and the versions the results depend on."""
    import torch

    from . import __version__, backends

    info: dict[str, object] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "imggen_fast": __version__,
        "triton": None, "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version",
                                                  "--format=csv,noheader"]),
        "nvcc": (_command_output(["nvcc", "--version"]) or "not found").splitlines()[-1],
        "git_commit": _command_output(["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"]),
        "tf32": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                 "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
    }
    if backends.triton_installed():
        import triton

        info["triton"] = triton.__version__
    if torch.cuda.is_available():
        info["gpus"] = [{"name": torch.cuda.get_device_name(index),
                         "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(index)),
                         "memory_GiB": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)}
                        for index in range(torch.cuda.device_count())]
    return info


# ----------------------------------------------------------------------------- parts


def install_and_build() -> dict[str, object]:
    """pip install -e .[dev] when pytest is missing; then the kernels' build."""
    outcome: dict[str, object] = {}
    if importlib.util.find_spec("pytest") is None:
        _print("pytest is missing: pip install -e .[dev]")
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPOSITORY}[dev]"],
                                capture_output=True, text=True, timeout=300)
        outcome["install"] = "done" if result.returncode == 0 else f"failed: {result.stderr[-2000:]}"
    from . import _build

    _print("building the kernels (C++; CUDA C++ where a CUDA toolkit is found)")
    status = _build.load(verbose=False)
    outcome["build"] = {"available": status.available, "seconds": round(status.seconds or 0.0, 1),
                        "cuda_kernels": _build.cuda_build_wanted(), "error": status.error}
    return outcome


def run_tests(folder: Path, timeout: float) -> dict[str, object]:
    """``pytest -m cuda`` without the interpreter; counts and failures from its JUnit XML."""
    xml = folder / "cuda-tests.xml"
    log = folder / "cuda-tests.log"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", str(_tests_folder())]
    _print(f"running the cuda tests ({' '.join(command[1:])}), at most {timeout:.0f} s")
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, env=_test_environment(),
                                timeout=timeout)
        output, status = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as expired:  # its output is bytes whatever text= says
        output, status = (expired.stdout or b"").decode(errors="replace"), "timed out"
    log.write_text(output)
    outcome: dict[str, object] = {"status": status, "seconds": round(time.perf_counter() - started, 1),
                                  "log": log.name}
    if xml.is_file():
        outcome.update(junit_summary(xml))
    outcome["passed_all"] = status == 0 and outcome.get("failures", 1) == 0 and outcome.get("errors", 1) == 0
    return outcome


def junit_summary(path: Path) -> dict[str, object]:
    """Counts, and the failing tests with the first line of their message, from JUnit XML."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in suite.iter("testcase"):
        for problem in (*case.findall("failure"), *case.findall("error")):
            message = (problem.get("message") or "").strip().splitlines()
            failing.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:300] if message else ''}")
    return {**counts, "failing": failing}


def run_timings(folder: Path, plan: list[dict], deadline: float) -> list[dict]:
    """One report per op or model into folder/timings/<name>, until the deadline."""
    outcomes = []
    for entry in plan:
        left = deadline - time.monotonic()
        if left < 20:
            outcomes.append({"name": entry["name"], "status": "not run: out of time"})
            continue
        output = folder / "timings" / entry["name"]
        arguments = [*entry["arguments"], "--output", str(output)]
        _print(f"timing {entry['kind']} {entry['name']} ({len(entry['cases'])} cases), at most {left:.0f} s")
        code = f"import sys; from imggen_fast import check_gpu; sys.exit(check_gpu.run_report({arguments!r}))"
        started = time.perf_counter()
        try:
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPOSITORY,
                                    env=_test_environment(), timeout=left)
            status: object = result.returncode
            (folder / "timings").mkdir(exist_ok=True)
            (folder / "timings" / f"{entry['name']}.log").write_text(result.stdout + result.stderr)
        except subprocess.TimeoutExpired:
            status = "timed out"
        outcomes.append({"name": entry["name"], "kind": entry["kind"], "status": status,
                         "seconds": round(time.perf_counter() - started, 1),
                         "report": str((output / "REPORT.md").relative_to(folder))})
    return outcomes


def write_results(folder: Path, results: dict[str, object]) -> Path:
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    info = results["machine"]
    gpus = ", ".join(f"{gpu['name']} ({gpu['capability']}, {gpu['memory_GiB']} GiB)" for gpu in info.get("gpus", []))
    tests = results.get("tests", {})
    lines = ["# imggen-fast check-gpu", "",
             f"{info['date']}, commit {info['git_commit']}", "",
             f"- GPU: {gpus or 'none'}; driver {info['driver']}",
             f"- torch {info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}), triton {info['triton']}, "
             f"nvcc {info['nvcc']}, python {info['python']}",
             f"- TF32: {info['tf32']}",
             f"- build: {results.get('setup', {}).get('build')}", "",
             "## Tests (pytest -m cuda, compiled kernels, no interpreter)", "",
             f"{tests.get('tests', '?')} tests: {tests.get('failures', '?')} failed, {tests.get('errors', '?')} errors, "
             f"{tests.get('skipped', '?')} skipped, in {tests.get('seconds', '?')} s (status {tests.get('status')}); "
             f"log: {tests.get('log')}", ""]
    lines += [f"- FAILED {failure}" for failure in tests.get("failing", [])]
    lines += ["", "## Timings (imggen-fast report --device cuda: CUDA events, warm-up excluded, compile apart)", "",
              "| kind | name | status | seconds | report |", "|---|---|---|---|---|"]
    lines += [f"| {entry.get('kind', '')} | {entry['name']} | {entry['status']} | {entry.get('seconds', '')} | "
              f"{entry.get('report', '')} |" for entry in results.get("timings", [])]
    lines += ["", f"Total {results['seconds']} s."]
    path = folder / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- command


def dry_run(mode: str, as_json: bool) -> int:
    tests = collect_cuda_tests()
    plan = timing_plan(mode)
    if as_json:
        print(json.dumps({"tests": tests, "timings": plan}))
        return 0
    print(f"tests (pytest -m cuda, no interpreter): {len(tests)}")
    for test in tests:
        print(f"  {test}")
    print(f"timings (imggen-fast report, {mode} mode; imggen_fast once per GPU backend): "
          f"{sum(len(entry['cases']) for entry in plan)} cases")
    for entry in plan:
        print(f"  report {' '.join(entry['arguments'])}")
        for case in entry["cases"]:
            print(f"    {case}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list the tests and cases it would run, and stop")
    parser.add_argument("--json", action="store_true", help="with --dry-run: the list as JSON")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="results folder (default: check-gpu-results/<date-time>)")
    parser.add_argument("--mode", default="quick", choices=("smallest", "quick", "full"),
                        help="sizes timed (the report's modes; default quick)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, metavar="SECONDS",
                        help=f"time for the whole check (default {BUDGET_SECONDS})")


def main(arguments: argparse.Namespace) -> int:
    """Runs the check (see the module docstring); returns the exit status."""
    import torch

    if arguments.dry_run:
        return dry_run(arguments.mode, arguments.json)
    if not torch.cuda.is_available():
        _print(f"no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}): nothing "
               "to check; `imggen-fast check-gpu --dry-run` lists what a GPU machine would run")
        return 0
    started = time.monotonic()
    deadline = started + arguments.budget
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(arguments.output or REPOSITORY / "check-gpu-results" / stamp)
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"machine": machine(), "budget_seconds": arguments.budget}
    results["setup"] = install_and_build()
    test_time = max(60.0, (deadline - time.monotonic()) * TEST_SHARE)
    results["tests"] = run_tests(folder, test_time)
    results["timings"] = run_timings(folder, timing_plan(arguments.mode), deadline)
    results["seconds"] = round(time.monotonic() - started, 1)
    path = write_results(folder, results)
    _print(f"results: {path}")
    timed = all(entry["status"] == 0 for entry in results["timings"])
    return 0 if results["tests"]["passed_all"] and timed else 1


def command_line(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imggen-fast check-gpu", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(command_line())
