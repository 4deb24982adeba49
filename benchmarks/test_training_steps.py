"""Every training-step case of imggen_fast.bench (GAN, VAE, CNN, and DCGAN once the
models build it): one optimisation step at batch 64, timing the step functions of
imggen_fast.steps. Run: ``python -m pytest benchmarks/test_training_steps.py --benchmark-only``."""

from imggen_fast.bench import memory
from imggen_fast.bench.timing import run_case

KIND = "model"


def test_training_step(benchmark, case):
    benchmark.group = f"{case.op}-{case.size}-{case.direction}"
    info = run_case(benchmark, case, budget_seconds=5.0)
    if not benchmark.disabled and case.measure_memory:
        info["peak_memory_bytes"] = memory.in_fresh_process(case)
