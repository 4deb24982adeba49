"""Triton kernels of imggen_fast, installed as ``imggen_fast.kernels``.

One module per op family. Each defines its launchers (plain Python functions taking the
op's arguments) and lists them in ``LAUNCHERS`` by the name of the op they implement.
tests/triton_launches.py runs the launchers on representative arguments in Triton's
interpreter and records every kernel launch; tests/test_triton_compile.py compiles each
recorded launch ahead of time for sm_80/sm_90 with the signature Triton's runtime would
derive from it (every autotune configuration, and the 64-bit variant of its integers
unless the module lists the kernel in ``NARROW_INTEGERS``). imggen_fast/ops/_registration.py
registers the launchers as implementations of the ops (the schemas, autograd and autocast
are the C++ ones). Importing a module imports Triton; ``imggen_fast`` does that only when
the Triton backend is chosen.
"""
