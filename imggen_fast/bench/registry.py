"""Finds the cases (see the contract in :mod:`imggen_fast.bench`), selects them by
mode, kind and name, expands the imggen_fast providers per usable backend, and groups
the providers of one comparison into a :class:`Benchmark`."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Iterable

from . import common
from .common import Case

SIZE_MODES = ("smallest", "quick", "full")
SIZES_VARIABLE = "IMGGEN_FAST_BENCH_SIZES"
_SPEED_BACKENDS = ("cpp", "triton", "cuda")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The providers of one comparison, (kind, op, size, direction), timed together."""

    kind: str
    op: str
    size: str
    direction: str
    cases: tuple[Case, ...]

    @property
    def name(self) -> str:
        return f"{self.op} {self.size} {self.direction}"

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(case.provider for case in self.cases)


@dataclasses.dataclass(frozen=True)
class Discovered:
    """Every case the modules offer, in their order, and what they cannot offer yet
    (description, reason)."""

    cases: tuple[Case, ...]
    skipped: tuple[tuple[str, str], ...]


def _module_cases(module) -> tuple[list[Case], list[tuple[str, str]]] | None:
    listed = getattr(module, "CASES", None)
    if listed is None and callable(getattr(module, "cases", None)):
        listed = module.cases()
    if listed is None:
        return None
    listed = list(listed)
    for case in listed:
        if not isinstance(case, Case):
            raise TypeError(f"{module.__name__}.CASES must hold imggen_fast.bench.common.Case records, "
                            f"got {type(case).__name__}")
    return listed, [(str(what), str(why)) for what, why in getattr(module, "SKIPPED", ())]


def discover_in(package) -> Discovered:
    """Imports every module of ``package`` (but those named _*) and collects the
    ``CASES`` (or ``cases()``) and ``SKIPPED`` of those that define them."""
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        found = _module_cases(importlib.import_module(f"{package.__name__}.{info.name}"))
        if found is not None:
            cases += found[0]
            skipped += found[1]
    return Discovered(tuple(cases), tuple(skipped))


@functools.cache
def discover() -> Discovered:
    """The cases of imggen_fast.bench (see :func:`discover_in`), found once per process."""
    from .. import bench

    return discover_in(bench)


def _ordered_unique(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def in_mode(cases: list[Case], mode: str) -> list[Case]:
    """The cases of one op in ``mode``: ``full`` every one; ``smallest`` those of its first
    size; ``quick`` those marked quick, or, for an op that marks none, its first two sizes
    in the direction ``both`` (every direction where it has no ``both``)."""
    if mode == "full":
        return cases
    sizes = _ordered_unique(case.size for case in cases)
    if mode == "smallest":
        return [case for case in cases if case.size == sizes[0]]
    if any(case.quick is not None for case in cases):
        return [case for case in cases if case.quick]
    directions = {case.direction for case in cases}
    return [case for case in cases if case.size in sizes[:2] and ("both" not in directions or case.direction == "both")]


def usable_backends(device_type: str) -> list[str]:
    """The imggen_fast backends that run kernels (not the reference, not Triton's
    interpreter) on ``device_type`` tensors."""
    from .. import backends

    return [name for name in _SPEED_BACKENDS
            if backends.why_not(name, device_type) is None and not (name == "triton" and device_type == "cpu")]


def _per_backend(case: Case, names: list[str]) -> list[Case]:
    """An imggen_fast case once per usable backend when there are several (on a GPU:
    Triton and CUDA C++); unchanged when there is one."""
    if len(names) < 2 or case.backend is not None or not case.provider.startswith("imggen_fast"):
        return [case]
    return [dataclasses.replace(case, provider=f"{case.provider}[{name}]", backend=name) for name in names]


def known_names(kind: str) -> list[str]:
    return _ordered_unique(case.op for case in discover().cases if case.kind == kind)


def select(mode: str = "quick", ops: Iterable[str] | None = None, models: Iterable[str] | None = None) -> list[Case]:
    """The cases of ``mode`` (smallest | quick | full). ``ops`` / ``models``: names to keep
    (an empty list: all of that kind); when one is given and the other is None, the other
    kind is left out; when both are None, every kind is kept."""
    if mode not in SIZE_MODES:
        raise ValueError(f"mode must be one of {', '.join(SIZE_MODES)}, got {mode!r}")
    wanted: dict[str, set[str] | None] = {}
    for kind, names, argument in (("op", ops, "ops"), ("model", models, "models")):
        if names is None:
            continue
        names = set(names)
        unknown = names - set(known_names(kind))
        if unknown:
            raise ValueError(f"{argument}: unknown {kind} name(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(known_names(kind))}")
        wanted[kind] = names or None
    everything = not wanted
    backend_names = usable_backends(common.device().type)
    selected: list[Case] = []
    for kind, op in _ordered_unique((case.kind, case.op) for case in discover().cases):
        if not everything and (kind not in wanted or (wanted[kind] is not None and op not in wanted[kind])):
            continue
        for case in in_mode([case for case in discover().cases if (case.kind, case.op) == (kind, op)], mode):
            selected += _per_backend(case, backend_names)
    return selected


def group(cases: Iterable[Case]) -> list[Benchmark]:
    """The cases grouped by (kind, op, size, direction), in the order first seen."""
    groups: dict[tuple[str, str, str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault(case.benchmark, []).append(case)
    return [Benchmark(*key, tuple(members)) for key, members in groups.items()]


# Checks and kept bytes do not depend on the direction: measured once per (op, size,
# provider) and kept here, by what is measured and the case's key.
_measured: dict[tuple, object] = {}


def forget_measurements() -> None:
    """Drops the checks and kept bytes measured so far, so that the next ones are measured anew."""
    _measured.clear()


def _measured_once(case: Case, what: str, measure) -> object:
    """``measure()`` run under the case's backend, once per (what, op, size, provider, backend, device)."""
    if measure is None:
        return None
    key = what, case.kind, case.op, case.size, case.provider, case.backend, str(common.device())
    if key not in _measured:
        with case.backend_context():
            _measured[key] = measure()
    return _measured[key]


def check_of(case: Case) -> common.Check | None:
    """The case's correctness check (run once per op, size and provider, under the
    case's backend), or None when it has none."""
    return _measured_once(case, "check", case.check)


def kept_of(case: Case) -> int | dict[str, int] | None:
    """The bytes the case keeps for backward (measured once per op, size and provider)."""
    return _measured_once(case, "kept", case.kept_for_backward)
