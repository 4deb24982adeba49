"""Triton kernels of imggen_fast, installed as ``imggen_fast.kernels``.

One module per op family. Each defines its launchers (plain Python functions taking the
op's arguments), lists them in ``LAUNCHERS`` by the name of the op they implement, and
lists the kernels it can launch, with their signatures, in ``AOT_KERNELS`` so that tests
compile every configuration ahead of time for sm_80/sm_90. imggen_fast/ops/_registration.py
registers the launchers as implementations of the ops (the schemas, autograd and autocast
are the C++ ones). Importing a module imports Triton; ``imggen_fast`` does that only when
the Triton backend is chosen.
"""
