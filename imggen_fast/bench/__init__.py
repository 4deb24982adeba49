"""Benchmark cases, defined once: ``pytest benchmarks/`` and ``imggen-fast report`` both
take theirs from here.

The registry contract
---------------------
Every module of this package whose name does not start with ``_`` is imported by
:func:`imggen_fast.bench.registry.discover`. A module that defines ``CASES`` (or, failing
that, a ``cases()`` function taking no argument) offers those cases; nothing else needs
registering, so a new module (say ``batch_norm_leaky_relu.py``) appears in the report
and the benchmarks without a line of report code changing.

* ``CASES`` is a list of :class:`imggen_fast.bench.common.Case`, one per
  op (or model) x size x direction x provider. Describing a case must be cheap: nothing
  is built until its ``make()`` runs. ``make()`` builds the inputs on
  :func:`common.device() <imggen_fast.bench.common.device>`, runs the work once
  (compiling, for torch.compile) and returns a function running it once more.
* Cases sharing (kind, op, size, direction) are one comparison: the report times their
  providers interleaved. List sizes from the smallest: ``--bench-sizes smallest`` (the
  CI smoke run) takes each op's first size.
* A provider's role comes from the start of its name: ``eager*`` (what users write;
  ``eager`` is the reference), ``imggen_fast*`` and ``compile_imggen_fast*`` (this
  library), ``compile*`` (torch.compile of the eager code), ``floor*`` (a lower bound:
  ``common.copy_floor`` copies the same bytes; the bare layer). On a GPU with several
  usable backends, each ``imggen_fast*`` case runs once per backend
  (``imggen_fast[triton]``, ``imggen_fast[cuda]``).
* ``quick=True`` puts a case in the report's default (quick) mode. A module that marks no
  case (all ``None``) gets its first two sizes in the direction ``both`` there.
* Every ``imggen_fast*`` case should give ``check``: a function returning
  ``common.compare(its outputs and gradients, the reference's)`` on the same inputs; the
  report shows a speed only beside its check, and marks a case without one.
  ``kept_for_backward``: bytes autograd keeps over one forward
  (``common.saved_bytes``, parameters excluded). Neither may depend on the direction:
  each runs once per (op, size, provider).
* ``bytes_moved`` (the least bytes the work must read and write) and/or ``flops`` give
  the GB/s and GFLOP/s, and their share of the copy bandwidth and matmul throughput
  measured in the same run. ``kind="model"`` marks a whole training step (direction
  ``step``); ``measure_memory=True`` has the report measure its peak memory in a fresh
  process. ``in_speedups=False`` shows a variant that does other work than its op (the
  bottleneck with its noise given) without counting it in the speed-ups.
* ``SKIPPED`` (optional): (description, reason) pairs for cases a module cannot offer
  yet (a model kind the models do not accept); the report lists them.

Modules: ``common`` (the case record, providers, limits, checks, memory), ``timing``
(the interleaved harness, the pytest runner), ``registry`` (discovery and selection),
``memory`` (peak memory in a fresh process), and the case modules."""
