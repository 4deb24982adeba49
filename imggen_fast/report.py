"""``imggen-fast report``: eager vs imggen_fast vs torch.compile on every benchmark case
(:mod:`imggen_fast.bench`), written to ``report/REPORT.md``, PNG plots and
``report/results.json``, with the summary table printed in the terminal.

Every provider of a comparison is timed interleaved with the others, round by round;
each imggen_fast speed is shown beside the correctness check of the same run. The exit
status is 1 when a check fails, a case fails to run, or (``--compare``) an imggen_fast
case got slower than the threshold; 0 otherwise."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .bench import common, memory, registry
from .bench.timing import Spread, is_tie, rounds_for, time_calls

FORMAT = "imggen_fast-report/1"
DEFAULT_THRESHOLD = 0.10


@dataclasses.dataclass(frozen=True)
class Mode:
    """How long a comparison is timed: interleaved rounds filling ``budget_seconds``,
    between ``min_rounds`` and ``max_rounds``, after one warm-up round."""

    name: str
    sizes: str
    budget_seconds: float
    min_rounds: int
    max_rounds: int


QUICK = Mode("quick", "quick", budget_seconds=1.5, min_rounds=5, max_rounds=30)
FULL = Mode("full", "full", budget_seconds=6.0, min_rounds=7, max_rounds=200)
SMALLEST = Mode("smallest", "smallest", budget_seconds=0.5, min_rounds=3, max_rounds=10)


# ----------------------------------------------------------------------------- machine


def _git(*arguments: str) -> str | None:
    repository = Path(__file__).resolve().parents[1]
    if not (repository / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", *arguments], cwd=repository, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """The machine and software a run measured: CPU, cores, threads, GPU, versions, date, commit."""
    from . import __version__, _build

    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    info: dict[str, object] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_capability": _build.cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cxx_compiler": _build.compiler_identity(),
        "imggen_fast": __version__,
        "git_commit": commit or "not a git checkout",
        "device": str(common.device()),
    }
    if common.device().type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(common.device())
        info["cuda"] = torch.version.cuda
    return info


def _triton_version() -> str:
    from . import backends

    if not backends.triton_installed():
        return "not installed"
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------- running


def _short_error(error: BaseException) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return "".join(lines).strip().splitlines()[-1][:500]


def _kept_total(kept: int | dict[str, int] | None) -> int | None:
    if kept is None:
        return None
    return sum(kept.values()) if isinstance(kept, dict) else int(kept)


def measure_benchmark(benchmark: registry.Benchmark, mode: Mode, rounds: int | None = None) -> dict[str, object]:
    """Times the providers of one comparison interleaved and gathers their figures:
    spread, GB/s and GFLOP/s, bytes kept for backward,
    peak memory (in a fresh process, for cases that ask), and the correctness check."""
    functions, contexts, setup, providers = {}, {}, {}, {}
    common.forget_compiled_code()
    for case in benchmark.cases:
        start = time.perf_counter()
        with case.backend_context():
            functions[case.provider] = case.make()
        setup[case.provider] = time.perf_counter() - start
        contexts[case.provider] = case.backend_context
    start = time.perf_counter()
    # One untimed round warms every provider up and sizes the timed rounds.
    warm = time_calls(functions, rounds=1, warmup=0, contexts=contexts)
    count = rounds or rounds_for(sum(times[0] for times in warm.values()), mode.budget_seconds,
                                 mode.min_rounds, mode.max_rounds)
    times = time_calls(functions, rounds=count, warmup=0, contexts=contexts)
    timing_seconds = time.perf_counter() - start
    del functions
    start = time.perf_counter()
    for case in benchmark.cases:
        spread = Spread.of(times[case.provider])
        flops = common.flops_of(case)
        entry: dict[str, object] = {
            "role": case.role, "times": times[case.provider], "spread": spread.as_dict(),
            "setup_seconds": setup[case.provider], "backend": case.backend,
            **{key: value for key, value in case.info(spread.median, flops=flops).items()
               if key not in _BENCHMARK_KEYS},
        }
        check = registry.check_of(case)
        entry["check"] = check.as_dict() if check else None
        entry["kept_for_backward"] = registry.kept_of(case)
        if case.measure_memory:
            try:
                entry["peak_memory_bytes"] = memory.in_fresh_process(case)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                entry["peak_memory_error"] = _short_error(error)
        providers[case.provider] = entry
    first = benchmark.cases[0]
    return {"kind": benchmark.kind, "op": benchmark.op, "size": benchmark.size, "direction": benchmark.direction,
            "elements": first.elements, "rounds": count, "providers": providers,
            "timing_seconds": timing_seconds, "measure_seconds": time.perf_counter() - start}


_BENCHMARK_KEYS = ("kind", "op", "size", "provider", "direction", "elements")


def measure_limits() -> dict[str, float]:
    return {"copy_GB/s": common.measure_copy_bandwidth(), "matmul_GFLOP/s": common.measure_matmul_throughput()}


def run(mode: Mode, ops: list[str] | None, models: list[str] | None, rounds: int | None = None,
        show_progress: bool = True) -> dict[str, object]:
    """Runs the selected cases and returns the results (the content of results.json)."""
    from tqdm import tqdm

    from . import _build

    wall_start = time.perf_counter()
    build = _build.load()
    build_seconds = time.perf_counter() - wall_start
    cases = registry.select(mode.sizes, ops, models)
    benchmarks = registry.group(cases)
    registry.forget_measurements()  # every check shown comes from this run
    limits_start = measure_limits()
    results: list[dict[str, object]] = []
    with tqdm(total=len(benchmarks), unit="case", disable=not show_progress, file=sys.stderr,
              dynamic_ncols=True) as progress:
        for benchmark in benchmarks:
            progress.set_postfix_str(benchmark.name[:60])
            try:
                results.append(measure_benchmark(benchmark, mode, rounds))
            # A case that fails to run is recorded (with its error) and marked in the report
            # and the exit status; the other cases still run.
            except Exception as error:  # noqa: BLE001 - recorded and reported, not hidden
                results.append({"kind": benchmark.kind, "op": benchmark.op, "size": benchmark.size,
                                "direction": benchmark.direction, "providers": {}, "error": _short_error(error)})
            progress.update()
    limits_end = measure_limits()
    limits = {key: max(limits_start[key], limits_end[key]) for key in limits_start}
    # The shares use the better of the limits measured at the start and at the end.
    for result in results:
        for entry in result["providers"].values():
            common.add_shares(entry, limits["copy_GB/s"], limits["matmul_GFLOP/s"])
    wall_seconds = time.perf_counter() - wall_start
    data = {
        "format": FORMAT, "machine": machine_info(), "mode": mode.name,
        "command": "imggen-fast report " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["report"] else None,
        "limits": limits, "limits_at_start": limits_start, "limits_at_end": limits_end,
        "interleaved": True, "benchmarks": results,
        "skipped": [list(pair) for pair in registry.discover().skipped],
        "seconds": {"build": build_seconds, "kernels_built_now": build.built_now, "wall": wall_seconds},
    }
    data["seconds"].update(_time_split(data))
    return add_comparisons(data)


def _time_split(data: dict[str, object]) -> dict[str, float]:
    """Where the wall time went: compiling (torch.compile providers' setup), other setup,
    timed rounds, and the measurements after them (checks, kept bytes, peak memory)."""
    compile_seconds = setup_seconds = timing_seconds = measure_seconds = 0.0
    for result in data["benchmarks"]:
        timing_seconds += result.get("timing_seconds", 0.0)
        measure_seconds += result.get("measure_seconds", 0.0)
        for provider, entry in result["providers"].items():
            if provider.startswith("compile"):
                compile_seconds += entry.get("setup_seconds", 0.0)
            else:
                setup_seconds += entry.get("setup_seconds", 0.0)
    return {"compile": compile_seconds, "setup": setup_seconds, "timed_rounds": timing_seconds,
            "checks_and_memory": measure_seconds}


# ----------------------------------------------------------------------------- comparisons


def _best(providers: dict[str, dict], role: str) -> str | None:
    """The provider of ``role`` with the lowest median among those in the speed-ups, or None."""
    candidates = [name for name, entry in providers.items()
                  if entry.get("role") == role and "spread" in entry and entry.get("in_speedups", True)]
    return min(candidates, key=lambda name: providers[name]["spread"]["median"]) if candidates else None


def speedup(providers: dict[str, dict], baseline_role: str) -> dict[str, object] | None:
    """The fastest ``baseline_role`` provider's median over the fastest imggen_fast
    provider's (above 1: imggen_fast is faster); a tie when their interquartile ranges overlap."""
    ours, baseline = _best(providers, "imggen_fast"), _best(providers, baseline_role)
    if ours is None or baseline is None:
        return None
    ours_spread = Spread.from_dict(providers[ours]["spread"])
    baseline_spread = Spread.from_dict(providers[baseline]["spread"])
    return {"ratio": baseline_spread.median / ours_spread.median, "tie": is_tie(ours_spread, baseline_spread),
            "ours": ours, "baseline": baseline}


def add_comparisons(data: dict[str, object]) -> dict[str, object]:
    """Adds to each benchmark its speed-ups against eager and torch.compile, and whether
    every imggen_fast check passed."""
    for result in data["benchmarks"]:
        providers = result["providers"]
        result["speedup_vs_eager"] = speedup(providers, "eager")
        result["speedup_vs_compile"] = speedup(providers, "compile")
        checks = [entry.get("check") for entry in providers.values() if entry.get("role") == "imggen_fast"]
        result["checks_passed"] = None if not checks or any(check is None for check in checks) else all(
            check["passed"] for check in checks)
    return data


def failures(data: dict[str, object]) -> list[str]:
    """What makes the run fail: cases that did not run, checks that failed, regressions."""
    found = []
    for result in data["benchmarks"]:
        name = f"{result['op']} {result['size']} {result['direction']}"
        if result.get("error"):
            found.append(f"{name}: did not run: {result['error']}")
        for provider, entry in result["providers"].items():
            check = entry.get("check")
            if check and not check["passed"] and entry.get("role") == "imggen_fast":
                found.append(f"{name} {provider}: correctness check FAILED (max abs error "
                             f"{check['max_abs_error']:.3g}, max rel error {check['max_rel_error']:.3g})")
            if entry.get("peak_memory_error"):
                found.append(f"{name} {provider}: peak memory not measured: {entry['peak_memory_error']}")
    found += [f"{regression['case']}: REGRESSION, {regression['ratio']:.2f}x the old median"
              for regression in data.get("regressions", []) if regression["regression"]]
    return found


def compare_runs(new: dict[str, object], old: dict[str, object], threshold: float) -> list[dict[str, object]]:
    """Every imggen_fast provider present in both runs: old and new medians; a regression
    when the new median exceeds the old by more than ``threshold`` (0.1: 10%)."""
    old_medians = {(result["kind"], result["op"], result["size"], result["direction"], provider):
                   entry["spread"]["median"]
                   for result in old["benchmarks"] for provider, entry in result["providers"].items()
                   if "spread" in entry}
    rows = []
    for result in new["benchmarks"]:
        for provider, entry in result["providers"].items():
            key = (result["kind"], result["op"], result["size"], result["direction"], provider)
            if entry.get("role") != "imggen_fast" or key not in old_medians or "spread" not in entry:
                continue
            ratio = entry["spread"]["median"] / old_medians[key]
            rows.append({"case": " ".join(key[1:]), "old_median": old_medians[key],
                         "new_median": entry["spread"]["median"], "ratio": ratio,
                         "regression": ratio > 1 + threshold})
    return rows


# ----------------------------------------------------------------------------- pytest-benchmark JSON


def from_pytest_benchmark(raw: dict[str, object]) -> dict[str, object]:
    """Results in the report's format from a ``pytest benchmarks/ --benchmark-json`` file.
    The providers there ran one after the other, not interleaved; ties still come from
    overlapping interquartile ranges."""
    groups: dict[tuple, dict[str, object]] = {}
    limits: dict[str, float] = {}
    for benchmark in raw.get("benchmarks", []):
        info, stats = benchmark.get("extra_info", {}), benchmark.get("stats", {})
        if "provider" not in info or not stats:
            continue
        key = (info.get("kind", "op"), info["op"], info["size"], info["direction"])
        result = groups.setdefault(key, {"kind": key[0], "op": key[1], "size": key[2], "direction": key[3],
                                         "elements": info.get("elements", 0), "rounds": 0, "providers": {}})
        spread = {"min": stats["min"], "q1": stats["q1"], "median": stats["median"], "q3": stats["q3"],
                  "max": stats["max"], "rounds": stats["rounds"]}
        result["rounds"] = max(result["rounds"], stats["rounds"])
        result["providers"][info["provider"]] = {
            "role": common.role(info["provider"]), "spread": spread,
            **{name: value for name, value in info.items() if name not in _BENCHMARK_KEYS}}
        for name in ("copy_GB/s", "matmul_GFLOP/s"):
            if name in info:
                limits[name] = info[name]
    machine_raw, commit = raw.get("machine_info", {}), raw.get("commit_info", {})
    cpu = machine_raw.get("cpu", {}) if isinstance(machine_raw.get("cpu"), dict) else {}
    machine = {"date": raw.get("datetime", "unknown"), "cpu": cpu.get("brand_raw", machine_raw.get("processor", "?")),
               "logical_cpus": cpu.get("count", "?"), "python": machine_raw.get("python_version", "?"),
               "git_commit": (commit.get("id", "?")[:7]
                              + (" (with uncommitted changes)" if commit.get("dirty") else "")) if commit else "?",
               "source": "pytest-benchmark JSON"}
    data = {"format": FORMAT, "machine": machine, "mode": "pytest-benchmark", "command": None, "limits": limits,
            "interleaved": False, "benchmarks": list(groups.values()), "skipped": [], "seconds": {}}
    return add_comparisons(data)


def load_results(path: Path) -> dict[str, object]:
    """A results.json written by the report, or a pytest-benchmark JSON file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read it as JSON: {error}") from error
    if raw.get("format") == FORMAT:
        return add_comparisons(raw)
    if isinstance(raw.get("benchmarks"), list) and "machine_info" in raw:
        return from_pytest_benchmark(raw)
    raise ValueError(f"{path}: neither a report results.json nor a pytest-benchmark JSON file")


# ----------------------------------------------------------------------------- rendering


PROVIDER_LABELS = {
    "eager": "eager", "eager_channels_last": "eager, channels_last", "eager_inplace": "eager, in-place LeakyReLU",
    "imggen_fast": "imggen_fast", "imggen_fast_channels_last": "imggen_fast, channels_last",
    "imggen_fast_eps": "imggen_fast, eps given", "compile": "torch.compile",
    "compile_imggen_fast": "torch.compile of patched", "floor_copy": "floor: copy of the same bytes",
    "floor_bare_layer": "floor: bare layer", "compile_freezing": "torch.compile, inductor freezing",
}


# How the summary names the variant that was fastest in its role.
SHORT_LABELS = {"eager_channels_last": "CL", "eager_inplace": "in-place", "imggen_fast_channels_last": "CL",
                "imggen_fast_eps": "eps given", "compile_imggen_fast": "compiled", "floor_copy": "copy",
                "floor_bare_layer": "bare layer", "compile_freezing": "freezing"}


def short_label(provider: str) -> str:
    base, _, backend = provider.partition("[")
    return SHORT_LABELS.get(base, base) + (f" [{backend}" if backend else "")


def label(provider: str) -> str:
    base, _, backend = provider.partition("[")
    return PROVIDER_LABELS.get(base, base) + (f" [{backend}" if backend else "")


def milliseconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    value = seconds * 1e3
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def megabytes(value: int | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1e6:.3g}" if value < 1e8 else f"{value / 1e6:.0f}"


def ratio_text(comparison: dict[str, object] | None) -> str:
    if not comparison:
        return "–"
    return f"{comparison['ratio']:.2f}x" + (" (tie)" if comparison["tie"] else "")


def check_text(check: dict[str, object] | None, markdown: bool = True) -> str:
    """"ok" or "FAILED", the max rel error, and the Frobenius one where the tolerance uses it."""
    if check is None:
        return "no check"
    verdict = "ok" if check["passed"] else ("**FAILED**" if markdown else "FAILED")
    text = f"{verdict} {check['max_rel_error']:.1g}"
    if "frobenius" in check.get("tolerance", ""):
        text += f" (Frobenius {check['frobenius_rel_error']:.1g})"
    return text


def _benchmark_check(result: dict[str, object], markdown: bool = True) -> str:
    checks = [(name, entry.get("check")) for name, entry in result["providers"].items()
              if entry.get("role") == "imggen_fast"]
    if result.get("error"):
        return "**did not run**" if markdown else "did not run"
    if not checks:
        return "–"
    if any(check is None for _, check in checks):
        return "no check"
    failed = [check for _, check in checks if not check["passed"]]
    worst = max((check for _, check in checks), key=lambda check: check["max_rel_error"])
    return check_text(failed[0] if failed else worst, markdown)


def summary_rows(data: dict[str, object], markdown: bool = True) -> list[list[str]]:
    """One row per comparison: the fastest provider of each role, the speed-ups, the
    bytes kept for backward (eager -> imggen_fast) and the check."""
    rows = []
    for result in data["benchmarks"]:
        providers = result["providers"]
        cells = [result["op"], result["size"], result["direction"]]
        for role in ("eager", "imggen_fast", "compile", "floor"):
            best = _best(providers, role)
            if best is None:
                cells.append("–")
                continue
            suffix = "" if best in ("eager", "imggen_fast", "compile") else f" ({short_label(best)})"
            cells.append(milliseconds(providers[best]["spread"]["median"]) + suffix)
        cells += [ratio_text(result.get("speedup_vs_eager")), ratio_text(result.get("speedup_vs_compile"))]
        eager, ours = _best(providers, "eager"), _best(providers, "imggen_fast")
        kept = [_kept_total(providers[name].get("kept_for_backward")) if name else None for name in (eager, ours)]
        cells.append(f"{megabytes(kept[0])} → {megabytes(kept[1])}" if None not in kept else "–")
        cells.append(_benchmark_check(result, markdown))
        rows.append(cells)
    return rows


SUMMARY_HEADER = ["op / model", "size", "pass", "eager ms", "imggen_fast ms", "torch.compile ms", "floor ms",
                  "speed-up vs eager", "vs torch.compile", "kept for backward MB (eager → ours)",
                  "check (max rel error)"]


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _provider_rows(result: dict[str, object]) -> list[list[str]]:
    rows = []
    ours = _best(result["providers"], "imggen_fast")
    for provider, entry in result["providers"].items():
        spread = entry.get("spread")
        if spread is None:
            continue
        versus = (f"{spread['median'] / result['providers'][ours]['spread']['median']:.2f}"
                  if ours and provider != ours else "–")
        throughput = []
        if "GB/s" in entry:
            share = entry.get("share_of_copy_bandwidth")
            throughput.append(f"{entry['GB/s']:.3g} GB/s" + (f" ({share:.0%} of copy)" if share is not None else ""))
        if "GFLOP/s" in entry:
            share = entry.get("share_of_matmul")
            throughput.append(f"{entry['GFLOP/s']:.3g} GFLOP/s" + (f" ({share:.0%} of matmul)" if share is not None
                                                                   else ""))
        kept = entry.get("kept_for_backward")
        kept_text = megabytes(_kept_total(kept))
        if isinstance(kept, dict) and len(kept) > 1:
            kept_text += " (" + ", ".join(f"{name} {megabytes(value)}" for name, value in kept.items()) + ")"
        memory_text = (megabytes(entry["peak_memory_bytes"]) if "peak_memory_bytes" in entry
                       else ("failed" if "peak_memory_error" in entry else "–"))
        check = entry.get("check")
        check_cell = "–" if check is None and entry.get("role") != "imggen_fast" else check_text(check)
        if check:
            check_cell += f" (abs {check['max_abs_error']:.1g}, worst: {check['worst']})"
        rows.append([label(provider), milliseconds(spread["min"]), milliseconds(spread["median"]),
                     milliseconds(spread["max"]), versus, "; ".join(throughput) or "–", kept_text, memory_text,
                     check_cell, f"{entry['setup_seconds']:.1f}" if "setup_seconds" in entry else "–"])
    return rows


PROVIDER_HEADER = ["provider", "min ms", "median ms", "max ms", "÷ imggen_fast", "achieved", "kept for backward MB",
                   "peak memory MB", "check (max rel error)", "setup s"]


def _sections(data: dict[str, object]) -> dict[tuple[str, str], list[dict[str, object]]]:
    sections: dict[tuple[str, str], list[dict[str, object]]] = {}
    for result in data["benchmarks"]:
        sections.setdefault((result["kind"], result["op"]), []).append(result)
    return sections


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def render_markdown(data: dict[str, object], plots: dict[str, list[str]]) -> str:
    """REPORT.md: machine, method, summary table, regressions, failures, then one section
    per op and per model with its plots and per-provider tables."""
    machine, seconds, limits = data["machine"], data.get("seconds", {}), data.get("limits", {})
    out = ["# imggen_fast report", ""]
    if data.get("command"):
        out += [f"Regenerate with `{data['command'].strip()}`.", ""]
    out += ["## Machine", "", markdown_table(["", ""], [[key.replace("_", " "), str(value)]
                                                       for key, value in machine.items()]), ""]
    out += ["## How it was measured", ""]
    if data.get("interleaved"):
        rounds = sorted({result.get("rounds", 0) for result in data["benchmarks"] if result.get("rounds")})
        out.append(f"Mode `{data['mode']}`. The providers of each comparison ran interleaved, round by round "
                   f"(even rounds in one order, odd rounds reversed), after one untimed warm-up round; "
                   f"{_rounds_text(rounds)} timed rounds per comparison (see each table). "
                   f"Times are wall-clock on the {machine.get('device', 'cpu')} "
                   f"({_clock(machine)}).")
    else:
        out.append("Rendered from a pytest-benchmark JSON file: the providers ran one after the other, not "
                   "interleaved, so slow drifts of the machine are not cancelled.")
    if limits:
        out.append(f"Limits measured in the same run: copy bandwidth {limits.get('copy_GB/s', 0):.1f} GB/s, "
                   f"fp32 matmul {limits.get('matmul_GFLOP/s', 0):.1f} GFLOP/s"
                   + (_limits_drift(data) if "limits_at_start" in data else "") + ". The copy bandwidth is that "
                   "of a 64 MiB copy, "
                   "beyond the caches: a case whose bytes fit in a cache can exceed it (its floor, a copy of the "
                   "same bytes, is timed beside it). The matmul throughput is the better of torch.mm and a 1x1 "
                   "convolution (oneDNN / cuDNN) of the same width.")
    out += ["",
            "A speed-up is the fastest eager (or torch.compile) provider's median over the fastest imggen_fast "
            "provider's: above 1, imggen_fast is faster. It is a **tie** when the two providers' interquartile "
            "ranges overlap (the difference is within the spread measured in the same run). The check compares "
            "imggen_fast's outputs and gradients with the eager reference on the same inputs, in the same run: "
            "max rel error is max|error| / max|reference| of the worst tensor; a failing check is marked **FAILED**. "
            "Kept for backward: bytes of the distinct storages autograd saves over one forward (parameters "
            "excluded). Peak memory: tensor bytes allocated at the peak of one training step, measured in a fresh "
            "process after a warm-up step (on CPU through torch's allocator events: memory a library allocates "
            "itself, oneDNN's scratch space say, is not seen).", ""]
    if seconds:
        out += [f"Wall time {seconds['wall']:.0f} s: compiling (torch.compile providers' first calls) "
                f"{seconds['compile']:.0f} s, other setup {seconds['setup']:.0f} s, timed rounds "
                f"{seconds['timed_rounds']:.0f} s, checks, kept bytes and peak memory "
                f"{seconds['checks_and_memory']:.0f} s, loading the C++ kernels {seconds['build']:.0f} s"
                + (" (built now)" if seconds.get("kernels_built_now") else "") + ".", ""]
    out += ["## Summary", "", markdown_table(SUMMARY_HEADER, summary_rows(data)), ""]
    problems = failures(data)
    out += ["## Failures", ""] + ([f"- {problem}" for problem in problems] if problems else
                                  ["None: every case ran and every check passed."]) + [""]
    if data.get("regressions") is not None:
        out += [f"## Compared with {data.get('compared_with', 'an earlier run')}", "",
                f"A regression is an imggen_fast median more than {data['threshold']:.0%} above the old one.", "",
                markdown_table(["case", "old ms", "new ms", "new / old", "verdict"],
                               [[row["case"], milliseconds(row["old_median"]), milliseconds(row["new_median"]),
                                 f"{row['ratio']:.2f}", "**REGRESSION**" if row["regression"] else "ok"]
                                for row in data["regressions"]]), ""]
    if data.get("skipped"):
        out += ["## Not measured", ""] + [f"- {what}: {why}" for what, why in data["skipped"]] + [""]
    overview_written = False
    for (kind, op), results in _sections(data).items():
        if kind == "model" and not overview_written:
            overview_written = True
            out += ["## Training steps", "", "One optimisation step (forward, backward, optimizer) at batch 64, "
                    "through the step functions the training loop runs (imggen_fast.steps).", ""]
            out += [f"![{name}]({name})" for name in plots.get("models", [])] + [""]
        out += [f"## {'Training step' if kind == 'model' else 'Op'}: {op}", ""]
        if plots.get(f"{kind}:{op}"):
            out += [f"![{name}]({name})" for name in plots[f"{kind}:{op}"]] + [""]
        for result in results:
            out += [f"### {op} {result['size']} {result['direction']}", ""]
            if result.get("error"):
                out += [f"**Did not run**: `{result['error']}`", ""]
                continue
            out += [f"{result.get('rounds', '?')} rounds. Speed-up vs eager "
                    f"{ratio_text(result.get('speedup_vs_eager'))}, vs torch.compile "
                    f"{ratio_text(result.get('speedup_vs_compile'))}.", "",
                    markdown_table(PROVIDER_HEADER, _provider_rows(result)), ""]
    return "\n".join(out)


def _limits_drift(data: dict[str, object]) -> str:
    start, end = data["limits_at_start"], data["limits_at_end"]
    return (f" (start {start['copy_GB/s']:.1f} / end {end['copy_GB/s']:.1f} GB/s and {start['matmul_GFLOP/s']:.1f}"
            f" / {end['matmul_GFLOP/s']:.1f} GFLOP/s; the better one is used)")


def _clock(machine: dict[str, object]) -> str:
    return "CUDA events, synchronized" if str(machine.get("device", "")).startswith("cuda") else "time.perf_counter"


def _rounds_text(rounds: list[int]) -> str:
    if not rounds:
        return "no"
    return str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]} to {rounds[-1]}"


# ----------------------------------------------------------------------------- plots


_COLORS = {"eager": "#1f77b4", "eager_channels_last": "#17becf", "eager_inplace": "#9edae5",
           "imggen_fast": "#d62728", "imggen_fast_channels_last": "#ff7f0e", "imggen_fast_eps": "#e377c2",
           "compile": "#2ca02c", "compile_imggen_fast": "#8c564b", "floor_copy": "#7f7f7f",
           "floor_bare_layer": "#7f7f7f"}
_MARKERS = "osD^v<>pXh*"


def _style(provider: str, index: int) -> dict[str, object]:
    base = provider.partition("[")[0]
    return {"color": _COLORS.get(base, f"C{index % 10}"), "marker": _MARKERS[index % len(_MARKERS)],
            "linestyle": ":" if base.startswith("floor") else "-"}


_RATIO_TICKS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def plot_speedups(results: list[dict[str, object]], title: str, path: Path, name: Callable[[dict], str]) -> None:
    """Bars of the speed-up against eager and against torch.compile, one pair per
    comparison; hatched bars are ties."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    measured = [result for result in results if result.get("speedup_vs_eager") or result.get("speedup_vs_compile")]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(measured) + 2), 4.6))
    width = 0.38
    for offset, (key, color) in enumerate((("speedup_vs_eager", "#1f77b4"), ("speedup_vs_compile", "#2ca02c"))):
        for index, result in enumerate(measured):
            comparison = result.get(key)
            if not comparison:
                continue
            axes.bar(index + (offset - 0.5) * width, comparison["ratio"], width, color=color,
                     hatch="//" if comparison["tie"] else None, edgecolor="black", linewidth=0.5)
            axes.annotate(f"{comparison['ratio']:.2f}", (index + (offset - 0.5) * width, comparison["ratio"]),
                          ha="center", va="bottom", fontsize=7)
    axes.axhline(1.0, color="black", linewidth=0.8)
    # Log scale: a 2x slowdown is as far below 1 as a 2x speed-up is above it.
    axes.set_yscale("log")
    ratios = [result[key]["ratio"] for result in measured for key in ("speedup_vs_eager", "speedup_vs_compile")
              if result.get(key)]
    low, high = min(0.5, min(ratios) / 1.5), max(2.0, max(ratios) * 1.6)
    axes.set_ylim(low, high)
    axes.set_yticks([tick for tick in _RATIO_TICKS if low <= tick <= high])
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xticks(range(len(measured)))
    axes.set_xticklabels([textwrap.fill(name(result), 14) for result in measured], fontsize=7)
    axes.legend(handles=[Patch(facecolor="#1f77b4", edgecolor="black", label="vs eager (fastest eager variant)"),
                         Patch(facecolor="#2ca02c", edgecolor="black", label="vs torch.compile"),
                         Patch(facecolor="white", edgecolor="black", hatch="//", label="tie (within the spread)")],
                fontsize=8)
    axes.set_ylabel("speed-up of imggen_fast (×)\nabove 1: imggen_fast faster")
    axes.set_xlabel("case")
    axes.set_title(f"{title}: speed-up of the fastest imggen_fast provider\n(hatched: a tie, within the spread "
                   f"measured in the same run)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_time_against_size(results: list[dict[str, object]], op: str, limits: dict[str, float], path: Path) -> bool:
    """Median time (min-max bars) of every provider against the work of the case, log
    axes, one panel per pass; the time the limit allows drawn dashed (bytes at the copy
    bandwidth, or flops at the matmul throughput). False when there is nothing to plot."""
    import matplotlib.pyplot as plt

    directions = list(dict.fromkeys(result["direction"] for result in results if result["providers"]))
    usable = [direction for direction in directions
              if len({result["size"] for result in results if result["direction"] == direction}) >= 2]
    if not usable:
        return False
    figure, all_axes = plt.subplots(1, len(usable), figsize=(5.2 * len(usable), 4.4), squeeze=False)
    for axes, direction in zip(all_axes[0], usable):
        chosen = [result for result in results if result["direction"] == direction and result["providers"]]
        by_flops = all(_work(result, "flops") for result in chosen) and not all(_work(result, "bytes_moved")
                                                                             for result in chosen)
        work_key, limit_key = ("flops", "matmul_GFLOP/s") if by_flops else ("bytes_moved", "copy_GB/s")
        if not all(_work(result, work_key) for result in chosen):
            # A case without a measure of its work has no place on the size axis.
            axes.set_axis_off()
            axes.set_title(f"{op}, {direction}: no bytes or flops given", fontsize=10)
            continue
        providers = list(dict.fromkeys(name for result in chosen for name in result["providers"]))
        for index, provider in enumerate(providers):
            points = sorted(((_work(result, work_key), result["providers"][provider]["spread"]) for result in chosen
                             if provider in result["providers"] and "spread" in result["providers"][provider]),
                            key=lambda point: point[0])
            if not points:
                continue
            x = [work for work, _ in points]
            median = [spread["median"] * 1e3 for _, spread in points]
            low = [(spread["median"] - spread["min"]) * 1e3 for _, spread in points]
            high = [(spread["max"] - spread["median"]) * 1e3 for _, spread in points]
            style = _style(provider, index)
            if by_flops:
                # Different layers, not one size sweep: points, not lines.
                style["linestyle"] = "none"
            axes.errorbar(x, median, yerr=[low, high], label=label(provider), capsize=2, markersize=5, **style)
        xs = sorted({_work(result, work_key) for result in chosen})
        if limits.get(limit_key) and xs:
            scale = 1e9 * limits[limit_key]
            axes.plot(xs, [work / scale * 1e3 for work in xs], "k--", linewidth=1.2,
                      label=(f"copy bandwidth limit ({limits[limit_key]:.1f} GB/s)" if limit_key == "copy_GB/s"
                             else f"matmul throughput limit ({limits[limit_key]:.0f} GFLOP/s)"))
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("bytes the op must move (B)" if work_key == "bytes_moved" else "floating-point operations")
        axes.set_ylabel("time per call (ms), median, bars min–max")
        axes.set_title(f"{op}, {direction}", fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _work(result: dict[str, object], key: str) -> int:
    # The op's work: the reference provider's figure (a variant may move more bytes).
    providers = result["providers"]
    entry = providers.get("eager") or next(iter(providers.values()), {})
    return int(entry.get(key) or 0)


def plot_memory(results: list[dict[str, object]], path: Path) -> bool:
    """Bars per training step and provider: bytes kept for backward and peak memory (MB)."""
    import matplotlib.pyplot as plt

    steps = [result for result in results if result["providers"]]
    if not steps:
        return False
    providers = list(dict.fromkeys(name for result in steps for name in result["providers"]))
    figure, axes_pair = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(steps) + 4), 4.6))
    width = 0.8 / len(providers)
    for axes, key, title in ((axes_pair[0], "kept_for_backward", "kept for backward over one forward"),
                             (axes_pair[1], "peak_memory_bytes", "peak tensor memory of one step")):
        for index, provider in enumerate(providers):
            values = [_kept_total(result["providers"].get(provider, {}).get(key)) for result in steps]
            positions = [step + (index - (len(providers) - 1) / 2) * width for step in range(len(steps))]
            axes.bar(positions, [value / 1e6 if value else 0 for value in values], width,
                     color=_style(provider, index)["color"], edgecolor="black", linewidth=0.4,
                     hatch="//" if "channels_last" in provider else None, label=label(provider))
        axes.set_xticks(range(len(steps)))
        axes.set_xticklabels([f"{result['op']}\n{result['size']}" for result in steps])
        axes.set_ylabel("MB (10^6 bytes)")
        axes.set_xlabel("training step, batch 64")
        axes.set_title(title, fontsize=10)
        axes.grid(True, axis="y", alpha=0.3)
    axes_pair[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def make_plots(data: dict[str, object], directory: Path) -> dict[str, list[str]]:
    """Writes the PNG plots into ``directory``; returns their file names by section."""
    import matplotlib

    matplotlib.use("Agg")
    plots: dict[str, list[str]] = {}
    for (kind, op), results in _sections(data).items():
        names = []
        if kind == "op" and _has_speedups(results):
            name = f"speedup_{_slug(op)}.png"
            plot_speedups(results, op, directory / name, lambda result: f"{result['size']} {result['direction']}")
            names.append(name)
        if kind == "op":
            name = f"time_vs_size_{_slug(op)}.png"
            if plot_time_against_size(results, op, data.get("limits", {}), directory / name):
                names.append(name)
        plots[f"{kind}:{op}"] = names
    models = [result for result in data["benchmarks"] if result["kind"] == "model"]
    if _has_speedups(models):
        plot_speedups(models, "training steps", directory / "speedup_training_steps.png",
                      lambda result: f"{result['op']} {result['size']}")
        plots["models"] = ["speedup_training_steps.png"]
    if models and plot_memory(models, directory / "memory_training_steps.png"):
        plots["models"] = plots.get("models", []) + ["memory_training_steps.png"]
    return plots


def _has_speedups(results: list[dict[str, object]]) -> bool:
    return any(result.get("speedup_vs_eager") or result.get("speedup_vs_compile") for result in results)


# ----------------------------------------------------------------------------- command


def write_report(data: dict[str, object], directory: Path) -> Path:
    """Writes results.json, the plots and REPORT.md into ``directory``; returns REPORT.md's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.png"):
        old.unlink()
    (directory / "results.json").write_text(json.dumps(data, indent=1, default=str))
    plots = make_plots(data, directory)
    path = directory / "REPORT.md"
    path.write_text(render_markdown(data, plots))
    return path


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true",
                       help="every size and pass (the default quick mode: small sizes, forward + backward)")
    sizes.add_argument("--smallest", action="store_true",
                       help="only the smallest size of each op and model, few rounds (a smoke run)")
    parser.add_argument("--ops", nargs="?", const="", metavar="NAMES",
                        help="only ops (comma-separated names; none: every op)")
    parser.add_argument("--models", nargs="?", const="", metavar="NAMES",
                        help="only training steps (comma-separated: gan, vae, cnn, ...; none: every model)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the cases run")
    parser.add_argument("--output", default="report", metavar="DIR", help="folder of REPORT.md (default: report)")
    parser.add_argument("--from-json", metavar="FILE", type=Path,
                        help="render the report from a pytest --benchmark-json file (or a results.json) "
                             "instead of running")
    parser.add_argument("--compare", metavar="OLD.json", type=Path,
                        help="mark imggen_fast cases slower than in OLD.json (a results.json or a "
                             "pytest-benchmark JSON); exit status 1 if any")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="slowdown marked as a regression by --compare (default 0.10: 10%%)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default: by time)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(arguments: argparse.Namespace) -> int:
    """Runs (or loads) the results, writes the report, prints the summary; see the
    module docstring for the exit status."""
    if arguments.threshold < 0:
        raise SystemExit("imggen-fast report: --threshold must be >= 0")
    if arguments.rounds is not None and arguments.rounds < 1:
        raise SystemExit("imggen-fast report: --rounds must be >= 1")
    try:
        old = load_results(arguments.compare) if arguments.compare else None
        if arguments.from_json:
            data = load_results(arguments.from_json)
        else:
            common.set_device(arguments.device)
            mode = FULL if arguments.full else SMALLEST if arguments.smallest else QUICK
            data = run(mode, _names(arguments.ops), _names(arguments.models),
                       arguments.rounds, show_progress=not arguments.no_progress)
    except ValueError as error:
        print(f"imggen-fast report: {error}", file=sys.stderr)
        return 2
    if old is not None:
        data["regressions"] = compare_runs(data, old, arguments.threshold)
        data["threshold"] = arguments.threshold
        data["compared_with"] = str(arguments.compare)
    path = write_report(data, Path(arguments.output))
    print(text_table(SUMMARY_HEADER, summary_rows(data, markdown=False)))
    problems = failures(data)
    for problem in problems:
        print(problem)
    seconds = data.get("seconds", {})
    if seconds:
        print(f"wall {seconds['wall']:.0f} s (compiling {seconds['compile']:.0f} s, timed rounds "
              f"{seconds['timed_rounds']:.0f} s, checks and memory {seconds['checks_and_memory']:.0f} s)")
    print(f"report written to {path}")
    return 1 if problems else 0
