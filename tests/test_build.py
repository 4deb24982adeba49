"""The kernel build: cached and reused across processes, a broken compiler degrades to
the reference with one clear warning, stale locks are cleared, and a wheel carries
the sources and compiles them in a fresh virtual environment."""

import json
import socket
import subprocess
import zipfile
import os
import sys
import time
import venv

import pytest
import torch
from helpers import REPOSITORY, run_python

from imggen_fast import _build

def test_build_succeeds_and_registers_the_ops():
    status = _build.load()
    assert status.available, status.error
    assert _build.library_path(status.cache_dir).is_file()
    assert hasattr(torch.ops.imggen_fast, "leaky_relu_backward_from_output")

def test_second_process_reuses_the_cache():
    status = _build.load()
    library = _build.library_path(status.cache_dir)
    modified = library.stat().st_mtime_ns
    result = run_python("import json; from imggen_fast import _build; s = _build.load(); "
                        "print(json.dumps({'available': s.available, 'built_now': s.built_now, "
                        "'cache_dir': str(s.cache_dir)}))")
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout.splitlines()[-1])
    assert reported == {"available": True, "built_now": False, "cache_dir": str(status.cache_dir)}
    assert library.stat().st_mtime_ns == modified

def test_cache_key_follows_sources_torch_and_compiler(tmp_path, monkeypatch):
    key = _build.cache_key(False)
    assert key == _build.cache_key(False)
    copied = tmp_path / "csrc"
    for path in _build.csrc_dir().rglob("*"):
        if path.is_file():
            (copied / path.relative_to(_build.csrc_dir())).parent.mkdir(parents=True, exist_ok=True)
            (copied / path.relative_to(_build.csrc_dir())).write_bytes(path.read_bytes())
    monkeypatch.setattr(_build, "csrc_dir", lambda: copied)
    assert _build.cache_key(False) == key
    (copied / "leaky_relu.h").write_text((copied / "leaky_relu.h").read_text() + "\n// changed\n")
    changed = _build.cache_key(False)
    assert changed != key
    monkeypatch.setattr(_build, "compiler_identity", lambda: "another compiler 1.0")
    assert _build.cache_key(False) != changed
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert _build.cache_key(False) != changed

def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGGEN_FAST_CACHE", str(tmp_path / "kernels"))
    assert _build.cache_dir(False).parent == tmp_path / "kernels"

BROKEN_COMPILER_SCRIPT = """
import json, warnings
import torch
import imggen_fast
from imggen_fast import _build, backends, functional
from imggen_fast.ops import leaky_relu
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    g, y = torch.randn(4, 5), torch.randn(4, 5)
    first = functional.leaky_relu_backward_from_output(g, y, 0.2)
    second = functional.leaky_relu_backward_from_output(g, y, 0.2)
    backend = backends.choose(g.device.type)
expected = torch.where(y > 0, g, g * 0.2)
build_warnings = [str(w.message) for w in caught if issubclass(w.category, _build.BuildWarning)]
try:
    with imggen_fast.set_backend("cpp"):
        functional.leaky_relu_backward_from_output(g, y, 0.2)
    explicit = "no error"
except imggen_fast.BackendUnavailable as error:
    explicit = str(error)
print(json.dumps({"warnings": build_warnings, "backend": backend, "explicit": explicit,
                  "correct": bool(torch.equal(first, expected) and torch.equal(second, expected))}))
"""

