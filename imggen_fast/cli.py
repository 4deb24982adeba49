"""The ``imggen-fast`` command: ``report`` (the main job), ``doctor``, ``build``, ``train``,
``sample`` and ``check-gpu``."""

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


def _indented(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _print_build_failure(status, file=None) -> None:
    """Prints the whole reason a build failed, and the fix for that case, to ``file``
    (default: standard output)."""
    print(_indented(status.error), file=file)
    print(f"  To fix: {status.fix}", file=file)


def doctor(arguments: argparse.Namespace) -> int:
    """Prints versions, which backends are usable and why not, and what ``auto`` picks."""
    import torch

    import imggen_fast
    from imggen_fast import _build, backends

    try:
        requested = backends.get_backend()
    except ValueError as error:  # a bad IMGGEN_FAST_BACKEND: one line, not a report that stops half-way
        print(f"imggen-fast doctor: {error}", file=sys.stderr)
        return 2
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
        # The build warning would repeat what is printed below.
        warnings.simplefilter("ignore", _build.BuildWarning)
        status = _build.load()
    if status.available:
        print(f"C++ kernels: usable ({status.cache_dir}{', built now' if status.built_now else ''})")
    else:
        print(f"C++ kernels: FAILED (cache {status.cache_dir})")
        _print_build_failure(status)
    print(f"backend asked for: {requested} (set IMGGEN_FAST_BACKEND or imggen_fast.set_backend)")
    print()
    for backend in backends.BACKENDS[1:]:
        print(f"{backend}:")
        for device_type in ("cpu", "cuda"):
            reason = backends.why_not(backend, device_type)
            if reason is None:
                verdict = "usable"
            else:
                if status.error and status.error in reason:  # printed in full above, with the fix
                    reason = reason.replace(status.error, "see 'C++ kernels' above").replace(":\n", ": ")
                verdict = "no: " + reason.replace("\n", "\n" + " " * 20)
            print(f"  {device_type.upper() + ' tensors:':<15} {verdict}")
    print()
    _print_auto_choices()
    print()
    _print_gpu_defaults()
    return 0 if status.available else 1


def _print_gpu_defaults() -> None:
    """What runs on CUDA tensors by default, the TF32 settings it inherits, and what the
    Triton backend adds; printed whether or not this machine has a GPU."""
    import torch

    print("On CUDA tensors, auto runs the layers in cuDNN / cuBLAS through ATen (as eager and torch.compile do), then "
          "the fused bias + LeakyReLU epilogue in place; backward: the fused mask + bias-gradient kernel, then "
          "cuDNN's / cuBLAS's backward. The elementwise ops run the CUDA C++ kernels (no Python per launch: "
          "these models' layers are launch-bound), or the Triton launchers where this build has no CUDA kernels.")
    print(f"TF32 as torch's settings say: torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
          f"(convolutions), torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} (Linear).")
    print("The Triton implicit-GEMM convolution (IEEE fp32 dot products) runs only when the triton backend is named; "
          "its speed on a GPU is unmeasured. `imggen-fast check-gpu` runs the GPU tests and timings where a GPU "
          "exists.")


def _print_auto_choices() -> None:
    """What ``auto`` picks per device and why, and what that runs for each op."""
    from imggen_fast import backends
    from imggen_fast.ops import batch_norm_leaky_relu, bce_with_logits, layer_leaky_relu, reparameterize_kl

    choices = {device_type: backends.auto_choice(device_type) for device_type in ("cpu", "cuda")}
    for device_type, (backend, why) in choices.items():
        print(f"auto picks for {device_type.upper()} tensors: {backend} ({why})")
    print()
    for module in (layer_leaky_relu, reparameterize_kl, bce_with_logits, batch_norm_leaky_relu):
        for op_name, implementations in module.IMPLEMENTATIONS.items():
            print(f"{op_name}:")
            for device_type, (backend, _) in choices.items():
                what = implementations.get(backend, "the eager reference (imggen_fast/reference.py)")
                print(f"  {device_type.upper() + ' tensors:':<15} {backend}: {what}")


def build(arguments: argparse.Namespace) -> int:
    """Compiles the kernels ahead of time and says where they are cached."""
    from imggen_fast import _build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _build.BuildWarning)
        status = _build.load(verbose=arguments.verbose, rebuild=arguments.rebuild)
    if not status.available:
        print(f"build failed (cache {status.cache_dir}):", file=sys.stderr)
        _print_build_failure(status, file=sys.stderr)
        return 1
    how = f"built in {status.seconds:.1f} s" if status.built_now else "already built, loaded from the cache"
    print(f"C++ kernels {how}: {_build.library_path(status.cache_dir)}")
    return 0


def report(arguments: argparse.Namespace) -> int:
    """Runs the benchmark cases and writes report/REPORT.md (see imggen_fast.report)."""
    from . import report as report_module

    return report_module.main(arguments)


def make_parser() -> argparse.ArgumentParser:
    import torch

    import imggen_fast

    parser = argparse.ArgumentParser(prog="imggen-fast", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"imggen-fast {imggen_fast.__version__} (torch {torch.__version__}, "
                                f"python {platform.python_version()})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="versions, usable backends and why not").set_defaults(run=doctor)
    build_parser = commands.add_parser("build", help="compile the C++ kernels ahead of time")
    build_parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build_parser.add_argument("--rebuild", action="store_true",
                              help="compile from scratch, even if a verified build is cached")
    build_parser.set_defaults(run=build)
    from .report import add_arguments as add_report_arguments

    report_parser = commands.add_parser("report", help="eager vs imggen_fast vs torch.compile: REPORT.md, plots, JSON")
    add_report_arguments(report_parser)
    report_parser.set_defaults(run=report)

    from . import check_gpu

    check_parser = commands.add_parser("check-gpu", help="on a GPU: the cuda tests and the GPU timings, in one go")
    check_gpu.add_arguments(check_parser)
    check_parser.set_defaults(run=check_gpu.main)
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
