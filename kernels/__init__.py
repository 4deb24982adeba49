"""Triton kernels of imggen_fast, installed as ``imggen_fast.kernels``.

One module per op; each registers its launchers with ``torch.library.triton_op``
(namespace ``imggen_fast_triton``) and lists the kernels it can launch, with their
signatures, in ``AOT_KERNELS`` so that tests compile every configuration ahead of
time for sm_80/sm_90. Importing a module imports Triton; ``imggen_fast`` does that
only when the Triton backend is chosen.
"""
