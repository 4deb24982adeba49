"""imggen-fast report: the run over the registry's cases, the summary (speed-ups, ties,
checks), REPORT.md, the plots, results.json, --from-json, --compare and the exit status.
Most tests run the report on small synthetic cases (the real cases are run by
tests/test_bench_cases.py); one renders a real pytest-benchmark JSON file."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPOSITORY

from imggen_fast import cli, report
from imggen_fast.bench import common, memory, registry
from imggen_fast.bench.common import Case


def _work(size: int):
    def make():
        source = torch.ones(size)
        return lambda: source.sum()

    return make


def _check(passed: bool):
    def check() -> common.Check:
        expected = {"out": torch.ones(3), "grad_x": torch.ones(2)}
        actual = {"out": torch.ones(3), "grad_x": torch.ones(2) * (1.0 if passed else 1.5)}
        return common.compare(actual, expected)

    return check


def synthetic_cases(model_check_passes: bool = False) -> list[Case]:
    """Two sizes of a toy op (eager, imggen_fast, torch.compile, floor) and a toy
    training step whose imggen_fast check fails unless ``model_check_passes``."""
    cases = []
    for size in (1 << 10, 1 << 14):
        shared = dict(bytes_moved=8 * size, elements=size)
        cases += [Case("toy_op", str(size), "eager", "both", _work(4 * size), **shared,
                       kept_for_backward=lambda: 4000),
                  Case("toy_op", str(size), "imggen_fast", "both", _work(size), **shared, check=_check(True),
                       kept_for_backward=lambda: 2000),
                  Case("toy_op", str(size), "compile", "both", _work(2 * size), **shared),
                  Case("toy_op", str(size), "floor_copy", "both", _work(size // 2), **shared)]
    for provider, work in (("eager", 1 << 14), ("eager_channels_last", 1 << 14), ("imggen_fast", 1 << 12)):
        cases.append(Case("toy_model", "8x8", provider, "step", _work(work), flops=10_000_000, kind="model",
                          measure_memory=True, kept_for_backward=lambda: {"generator": 3000, "discriminator": 1000},
                          check=_check(model_check_passes) if provider == "imggen_fast" else None))
    return cases


@pytest.fixture
def synthetic(monkeypatch):
    """The report's registry holds only the synthetic cases; limits and peak memory are
    fixed figures (no 64 MiB copy, no fresh process)."""
    cases = synthetic_cases()
    monkeypatch.setattr(registry, "select", lambda mode, ops=None, models=None: cases)
    monkeypatch.setattr(report, "measure_limits", lambda: {"copy_GB/s": 10.0, "matmul_GFLOP/s": 50.0})
    monkeypatch.setattr(memory, "in_fresh_process", lambda case: 123_000_000)
    return cases


def run_cli(*arguments: str) -> int:
    parsed = cli.make_parser().parse_args(["report", "--no-progress", *arguments])
    return parsed.run(parsed)


def test_run_measures_every_provider_interleaved_with_its_figures(synthetic):
    data = report.run(report.QUICK, None, None, rounds=3, show_progress=False)
    assert [(result["op"], result["size"]) for result in data["benchmarks"]] == [
        ("toy_op", "1024"), ("toy_op", "16384"), ("toy_model", "8x8")]
    big = data["benchmarks"][1]
    assert big["rounds"] == 3 and list(big["providers"]) == ["eager", "imggen_fast", "compile", "floor_copy"]
    ours = big["providers"]["imggen_fast"]
    assert len(ours["times"]) == 3 and ours["spread"]["min"] <= ours["spread"]["median"] <= ours["spread"]["max"]
    assert ours["GB/s"] > 0 and ours["share_of_copy_bandwidth"] == pytest.approx(ours["GB/s"] / 10.0, rel=1e-3)
    assert ours["check"]["passed"] and ours["kept_for_backward"] == 2000
    assert big["speedup_vs_eager"]["baseline"] == "eager" and big["speedup_vs_compile"]["baseline"] == "compile"
    step = data["benchmarks"][2]
    assert step["providers"]["imggen_fast"]["peak_memory_bytes"] == 123_000_000
    assert step["providers"]["imggen_fast"]["share_of_matmul"] > 0
    assert step["checks_passed"] is False
    assert data["seconds"]["wall"] > 0 and {"compile", "timed_rounds", "checks_and_memory"} <= set(data["seconds"])
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu"]


def test_speedup_takes_the_fastest_of_each_role_and_calls_overlaps_ties():
    def entry(role, median, spread=0.1):
        return {"role": role, "spread": {"min": median - spread, "q1": median - spread / 2, "median": median,
                                         "q3": median + spread / 2, "max": median + spread, "rounds": 5}}

    providers = {"eager": entry("eager", 4.0), "eager_channels_last": entry("eager", 3.0),
                 "imggen_fast": entry("imggen_fast", 2.0), "compile": entry("compile", 2.02)}
    versus_eager = report.speedup(providers, "eager")
    assert versus_eager["baseline"] == "eager_channels_last" and versus_eager["ratio"] == pytest.approx(1.5)
    assert not versus_eager["tie"]
    assert report.speedup(providers, "compile")["tie"]
    assert report.speedup({"eager": entry("eager", 1.0)}, "compile") is None


def test_report_files_mark_a_failing_check_and_the_exit_status_says_so(synthetic, tmp_path, capsys):
    assert run_cli("--output", str(tmp_path), "--rounds", "3") == 1
    text = (tmp_path / "REPORT.md").read_text()
    for expected in ("## Machine", "## Summary", "| toy_op | 1024 | both |", "**FAILED**", "## Op: toy_op",
                     "## Training step: toy_model", "**tie**", "copy bandwidth 10.0 GB/s", "3 timed rounds"):
        assert expected in text, expected
    assert text.index("## Summary") < text.index("## Op: toy_op")
    for name in ("speedup_toy_op.png", "time_vs_size_toy_op.png", "speedup_training_steps.png",
                 "memory_training_steps.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in text
    saved = report.load_results(tmp_path / "results.json")
    assert saved["format"] == report.FORMAT and len(saved["benchmarks"]) == 3
    output = capsys.readouterr().out
    assert "speed-up vs eager" in output and "toy_model" in output and "FAILED" in output


def test_a_failed_memory_measurement_is_reported(synthetic, tmp_path, monkeypatch):
    def crash(case):
        raise RuntimeError("peak memory of toy: the measuring process exited with -9")

    monkeypatch.setattr(memory, "in_fresh_process", crash)
    monkeypatch.setattr(registry, "select", lambda mode, ops=None, models=None: synthetic_cases(True))
    assert run_cli("--output", str(tmp_path), "--rounds", "1") == 1
    assert "peak memory not measured: RuntimeError: peak memory of toy" in (tmp_path / "REPORT.md").read_text()


def test_a_case_that_raises_is_reported_and_the_others_still_run(synthetic, tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("kernel exploded")

    cases = synthetic_cases(model_check_passes=True) + [Case("toy_op", "huge", "eager", "both", broken)]
    monkeypatch.setattr(registry, "select", lambda mode, ops=None, models=None: cases)
    assert run_cli("--output", str(tmp_path), "--rounds", "2") == 1
    data = report.load_results(tmp_path / "results.json")
    assert data["benchmarks"][-1]["error"] == "RuntimeError: kernel exploded"
    assert sum(1 for result in data["benchmarks"] if not result.get("error")) == 3
    assert "did not run: RuntimeError: kernel exploded" in (tmp_path / "REPORT.md").read_text()


def test_compare_marks_regressions_beyond_the_threshold(synthetic, tmp_path, monkeypatch):
    cases = synthetic_cases(model_check_passes=True)
    monkeypatch.setattr(registry, "select", lambda mode, ops=None, models=None: cases)
    assert run_cli("--output", str(tmp_path / "first"), "--rounds", "2") == 0
    old = json.loads((tmp_path / "first" / "results.json").read_text())
    # The same medians: no regression.
    assert run_cli("--output", str(tmp_path / "same"), "--from-json", str(tmp_path / "first" / "results.json"),
                   "--compare", str(tmp_path / "first" / "results.json")) == 0
    # An old run three times as fast as this one: every imggen_fast case regressed.
    for result in old["benchmarks"]:
        for entry in result["providers"].values():
            entry["spread"]["median"] /= 3
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert run_cli("--output", str(tmp_path / "second"), "--from-json", str(tmp_path / "first" / "results.json"),
                   "--compare", str(tmp_path / "old.json"), "--threshold", "0.5") == 1
    data = report.load_results(tmp_path / "second" / "results.json")
    assert [row["regression"] for row in data["regressions"]] == [True, True, True]
    assert [row["ratio"] for row in data["regressions"]] == pytest.approx([3.0, 3.0, 3.0])
    assert {row["case"].split()[-1] for row in data["regressions"]} == {"imggen_fast"}
    assert "**REGRESSION**" in (tmp_path / "second" / "REPORT.md").read_text()


def test_bad_arguments_are_named(tmp_path, capsys):
    assert run_cli("--output", str(tmp_path), "--ops", "no_such_op") == 2
    assert "ops: unknown op name(s) no_such_op" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert run_cli("--output", str(tmp_path), "--from-json", str(tmp_path / "junk.json")) == 2
    assert "neither a report results.json nor a pytest-benchmark JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["report", "--full", "--smallest"])


def test_from_json_renders_a_real_pytest_benchmark_file(tmp_path):
    """Runs two real cases under pytest-benchmark (a few rounds), then renders the report
    from its JSON: the same summary, marked as not interleaved."""
    json_path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_ops.py", "-q", "-p", "no:cacheprovider",
         "--bench-sizes", "smallest", "-k", "bce_with_logits and (eager or imggen_fast)",
         "--benchmark-json", str(json_path), "--benchmark-max-time", "0.05"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert run_cli("--output", str(tmp_path / "out"), "--from-json", str(json_path)) == 0
    data = report.load_results(tmp_path / "out" / "results.json")
    (benchmark,) = data["benchmarks"]
    assert set(benchmark["providers"]) == {"eager", "imggen_fast"}
    assert benchmark["providers"]["imggen_fast"]["check"]["passed"]
    assert benchmark["speedup_vs_eager"]["ratio"] > 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "not interleaved" in text and "| bce_with_logits | 64 | both |" in text