def test_broken_compiler_warns_once_and_uses_the_reference(tmp_path):
    result = run_python(BROKEN_COMPILER_SCRIPT, env={"CXX": "false", "IMGGEN_FAST_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert len(report["warnings"]) == 1, report["warnings"]
    message = report["warnings"][0]
    assert "building the C++ kernels failed" in message and "To fix" in message and "false" in message
    assert report["backend"] == "reference"
    assert report["correct"]
    assert "cannot serve this call" in report["explicit"] and "failed to build" in report["explicit"]

def dead_process_id() -> int:
    """The id of a process that has exited."""
    result = run_python("import os; print(os.getpid())")
    return int(result.stdout)

def test_lock_of_a_dead_process_is_cleared(tmp_path):
    lock = tmp_path / "imggen_fast.lock"

    lock.write_text(f"{dead_process_id()} {socket.gethostname()} {time.time()}")
    started = time.monotonic()
    with _build.FileLock(lock, timeout=5):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert time.monotonic() - started < 5
    assert not lock.exists()

def test_old_or_half_written_lock_is_cleared(tmp_path):
    lock = tmp_path / "imggen_fast.lock"
    lock.write_text(f"{os.getpid()} some-other-host {time.time() - 2 * _build.STALE_LOCK_SECONDS}")
    with _build.FileLock(lock, timeout=5):
        pass
    lock.write_text("")
    os.utime(lock, (time.time() - 2 * _build.STALE_LOCK_SECONDS,) * 2)
    with _build.FileLock(lock, timeout=5):
        pass

def test_lock_of_a_live_process_is_respected(tmp_path):
    lock = tmp_path / "imggen_fast.lock"

    lock.write_text(f"{os.getpid()} {socket.gethostname()} {time.time()}")
    with pytest.raises(_build.BuildLockTimeout, match="remove it if no build is running"):
        with _build.FileLock(lock, timeout=0.5):
            pass
    assert lock.exists()

@pytest.mark.slow
def test_wheel_installs_and_compiles_in_a_fresh_virtualenv(tmp_path):
    """python -m build makes a wheel holding csrc/ and kernels/; installed in a new
    virtualenv, it compiles its kernels there (cold, in an empty cache, with stale
    locks left by a killed build in the way) and serves calls with them."""
    wheels = tmp_path / "wheels"
    result = run_python(f"import sys; from build.__main__ import main; main(['--wheel', '--no-isolation', "
                        f"'--outdir', {str(wheels)!r}, {str(REPOSITORY)!r}])")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = wheels.glob("imggen_fast-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"imggen_fast/csrc/registration.cpp", "imggen_fast/csrc/cpu/leaky_relu.cpp",
            "imggen_fast/csrc/cuda/leaky_relu.cu", "imggen_fast/csrc/leaky_relu.h",
            "imggen_fast/kernels/leaky_relu.py"} <= names

    environment = tmp_path / "venv"
    venv.create(environment, system_site_packages=True, with_pip=True)
    python = str(environment / "bin" / "python")

    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    cache = tmp_path / "cache"
    script = (
        "import json, socket, time, torch\n"
        "from imggen_fast import _build, backends, functional\n"
        "from imggen_fast.ops import leaky_relu\n"
        "directory = _build.cache_dir()\n"
        "directory.mkdir(parents=True)\n"
        "(directory / 'lock').write_text('')\n"  # torch's own builder lock, left by a killed build
        "(directory / 'imggen_fast.lock').write_text(f'999999999 {socket.gethostname()} {time.time()}')\n"
        "start = time.perf_counter(); status = _build.load(); seconds = time.perf_counter() - start\n"
        "g, y = torch.randn(3, 4), torch.randn(3, 4)\n"
        "ok = torch.equal(functional.leaky_relu_backward_from_output(g, y, 0.2), torch.where(y > 0, g, g * 0.2))\n"
        "print(json.dumps({'available': status.available, 'built_now': status.built_now, 'seconds': seconds,\n"
        "  'csrc': str(_build.csrc_dir()), 'backend': backends.choose(g.device.type), 'ok': ok}))\n"
    )
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "IMGGEN_FAST_CACHE": str(cache)}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["available"] and report["built_now"] and report["ok"]
    assert report["backend"] == "cpp"
    assert report["csrc"].startswith(str(environment)), "the installed package must use its own csrc/"
    print(f"cold build in the fresh virtualenv: {report['seconds']:.1f} s", file=sys.stderr)
