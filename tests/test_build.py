"""The kernel build: cached and reused across processes; verified before it is loaded (a
corrupted library is rebuilt, never loaded); an OS lock between builders that says what a
waiting process waits for and gives up after a bounded wait; failures that say what failed
and the fix; the ops usable right after import; and a wheel that compiles in a fresh
virtualenv, from the system Python or from inside a virtualenv."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import REPOSITORY, run_cli, run_python

from imggen_fast import _build, cli


def test_build_succeeds_and_registers_the_ops():
    status = _build.load()
    assert status.available, status.error
    assert _build.library_path(status.cache_dir).is_file()
    assert _build.cached_library_problem(status.cache_dir) is None
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
    assert "building the C++ kernels" not in result.stderr


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


def test_cache_key_of_a_cuda_build_follows_the_gpu_architectures(monkeypatch):
    """A cache shared by machines with different GPUs must not hand sm_80 code to an sm_90 GPU."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    cpu_key, sm80_key = _build.cache_key(False), _build.cache_key(True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.cache_key(True) != sm80_key
    assert _build.cache_key(False) == cpu_key, "the CPU build does not depend on the GPU architectures"
    # Without the variable, torch's builder compiles for the visible GPUs: so does the key.
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    assert _build.cuda_architectures() == "8.0"
    detected_sm80_key = _build.cache_key(True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: [(8, 0), (9, 0)][index])
    assert _build.cuda_architectures() == "8.0;9.0"
    assert _build.cache_key(True) != detected_sm80_key


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGGEN_FAST_CACHE", str(tmp_path / "kernels"))
    assert _build.cache_dir(False).parent == tmp_path / "kernels"


@pytest.mark.parametrize("loader", [_build.load, _build.load_cached])
def test_load_callbacks_run_once_whether_registered_before_or_after_the_load(monkeypatch, loader):
    """The ops modules register fake implementations through on_load before the library is
    loaded (at import), user code may register after it: each runs exactly once."""
    assert _build.load().available
    monkeypatch.setattr(_build, "_status", None)
    monkeypatch.setattr(_build, "_on_load_callbacks", [])
    calls = []
    _build.on_load(lambda: calls.append("before"))
    assert calls == []
    assert loader().available
    assert calls == ["before"]
    _build.on_load(lambda: calls.append("after"))
    assert calls == ["before", "after"]
    _build.load()
    _build.load_cached()
    assert calls == ["before", "after"]


