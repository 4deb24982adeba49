"""Compiles the Triton kernels of ``imggen_fast.kernels`` ahead of time for real GPUs, with
the real Triton compiler (no GPU needed), in the variants the launchers actually launch,
and prints one JSON line per (variant, target) with the registers and stack the cubin uses.

The launches come from tests/triton_launches.py (the launchers run in Triton's
interpreter on representative arguments, every launch recorded). For each, this derives
what Triton's runtime derives when the kernel is launched on a GPU, with the runtime's
own code (the binder of ``JITFunction.run`` and ``_pack_args``): i32 or i64 for each
integer, an integer equal to 1 as a constant, 16-byte alignment of pointers and
divisibility by 16 of integers as attributes. Each variant is compiled:

* as launched, once per autotune configuration;
* widened (fp32 launches, first configuration): every integer above 1 moved up by 2**32,
  which keeps its divisibility by 16 and makes Triton type it i64, as it does once a
  tensor passes 2**31 elements; not for a module's ``NARROW_INTEGERS`` kernels, whose
  launcher refuses integers of 2**31 and more.

Run as ``python tests/triton_aot.py LAUNCHES.jsonl [--signatures-only]`` in a process without
``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` at import time)."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGETS = (80, 90)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
WIDEN = 2**32


class Pointer:
    """A tensor argument as Triton's specialisation sees it: its dtype and address."""

    def __init__(self, dtype: str, aligned: bool) -> None:
        self.dtype = getattr(torch, dtype)
        self.address = 16 if aligned else 4

    def data_ptr(self) -> int:
        return self.address


def rebuild(value):
    return Pointer(value["tensor"], value["aligned"]) if isinstance(value, dict) else value


def widened(value):
    """An integer above 1 made to need 64 bits (same remainder mod 16); anything else as is."""
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    return value + WIDEN if is_integer and value > 1 else value


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG and STACK (and SHARED, LOCAL) of the one function in ``cubin``, from cuobjdump."""
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


def variants(launch: dict):
    """(variant name, kernel, JITFunction, arguments, keywords) to compile for one recorded launch."""
    module = importlib.import_module(f"imggen_fast.kernels.{launch['module']}")
    kernel = getattr(module, launch["kernel"])
    function = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    arguments = [rebuild(value) for value in launch["arguments"]]
    keywords = dict(launch["keywords"])
    configs = [keywords]
    if isinstance(kernel, triton.runtime.Autotuner):
        tuned = {name for config in kernel.configs for name in config.all_kwargs()}
        untuned = {name: value for name, value in keywords.items() if name not in tuned}
        configs = [{**untuned, **config.all_kwargs()} for config in kernel.configs]
    for config in configs:
        yield "launched", function, arguments, config
    first_tensor = next((value for value in launch["arguments"] if isinstance(value, dict)), None)
    narrow = launch["kernel"] in getattr(module, "NARROW_INTEGERS", ())
    if first_tensor is not None and first_tensor["tensor"] == "float32" and not narrow:
        yield "widened", function, [widened(value) for value in arguments], configs[0]


def specialise(function, backend, arguments: list, keywords: dict):
    """(options, signature, constexprs, attrs) as ``JITFunction.run`` derives them."""
    binder = create_function_from_signature(function.signature, function.params, backend)
    bound, specialization, options = binder(*arguments, **keywords)
    return function._pack_args(backend, keywords, bound, specialization, options)


def describe_signature(signature: dict, constexprs: dict, function) -> dict:
    """The integer typing a variant got: which arguments are i32, i64, or the constant 1."""
    names = [parameter.name for parameter in function.params]
    constants = {names[path[0]]: value for path, value in constexprs.items()}
    return {"i32": [name for name, kind in signature.items() if kind == "i32"],
            "i64": [name for name, kind in signature.items() if kind == "i64"],
            "constants": {name: value for name, value in constants.items()
                          if isinstance(value, (int, float, bool, str)) or value is None}}


# The variants to compile, built before the worker processes fork (they inherit it).
_TASKS: list[tuple] = []


def compile_task(index: int) -> dict:
    """Compiles variant ``index`` of ``_TASKS``; its row with the resources or the error."""
    row, function, signature, constexprs, attrs, target, options = _TASKS[index]
    try:
        compiled = triton.compile(ASTSource(function, signature, constexprs, attrs), target=target, options=options)
        return {**row, **resource_usage(compiled.asm["cubin"])}
    except Exception as error:  # noqa: BLE001 - reported per variant, the test fails on it
        return {**row, "error": f"{type(error).__name__}: {error}"}


def main(launches_path: str, compile: bool = True) -> None:
    seen = set()
    with open(launches_path) as handle:
        launches = [json.loads(line) for line in handle if line.strip()]
    for launch in launches:
        for variant, function, arguments, keywords in variants(launch):
            for capability in TARGETS:
                target = GPUTarget("cuda", capability, 32)
                backend = make_backend(target)
                options, signature, constexprs, attrs = specialise(function, backend, arguments, keywords)
                key = (launch["kernel"], capability, json.dumps(signature), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                if key in seen:
                    continue
                seen.add(key)
                first_tensor = next((value for value in launch["arguments"] if isinstance(value, dict)), {})
                row = {"module": launch["module"], "kernel": launch["kernel"], "variant": variant,
                       "dtype": first_tensor.get("tensor"), "target": f"sm_{capability}",
                       "num_warps": options.num_warps, **describe_signature(signature, constexprs, function)}
                _TASKS.append((row, function, signature, constexprs, attrs, target, options.__dict__))
    if not compile:
        for row, *_ in _TASKS:
            print(json.dumps(row), flush=True)
        return
    # One compile per core: each is a single-threaded LLVM and ptxas run.
    with multiprocessing.get_context("fork").Pool(max(1, len(os.sched_getaffinity(0)))) as pool:
        for row in pool.imap(compile_task, range(len(_TASKS))):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], compile="--signatures-only" not in sys.argv[2:])
