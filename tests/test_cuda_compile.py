"""Every CUDA source compiles with ``nvcc -c`` against the torch headers for sm_80 and
sm_90, and ptxas reports no spills. New ``csrc/cuda/*.cu`` files are picked up
automatically. Skipped with a reason where nvcc is missing."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPOSITORY

from imggen_fast import _build

CUDA_SOURCES = sorted((REPOSITORY / "csrc" / "cuda").glob("*.cu"))
ARCHITECTURES = (80, 90)


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME); "
                                                    "the CUDA sources are compiled only where nvcc exists")


@pytest.fixture(scope="module")
def generated_include(tmp_path_factory) -> Path:
    """The one header a CUDA build of torch generates and the CPU wheel lacks."""
    folder = tmp_path_factory.mktemp("cuda_generated")
    header = folder / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return folder


def parse_ptxas(log: str) -> list[dict]:
    """One entry per compiled kernel and architecture: registers and spill bytes."""
    entries, current = [], None
    for line in log.splitlines():
        compiling = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if compiling:
            current = {"function": compiling.group(1), "target": compiling.group(2)}
            entries.append(current)
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, spills.groups())
        registers = re.search(r"Used (\d+) registers", line)
        if registers:
            current["registers"] = int(registers.group(1))
    return entries


def kernel_name(mangled: str) -> str:
    """``name_kernel<float>`` from a mangled symbol (c++filt where available)."""
    if shutil.which("c++filt"):
        demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout
        match = re.search(r"(\w+)(<[^>]*>)?\(", demangled)
        if match:
            return match.group(1) + (match.group(2) or "")
    return mangled


@pytest.mark.slow
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_compiles_for_sm80_sm90_without_spills(source, generated_include, tmp_path, record_gpu_usage):
    torch_include = Path(torch.__file__).parent / "include"
    command = [NVCC, "-c", "-std=c++20", *_build.cuda_flags(), "--threads", "2", "-Xptxas", "-v",
               "-I", str(generated_include), "-I", str(torch_include), "-I", str(REPOSITORY / "csrc")]
    for architecture in ARCHITECTURES:
        command += ["-gencode", f"arch=compute_{architecture},code=sm_{architecture}"]
    command += [str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-6000:]}"
    entries = parse_ptxas(result.stdout + result.stderr)
    assert {entry["target"] for entry in entries} == {f"sm_{a}" for a in ARCHITECTURES}, "ptxas compiled no kernel"
    for entry in entries:
        record_gpu_usage(("cuda", source.stem, kernel_name(entry["function"]), entry["target"],
                          f"REG={entry['registers']}",
                          f"spill={entry['spill_stores']}+{entry['spill_loads']}"))
    spilling = [entry for entry in entries if entry["spill_stores"] or entry["spill_loads"]]
    assert not spilling, f"register spills: {spilling}"