BROKEN_COMPILER_SCRIPT = """
import json, warnings
import torch
import imggen_fast
from imggen_fast import _build, backends, functional
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
    assert "What failed: no working C++ compiler: unusable false" in message
    assert "To fix: install a C++20 compiler" in message and "point CXX at one" in message
    assert report["backend"] == "reference"
    assert report["correct"]
    assert "cannot serve this call" in report["explicit"] and "no working C++ compiler" in report["explicit"]
    # The compiler was checked before anything was announced or compiled.
    assert "building the C++ kernels" not in result.stderr


# The locks -------------------------------------------------------------------------------

HOLD_LOCK_SCRIPT = """
import sys, time
from pathlib import Path
from imggen_fast import _build, cli
with _build.FileLock(Path(sys.argv[1]), timeout=0):
    print("held", flush=True)
    time.sleep(300)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """A process holding the build lock at ``path`` until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_SCRIPT, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPOSITORY)
    line = holder.stdout.readline()
    assert line.strip() == "held", holder.stderr.read()
    return holder


def dead_process_id() -> int:
    """The id of a process that has exited."""
    return int(run_python("import os; print(os.getpid())").stdout)


@pytest.mark.parametrize("content", [
    "", "garbage \x00\xff not a pid", f"{os.getpid()} {socket.gethostname()} {time.time()}",
    "1 some-other-host 1e12", "DEAD",
])
def test_lock_file_content_is_no_obstacle(tmp_path, capfd, content):
    """What a lock file says (empty, garbage, a live process, another host, a dead process)
    decides nothing: only the OS lock does, and nobody holds it."""
    lock = tmp_path / "imggen_fast.lock"
    if content == "DEAD":
        content = f"{dead_process_id()} {socket.gethostname()} {time.time()}"
    lock.write_text(content)
    with _build.FileLock(lock, timeout=0):  # timeout 0: any wait would raise
        assert lock.read_text().split()[0] == str(os.getpid())
    assert lock.exists() and lock.read_text() == "", "released: the file stays, its holder record is cleared"
    assert "waiting" not in capfd.readouterr().err


def test_held_lock_says_what_is_waited_for_waits_boundedly_and_is_released_when_its_holder_dies(
        tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("IMGGEN_FAST_CACHE", str(tmp_path / "cache"))
    directory = _build.cache_dir()
    holder = hold_lock(_build.lock_path(directory))
    try:
        # In this process: the message at once, on stderr, once; then BuildLockTimeout.
        started = time.monotonic()
        with pytest.raises(_build.BuildLockTimeout, match="waited 1 s") as caught:
            with _build.FileLock(_build.lock_path(directory), timeout=1):
                pass
        assert 1 <= time.monotonic() - started < 10
        waiting = [line for line in capfd.readouterr().err.splitlines() if "waiting up to 1 s" in line]
        assert len(waiting) == 1, waiting
        assert f"pid {holder.pid} on host {socket.gethostname()}" in waiting[0]
        assert str(_build.lock_path(directory)) in waiting[0] and "end that process" in waiting[0]
        assert "IMGGEN_FAST_CACHE" in caught.value.fix

        # A build in another process: the same message, then a failure that says it was the lock.
        result = run_cli("build", env={"IMGGEN_FAST_LOCK_TIMEOUT": "1"})
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("waiting up to 1 s for the C++ kernels to be built") == 1, result.stderr
        assert f"waited 1 s for the C++ kernels to be built by another process (pid {holder.pid}" in result.stderr
        assert "To fix: The lock is released as soon as that process exits" in result.stderr
        assert "compiler" not in result.stderr.lower()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock; its record is still in the file, and is ignored.
    assert str(holder.pid) in _build.lock_path(directory).read_text()
    with _build.FileLock(_build.lock_path(directory), timeout=5):
        pass


# Builds in a temporary cache: one real build, shared; corrupted copies of it ---------------

@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A temporary cache built by ``imggen-fast build`` in a fresh process, over the remains of
    a killed build (a garbage lock file, torch's baton, no library). The objects are copied
    from the default cache (built by then), so that the build is a real one that only links."""
    status = _build.load()
    assert status.available, status.error
    root = tmp_path_factory.mktemp("kernel-cache")
    directory = root / status.cache_dir.name
    shutil.copytree(status.cache_dir, directory)  # modification times kept: ninja sees the objects up to date
    _build.record_path(directory).unlink()
    _build.library_path(directory).unlink()
    _build.lock_path(directory).write_text("\x00garbage")
    (directory / "lock").write_text("")
    result = run_cli("build", env={"IMGGEN_FAST_CACHE": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    return root, directory, result


def copy_of(built_cache, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A copy of the built cache, and the environment pointing at it."""
    root, directory, _ = built_cache
    shutil.copytree(root, tmp_path / "cache")
    return {"IMGGEN_FAST_CACHE": str(tmp_path / "cache")}, tmp_path / "cache" / directory.name


def test_a_real_build_says_so_once_and_how_long_it_took(built_cache):
    _, directory, result = built_cache
    assert result.stderr.count("imggen_fast: building the C++ kernels for these sources into") == 1, result.stderr
    assert str(directory) in result.stderr and "1 to 3 minutes" in result.stderr
    assert result.stderr.count("imggen_fast: built the C++ kernels in ") == 1, result.stderr
    assert "C++ kernels built in" in result.stdout
    # The remains of the killed build did not get in the way; the lock file stays.
    assert not (directory / "lock").exists() and _build.lock_path(directory).exists()
    record = json.loads(_build.record_path(directory).read_text())
    assert record["library"]["size"] == _build.library_path(directory).stat().st_size
    assert _build.cached_library_problem(directory) is None


def test_rebuild_clears_everything_but_the_lock(built_cache, tmp_path, monkeypatch):
    """``imggen-fast build --rebuild`` asks for a build from scratch, which first removes all
    a build left (a full compile is not repeated here: the fixture's build ran the same code)."""
    _, directory = copy_of(built_cache, tmp_path)
    _build._clear(directory, everything=True)
    assert [path.name for path in directory.iterdir()] == [_build.lock_path(directory).name]
    requests = []
    monkeypatch.setattr(_build, "load", lambda **arguments: requests.append(arguments) or _build.status())
    assert cli.main(["build", "--rebuild"]) == 0
    assert requests == [{"verbose": False, "rebuild": True}]


IMPORT_SCRIPT = """
import json, torch
import imggen_fast
from imggen_fast import _build, cli
loaded_at_import = hasattr(torch.ops.imggen_fast, "bias_leaky_relu_")
if loaded_at_import:
    output = torch.randn(2, 3)
    torch.library.opcheck(torch.ops.imggen_fast.bias_leaky_relu_.default, (output, torch.randn(3), 0.2, 1),
                          test_utils="test_faketensor")  # the fake registered through on_load
status = imggen_fast.load_kernels()
print(json.dumps({"loaded_at_import": loaded_at_import, "available": status.available,
                  "built_now": status.built_now, "import_may_load": _build.cuda_build_ruled_out(),
                  "usable_after_load_kernels": hasattr(torch.ops.imggen_fast, "bias_leaky_relu_")}))
"""


def test_ops_are_usable_right_after_import(built_cache, tmp_path):
    root, _, _ = built_cache
    result = run_python(IMPORT_SCRIPT, env={"IMGGEN_FAST_CACHE": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["available"] and not report["built_now"] and report["usable_after_load_kernels"]
    # On a machine with a CUDA torch and a CUDA toolkit, import loads nothing (choosing the
    # build would initialise CUDA) and load_kernels() does it.
    assert report["loaded_at_import"] == report["import_may_load"]
    # Import never builds: with an empty cache, nothing is built until the kernels are needed.
    empty = run_python("import imggen_fast, torch; from imggen_fast import _build; "
                       "print(_build.status(), hasattr(torch.ops.imggen_fast, 'bias_leaky_relu_'))",
                       env={"IMGGEN_FAST_CACHE": str(tmp_path / "empty")})
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.split() == ["None", "False"] and "building" not in empty.stderr


def test_truncated_library_is_rebuilt_and_never_loaded(built_cache, tmp_path):
    """A cached library cut short (full disk, interrupted copy) crashed every later process
    with SIGBUS when it was loaded: it is checked against its record and built again."""
    environment, directory = copy_of(built_cache, tmp_path)
    library = _build.library_path(directory)
    with library.open("r+b") as handle:
        handle.truncate(library.stat().st_size // 2)
    assert "does not match its build record" in _build.cached_library_problem(directory)

    doctor = run_cli("doctor", env=environment)
    assert doctor.returncode == 0, f"rc {doctor.returncode}\n{doctor.stdout}\n{doctor.stderr[-3000:]}"
    assert "does not match its build record" in doctor.stderr and "building it again" in doctor.stderr
    assert "C++ kernels: usable" in doctor.stdout and "built now" in doctor.stdout
    assert _build.cached_library_problem(directory) is None

    build = run_cli("build", env=environment)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "already built, loaded from the cache" in build.stdout and "building" not in build.stderr


def test_library_that_will_not_load_is_reported_with_the_fix(built_cache, tmp_path):
    """A library that matches its record but that the loader refuses: import still works, and
    the report says that loading failed, the loader's whole message, and the fix."""
    environment, directory = copy_of(built_cache, tmp_path)
    library = _build.library_path(directory)
    library.write_bytes(b"not a shared library " * 100)
    record = json.loads(_build.record_path(directory).read_text())
    record["library"] = _build._fingerprint(library)
    _build.record_path(directory).write_text(json.dumps(record))

    imported = run_python("import warnings; warnings.simplefilter('error', UserWarning)\n"
                          "try:\n    import imggen_fast\nexcept UserWarning as w:\n    print('warned:', w)\n"
                          "else:\n    print('imported silently')", env=environment)
    assert imported.returncode == 0, imported.stderr[-3000:]
    if _build.cuda_build_ruled_out():  # else import loads nothing (see load_cached)
        assert "warned:" in imported.stdout and "will not load" in imported.stdout

    build = run_cli("build", env=environment)
    assert build.returncode == 1
    assert f"the built library {library} will not load" in build.stderr
    assert "To fix: rebuild it from scratch with `imggen-fast build --rebuild`" in build.stderr

    doctor = run_cli("doctor", env=environment)
    assert doctor.returncode == 1
    failure = doctor.stdout.split("C++ kernels: FAILED", 1)[1]
    # The whole reason: what failed, then the loader's own message on the next line, then the fix.
    assert "will not load" in failure and "invalid ELF header" in failure and "--rebuild" in failure


@pytest.mark.slow
def test_wheel_installs_and_compiles_in_a_fresh_virtualenv(tmp_path):
    """python -m build makes a wheel holding csrc/ and kernels/; installed in a new
    virtualenv, it compiles its kernels there (cold, in an empty cache, with the remains of
    a killed build in the way) and serves calls with them. Runs from the system Python and
    from inside a virtualenv alike."""
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
    # system_site_packages gives the new environment the base Python's packages; when this
    # Python is itself a virtualenv, torch and the rest live in its own site-packages
    # instead, so hand those over too (after the new environment's own, which come first).
    inner_site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                         capture_output=True, text=True, check=True).stdout.strip()
    outer_site_packages = [path for path in sys.path if path.endswith(("site-packages", "dist-packages"))]
    (Path(inner_site_packages) / "outer_environment.pth").write_text("\n".join(outer_site_packages) + "\n")

    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    cache = tmp_path / "cache"
    script = (
        "import json, socket, time, torch\n"
        "from imggen_fast import _build, backends, functional\n"
        "directory = _build.cache_dir()\n"
        "directory.mkdir(parents=True)\n"
        "(directory / 'lock').write_text('')\n"  # torch's own builder baton, left by a killed build
        "_build.lock_path(directory).write_text(f'999999999 {socket.gethostname()} {time.time()}')\n"
        "start = time.perf_counter(); status = _build.load(); seconds = time.perf_counter() - start\n"
        "g, y = torch.randn(3, 4), torch.randn(3, 4)\n"
        "ok = torch.equal(functional.leaky_relu_backward_from_output(g, y, 0.2), torch.where(y > 0, g, g * 0.2))\n"
        "print(json.dumps({'available': status.available, 'built_now': status.built_now, 'seconds': seconds,\n"
        "  'csrc': str(_build.csrc_dir()), 'torch': torch.__file__,\n"
        "  'backend': backends.choose(g.device.type), 'ok': ok}))\n"
    )
    # The new environment sees what is installed in it, not a source tree named by PYTHONPATH.
    inner_environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**inner_environment, "IMGGEN_FAST_CACHE": str(cache)}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["available"] and report["built_now"] and report["ok"], report
    assert report["backend"] == "cpp"
    assert report["csrc"].startswith(str(environment)), "the installed package must use its own csrc/"
    print(f"cold build in the fresh virtualenv: {report['seconds']:.1f} s (torch from {report['torch']})",
          file=sys.stderr)
