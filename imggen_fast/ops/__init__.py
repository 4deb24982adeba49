"""The op contract: for each op, its custom ops (C++ and Triton), their fake
implementations and autograd, and the per-call choice of implementation.

One module per op; :mod:`imggen_fast.functional` validates arguments and calls these."""
