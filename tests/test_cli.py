"""The imggen-fast command: doctor and build."""

import importlib.metadata
import os
import subprocess
import sys

from helpers import REPOSITORY

from imggen_fast import _build


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imggen_fast.cli", *arguments], capture_output=True, text=True,
                          cwd=REPOSITORY, timeout=900)


def test_console_script_is_installed():
    scripts = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("imggen-fast") == "imggen_fast.cli:main"


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


def test_build_says_where_the_kernels_are_cached():
    result = run_cli("build")
    assert result.returncode == 0, result.stderr
    assert str(_build.library_path(_build.load().cache_dir)) in result.stdout


def test_build_failure_exits_nonzero_with_the_log(tmp_path):
    result = subprocess.run([sys.executable, "-m", "imggen_fast.cli", "build"], capture_output=True, text=True,
                            cwd=REPOSITORY, env={**os.environ, "CXX": "false",
                                                 "IMGGEN_FAST_CACHE": str(tmp_path)}, timeout=600)
    assert result.returncode == 1
    assert "build failed" in result.stderr


def test_unknown_command_is_an_error():
    result = run_cli("train-everything")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
