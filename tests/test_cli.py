"""The imggen-fast command: doctor, build and --version; each kind of build failure is
reported as what it is, with its own fix."""

import importlib.metadata
import stat

import pytest
import torch
from helpers import run_cli

import imggen_fast
from imggen_fast import _build


def test_console_script_is_installed():
    scripts = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("imggen-fast") == "imggen_fast.cli:main"


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imggen-fast {imggen_fast.__version__} (torch {torch.__version__}")


def test_doctor_reports_versions_and_a_usable_cpp_backend():
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    for expected in ("torch 2.", "C++ compiler:", "nvcc:", "C++ kernels: usable", "cpp:",
                     "auto picks for CPU tensors: cpp"):
        assert expected in result.stdout, expected
    assert "triton:" in result.stdout and "reference:" in result.stdout
    # The GPU defaults are stated on any machine.
    assert "On CUDA tensors, auto runs the layers in cuDNN / cuBLAS" in result.stdout
    assert "allow_tf32=" in result.stdout and "only when the triton backend is named" in result.stdout


def test_doctor_with_an_unknown_backend_says_so_in_one_line():
    result = run_cli("doctor", env={"IMGGEN_FAST_BACKEND": "bogus"})
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "IMGGEN_FAST_BACKEND" in line and "'bogus'" in line and "auto, cpp, cuda, triton, reference" in line


def test_build_says_where_the_kernels_are_cached():
    result = run_cli("build")
    assert result.returncode == 0, result.stderr
    assert str(_build.library_path(_build.load().cache_dir)) in result.stdout


FAKE_COMPILER = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fakecxx 1.0"; exit 0; fi
echo "fakecxx: error: this compiler rejects every source" >&2
exit 1
"""


def fake_compiler(tmp_path):
    """A compiler that answers --version and rejects every source."""
    path = tmp_path / "fakecxx"
    path.write_text(FAKE_COMPILER)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def cache_under_a_file(tmp_path):
    """A cache folder that cannot be created: its parent is a file."""
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "cache")


# (environment for the case, what the report must say failed, what its fix must say)
FAILURES = {
    "no compiler": (lambda tmp_path: {"CXX": "false", "IMGGEN_FAST_CACHE": str(tmp_path)},
                    "no working C++ compiler: unusable false", "To fix: install a C++20 compiler"),
    "compile error": (lambda tmp_path: {"CXX": fake_compiler(tmp_path), "IMGGEN_FAST_CACHE": str(tmp_path / "c")},
                      "fakecxx 1.0 could not compile the C++ kernels\n    Last lines of the build log:",
                      "fakecxx: error: this compiler rejects every source"),
    "unwritable cache": (lambda tmp_path: {"IMGGEN_FAST_CACHE": cache_under_a_file(tmp_path)},
                         "cannot be written (Not a directory", "or set IMGGEN_FAST_CACHE to one"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_build_failure_says_what_failed_and_the_fix_for_it(tmp_path, case):
    environment, failed, fix = FAILURES[case]
    result = run_cli("build", env=environment(tmp_path))
    assert result.returncode == 1
    assert "build failed" in result.stderr and failed in result.stderr and fix in result.stderr, result.stderr
    others = [other_failed for other, (_, other_failed, _) in FAILURES.items() if other != case]
    assert not any(other in result.stderr for other in others), "one cause only"
    if case == "unwritable cache":
        assert "compiler" not in result.stderr.lower(), "the old advice said to install a compiler here too"


def test_doctor_prints_the_whole_reason_a_build_failed(tmp_path):
    result = run_cli("doctor", env=FAILURES["compile error"][0](tmp_path))
    assert result.returncode == 1
    failure = result.stdout.split("C++ kernels: FAILED", 1)[1].split("backend asked for")[0]
    # what failed, the compiler's own message lines below it, the fix
    assert "could not compile" in failure and "fakecxx: error: this compiler rejects every source" in failure
    assert "ninja: build stopped" in failure and "To fix:" in failure
    assert "see 'C++ kernels' above" in result.stdout


def test_unknown_command_is_an_error():
    result = run_cli("train-everything")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
