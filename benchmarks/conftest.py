"""Parametrizes the benchmark tests with the cases of imggen_fast.bench (the same the
report runs). Options: ``--bench-sizes smallest|quick|full`` (default full: every case;
CI's smoke run takes the smallest size of each op and model) and ``--bench-device
cpu|cuda``. ``pytest benchmarks/ --benchmark-only`` times every case;
``--benchmark-disable`` runs each once, checks included."""

from imggen_fast.bench import common, registry


def pytest_addoption(parser):
    group = parser.getgroup("imggen_fast benchmarks")
    group.addoption("--bench-sizes", default="full", choices=registry.SIZE_MODES,
                    help="which sizes of each op and model to run (default: full, every case)")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"), help="where the cases run")


def pytest_configure(config):
    common.set_device(config.getoption("--bench-device"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        sizes = metafunc.config.getoption("--bench-sizes")
        cases = [case for case in registry.select(sizes) if case.kind == metafunc.module.KIND]
        metafunc.parametrize("case", cases, ids=[case.id for case in cases])
