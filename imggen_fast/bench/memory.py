"""Peak memory of one call of a case, in a fresh process (nothing allocated or cached by
other cases, and a crash there cannot end the caller).

``python -m imggen_fast.bench.memory CASE_ID`` builds the case on
``$IMGGEN_FAST_BENCH_DEVICE`` (``make()`` runs the work once: the optimizer state
exists, torch.compile has compiled), then measures one more call with
:func:`imggen_fast.bench.common.peak_memory_bytes`, and prints ``{"peak_bytes": N}``
as its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from . import common, registry

TIMEOUT_SECONDS = 900


def find(case_id: str) -> common.Case:
    """The case named ``case_id`` (see ``Case.id``), per usable backend included."""
    for case in registry.select("full"):
        if case.id == case_id:
            return case
    raise ValueError(f"case id {case_id!r}: no such case")


def measure(case: common.Case) -> int:
    """Peak bytes of one call of ``case`` in this process, after ``make()`` (which ran the
    work once: the optimizer state exists, torch.compile has compiled)."""
    with case.backend_context():
        function = case.make()
        return common.peak_memory_bytes(function)


def in_fresh_process(case: common.Case) -> int:
    """Peak bytes of one call of ``case``, measured by a fresh Python process.

    Raises RuntimeError with the end of that process's output if it fails."""
    result = subprocess.run([sys.executable, "-m", __name__, case.id], capture_output=True, text=True,
                            env=dict(os.environ), timeout=TIMEOUT_SECONDS)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-12:])
        raise RuntimeError(f"peak memory of {case.id}: the measuring process exited with {result.returncode}:\n{tail}")
    return int(json.loads(lines[-1])["peak_bytes"])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m imggen_fast.bench.memory CASE_ID", file=sys.stderr)
        return 2
    print(json.dumps({"peak_bytes": measure(find(argv[0]))}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
