"""Compiles the Triton kernels of one ``imggen_fast.kernels`` module ahead of time for
real GPUs, with the real Triton compiler (no GPU needed), and prints one JSON line
per (kernel, dtype, config, target) with the registers and stack the cubin uses.

Run as ``python tests/triton_aot.py <module>`` in a process without
``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` at import time)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGETS = (80, 90)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG and STACK (and LOCAL) of the one function in ``cubin``, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", handle.name], capture_output=True,
                              text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{text}")
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "stack": stack, "shared": shared, "local": local}


def main(module_name: str) -> None:
    module = importlib.import_module(f"imggen_fast.kernels.{module_name}")
    for spec in module.AOT_KERNELS:
        # An autotuned kernel wraps its JITFunction in .fn (a JITFunction's own .fn is the
        # plain Python function).
        function = spec.kernel.fn if isinstance(spec.kernel, triton.runtime.Autotuner) else spec.kernel
        for dtype, signature, constexprs, options in spec.variants():
            for capability in TARGETS:
                row = {"module": module_name, "kernel": spec.name, "dtype": dtype, "target": f"sm_{capability}",
                       "config": {key: value for key, value in constexprs.items()
                                  if isinstance(value, (int, float, str, bool))},
                       "num_warps": options["num_warps"]}
                try:
                    compiled = triton.compile(ASTSource(function, signature, constexprs),
                                              target=GPUTarget("cuda", capability, 32), options=options)
                    row.update(resource_usage(compiled.asm["cubin"]))
                except Exception as error:  # noqa: BLE001 - reported per variant, the test fails on it
                    row["error"] = f"{type(error).__name__}: {error}"
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
