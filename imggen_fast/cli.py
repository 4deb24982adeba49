"""The ``imggen-fast`` command: ``doctor``, ``build``, ``train`` and ``sample``."""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import warnings


def _version_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not usable ({error})"
    lines = [line for line in (result.stdout or result.stderr).splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return f"not usable (exit status {result.returncode})"
    return lines[-1].strip() if "nvcc" in command[0] else lines[0].strip()


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and shutil.which(f"{CUDA_HOME}/bin/nvcc"):
        return f"{CUDA_HOME}/bin/nvcc"
    return shutil.which("nvcc")


def doctor(arguments: argparse.Namespace) -> int:
    """Prints versions, which backends are usable and why not, and what ``auto`` picks."""
    import torch

    import imggen_fast
    from imggen_fast import _build, backends

    print(f"imggen_fast {imggen_fast.__version__}  python {platform.python_version()}  {platform.machine()}")
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.version.cuda else "CPU build"
    print(f"torch {torch.__version__} ({cuda}), {torch.get_num_threads()} threads, "
          f"CPU capability {_build.cpu_capability()}")
    if backends.triton_installed():
        import triton

        interpreter = ", interpreter on (TRITON_INTERPRET=1)" if backends.triton_interpreting() else ""
        print(f"triton {triton.__version__}{interpreter}")
    else:
        print("triton: not installed")
    print(f"C++ compiler: {_build.compiler()} ({_build.compiler_identity()})")
    nvcc = _nvcc()
    print(f"nvcc: {_version_line([nvcc, '--version']) if nvcc else 'not found'}")
    print(f"kernel cache: {_build.cache_root()}")
    print()
    with warnings.catch_warnings():
        # The build warning would repeat what the table below says.
        warnings.simplefilter("ignore", _build.BuildWarning)
        status = _build.load()
    state = "usable" if status.available else "FAILED"
    print(f"C++ kernels: {state} ({status.cache_dir}{', built now' if status.built_now else ''})")
    print(f"backend asked for: {backends.get_backend()} (set IMGGEN_FAST_BACKEND or imggen_fast.set_backend)")
    print()
    for backend in backends.BACKENDS[1:]:
        print(f"{backend}:")
        for device_type in ("cpu", "cuda"):
            reason = backends.why_not(backend, device_type)
            verdict = "usable" if reason is None else f"no: {reason.splitlines()[0]}"
            print(f"  {device_type.upper() + ' tensors:':<15} {verdict}")
    print()
    for device_type in ("cpu", "cuda"):
        print(f"auto picks for {device_type.upper()} tensors: {backends.auto_choice(device_type)}")
    return 0 if status.available else 1


def build(arguments: argparse.Namespace) -> int:
    """Compiles the kernels ahead of time and says where they are cached."""
    from imggen_fast import _build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _build.BuildWarning)
        status = _build.load(verbose=arguments.verbose)
    if not status.available:
        print(f"build failed (cache {status.cache_dir}):\n{status.error}", file=sys.stderr)
        return 1
    how = f"built in {status.seconds:.1f} s" if status.built_now else "already built, loaded from the cache"
    print(f"C++ kernels {how}: {_build.library_path(status.cache_dir)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imggen-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="versions, usable backends and why not").set_defaults(run=doctor)
    build_parser = commands.add_parser("build", help="compile the C++ kernels ahead of time")
    build_parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build_parser.set_defaults(run=build)
    _add_training_commands(commands)
    return parser


def _add_training_commands(commands: argparse._SubParsersAction) -> None:
    """``train gan|vae|cnn`` and ``sample``, defined in imggen_fast.train."""
    from imggen_fast import train

    train_parser = commands.add_parser("train", help="train the GAN, VAE or CNN on real data (torchrun-aware)",
                                       description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_train_arguments(train_parser)
    train_parser.set_defaults(run=train.train_command)
    sample_parser = commands.add_parser("sample", help="draw a PNG grid from a trained GAN or VAE checkpoint")
    train.add_sample_arguments(sample_parser)
    sample_parser.set_defaults(run=train.sample_command)


def main(argv: list[str] | None = None) -> int:
    arguments = make_parser().parse_args(argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
