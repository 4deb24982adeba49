"""Triton kernels of the fused VAE reparameterization + KL.

``reparameterize_kl_forward``: ``z = mu + eps * exp(0.5 * logvar)`` and the KL partial
sums in one sweep, then a second kernel adds the partial sums of each sample (or of the
whole batch) in a fixed order: a deterministic two-stage reduction, no atomics.
``reparameterize_kl_backward``: grad_mu and grad_logvar in one sweep, the noise
regenerated from the seed.

The noise of element i (its flat index in mu's memory order) is normal ``i % 4`` of
``tl.randn4x(seed, i // 4)``, as in the C++ and CUDA kernels. Each program covers up to
``CHUNK`` elements of one sample, in a tile of ``BLOCK`` elements that starts at a
multiple of 4, so that one ``tl.randn4x`` call over the tile's groups gives its noise."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import autotune, dense

# Elements per tile and warps per program: one configuration (no tuning), so that the
# KL's partial sums, and with them its bits, depend on the shape only. The kernels go
# through `autotune` with that one configuration so that the ahead-of-time compile test
# finds their launch configuration where it finds everyone's.
BLOCK = 1024
NUM_WARPS = 8
# Elements of one sample per program: the tile starts at the multiple of 4 at or below
# the chunk's first element, so up to 3 of its lanes precede the chunk.
CHUNK = BLOCK - 4
# Partial sums per program of the finishing kernel's sweep.
FINISH_BLOCK = 1024
SWEEP_CONFIG = [triton.Config({"BLOCK": BLOCK}, num_warps=NUM_WARPS)]
FINISH_CONFIG = [triton.Config({"BLOCK": FINISH_BLOCK}, num_warps=4)]


@triton.jit
def to_accumulator(values):
    """Widens to the accumulation type: fp64 stays fp64, everything else becomes fp32."""
    if values.dtype == tl.float64:
        return values
    return values.to(tl.float32)


@triton.jit
def sin_cos(angle):
    """sin and cos of ``angle`` in [0, 2 pi): Cephes' polynomials after a reduction by pi/4
    (as the C++ kernel's AVX2 path). libdevice's sinf/cosf would do, but their slow path
    for huge arguments keeps an array on the stack, which the no-spill check rejects."""
    octant = (angle * 1.27323954473516).to(tl.int32)
    octant = (octant + 1) & ~1
    octant_float = octant.to(tl.float32)
    # angle - octant * pi/4, pi/4 in three parts so that the products are exact
    r = angle - octant_float * 0.78515625
    r = r - octant_float * 2.4187564849853515625e-4
    r = r - octant_float * 3.77489497744594108e-8
    square = r * r
    sin_r = ((-1.9515295891e-4 * square + 8.3321608736e-3) * square - 1.6666654611e-1) * square * r + r
    cos_r = (((2.443315711809948e-5 * square - 1.388731625493765e-3) * square + 4.166664568298827e-2) * square
             * square - 0.5 * square + 1.0)
    # Quadrants 1 and 3 swap sin and cos; sin is negated in quadrants 2, 3, cos in 1, 2.
    swap = (octant & 2) != 0
    sine = tl.where(swap, cos_r, sin_r)
    cosine = tl.where(swap, sin_r, cos_r)
    sine = tl.where((octant & 4) != 0, -sine, sine)
    cosine = tl.where(((octant + 2) & 4) != 0, -cosine, cosine)
    return sine, cosine


@triton.jit
def pair_uniform_to_normal(u1, u2):
    """Box-Muller as triton.language.random.pair_uniform_to_normal, sin/cos from ``sin_cos``."""
    u1 = tl.maximum(1.0e-7, u1)
    sine, cosine = sin_cos(6.283185307179586 * u2)
    radius = tl.sqrt(-2.0 * tl.log(u1))
    return radius * cosine, radius * sine


@triton.jit
def tile_noise(seed_ptr, first_group, GROUPS: tl.constexpr):
    """The normals of flat indices [4 * first_group, 4 * (first_group + GROUPS)), in order:
    ``tl.randn4x(seed, group)`` (Triton's Philox and uniforms, Box-Muller as above)."""
    seed = tl.load(seed_ptr)
    groups = first_group + tl.arange(0, GROUPS).to(tl.int64)
    u1, u2, u3, u4 = tl.rand4x(seed, groups)
    n1, n2 = pair_uniform_to_normal(u1, u2)
    n3, n4 = pair_uniform_to_normal(u3, u4)
    # join(a, b) stacks along a new last dim, so join(join(n1, n3), join(n2, n4))[g, j, i]
    # is normal 2 * j + i of group g: row-major, the four normals of each group in order.
    return tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), [4 * GROUPS])


@triton.jit
def chunk_tile(per_sample, chunks_per_sample, BLOCK: tl.constexpr):
    """This program's sample, its tile's flat offsets, their mask and the tile's first group."""
    program = tl.program_id(0).to(tl.int64)
    sample = program // chunks_per_sample
    begin = sample * per_sample + (program % chunks_per_sample) * (BLOCK - 4)
    end = tl.minimum(begin + (BLOCK - 4), (sample + 1) * per_sample)
    first_group = begin // 4
    offsets = first_group * 4 + tl.arange(0, BLOCK)
    return program, sample, offsets, (offsets >= begin) & (offsets < end), first_group


@autotune(configs=SWEEP_CONFIG, key=["per_sample"])
@triton.jit
def reparameterize_kl_forward_kernel(mu_ptr, logvar_ptr, eps_ptr, seed_ptr, z_ptr, partial_ptr, per_sample,
                                     chunks_per_sample, HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    program, _, offsets, in_chunk, first_group = chunk_tile(per_sample, chunks_per_sample, BLOCK)
    mu = to_accumulator(tl.load(mu_ptr + offsets, mask=in_chunk, other=0.0))
    logvar = to_accumulator(tl.load(logvar_ptr + offsets, mask=in_chunk, other=0.0))
    if HAS_EPS:
        eps = to_accumulator(tl.load(eps_ptr + offsets, mask=in_chunk, other=0.0))
    else:
        eps = tile_noise(seed_ptr, first_group, BLOCK // 4).to(mu.dtype)
    std = tl.exp(0.5 * logvar)
    tl.store(z_ptr + offsets, (mu + eps * std).to(z_ptr.dtype.element_ty), mask=in_chunk)
    terms = tl.where(in_chunk, 1.0 + logvar - mu * mu - std * std, 0.0)
    tl.store(partial_ptr + program, tl.sum(terms, axis=0))


@autotune(configs=FINISH_CONFIG, key=["count"])
@triton.jit
def kl_finish_kernel(partial_ptr, sums_ptr, count, BLOCK: tl.constexpr):
    """sums[p] = partial[p * count] + ... + partial[p * count + count - 1], in a fixed order."""
    program = tl.program_id(0).to(tl.int64)
    first = program * count
    total = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for start in range(0, count, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(partial_ptr + first + index, mask=index < count, other=0.0)
    tl.store(sums_ptr + program, tl.sum(total, axis=0))


@autotune(configs=SWEEP_CONFIG, key=["per_sample"])
@triton.jit
def reparameterize_kl_backward_kernel(grad_z_ptr, kl_grad_ptr, mu_ptr, logvar_ptr, eps_ptr, seed_ptr, grad_mu_ptr,
                                      grad_logvar_ptr, per_sample, chunks_per_sample, kl_grad_stride,
                                      HAS_GRAD_Z: tl.constexpr, HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    _, sample, offsets, in_chunk, first_group = chunk_tile(per_sample, chunks_per_sample, BLOCK)
    mu = to_accumulator(tl.load(mu_ptr + offsets, mask=in_chunk, other=0.0))
    logvar = to_accumulator(tl.load(logvar_ptr + offsets, mask=in_chunk, other=0.0))
    # kl_grad: grad_kl of this sample (or the scalar's) times beta and the reduction's factor.
    kl_grad = tl.load(kl_grad_ptr + sample * kl_grad_stride).to(mu.dtype)
    std = tl.exp(0.5 * logvar)
    grad_mu = kl_grad * mu
    grad_logvar = kl_grad * (std * std - 1.0)
    if HAS_GRAD_Z:
        grad_z = to_accumulator(tl.load(grad_z_ptr + offsets, mask=in_chunk, other=0.0))
        if HAS_EPS:
            eps = to_accumulator(tl.load(eps_ptr + offsets, mask=in_chunk, other=0.0))
        else:
            eps = tile_noise(seed_ptr, first_group, BLOCK // 4).to(mu.dtype)
        grad_mu += grad_z
        grad_logvar += grad_z * eps * std
    tl.store(grad_mu_ptr + offsets, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=in_chunk)
    tl.store(grad_logvar_ptr + offsets, (0.5 * grad_logvar).to(grad_logvar_ptr.dtype.element_ty), mask=in_chunk)


def batch_major(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` dense with each sample's elements contiguous (copied once if it is not)."""
    tensor = dense(tensor)
    samples = tensor.shape[0]
    if samples > 1 and tensor.numel() > 0 and tensor.stride(0) * samples != tensor.numel():
        tensor = tensor.contiguous()
    return tensor


def layout_like(tensor: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides of ``layout`` (as is when they match, else copied once)."""
    if tensor.stride() == layout.stride():
        return tensor
    return torch.empty_like(layout).copy_(tensor)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_factor(reduction: str, samples: int, per_sample: int) -> float:
    """The factor a reduced KL applies to the sum over samples (NaN for the means of nothing)."""
    divisor = {"batchmean": samples, "mean": samples * per_sample}.get(reduction, 1)
    return 1.0 / divisor if divisor else float("nan")


def grid_shape(mu: torch.Tensor) -> tuple[int, int, int]:
    """(samples, elements per sample, programs per sample)."""
    samples = mu.shape[0]
    per_sample = mu.numel() // samples if samples else 0
    return samples, per_sample, max(1, triton.cdiv(per_sample, CHUNK))


def reparameterize_kl_forward(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None,
                              seed: torch.Tensor | None, beta: float,
                              reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, logvar, eps: (N, *), one shape; seed: 1-element int64 (used when eps is None).
    Returns z (N, *) in mu's layout and kl: () or (N,) for reduction "none"."""
    mu = batch_major(mu)
    logvar = layout_like(logvar, mu)
    samples, per_sample, chunks = grid_shape(mu)
    z = torch.empty_like(mu)
    sums = torch.zeros(samples if reduction == "none" else 1, dtype=accumulator_dtype(mu.dtype), device=mu.device)
    if mu.numel():
        eps = layout_like(eps, mu) if eps is not None else None
        partial = torch.empty(samples * chunks, dtype=sums.dtype, device=mu.device)
        reparameterize_kl_forward_kernel[(samples * chunks,)](
            mu, logvar, mu if eps is None else eps, mu if seed is None else seed, z, partial, per_sample, chunks,
            HAS_EPS=eps is not None)
        count = chunks if reduction == "none" else samples * chunks
        kl_finish_kernel[(sums.numel(),)](partial, sums, count)
    factor = -0.5 * beta * reduction_factor(reduction, samples, per_sample)
    kl = (sums * factor).to(mu.dtype)
    return z, kl if reduction == "none" else kl.reshape(())


def reparameterize_kl_backward(grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None, mu: torch.Tensor,
                               logvar: torch.Tensor, eps: torch.Tensor | None, seed: torch.Tensor | None,
                               beta: float, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_z (N, *) or None, grad_kl () / (N,) or None; returns (grad_mu, grad_logvar) in mu's layout."""
    mu = batch_major(mu)
    logvar = layout_like(logvar, mu)
    samples, per_sample, chunks = grid_shape(mu)
    grad_mu = torch.empty_like(mu)
    grad_logvar = torch.empty_like(mu)
    if mu.numel() == 0:
        return grad_mu, grad_logvar
    scale = beta * reduction_factor(reduction, samples, per_sample)
    if grad_kl is None:
        kl_grad = torch.zeros(1, dtype=accumulator_dtype(mu.dtype), device=mu.device)
    else:
        kl_grad = (grad_kl.to(accumulator_dtype(mu.dtype)) * scale).reshape(-1)
    kl_grad_stride = kl_grad.stride(0) if kl_grad.numel() > 1 else 0
    has_grad_z = grad_z is not None
    grad_z = layout_like(grad_z, mu) if has_grad_z else mu
    eps = layout_like(eps, mu) if eps is not None else None
    reparameterize_kl_backward_kernel[(samples * chunks,)](
        grad_z, kl_grad, mu, logvar, mu if eps is None else eps, mu if seed is None else seed, grad_mu, grad_logvar,
        per_sample, chunks, kl_grad_stride, HAS_GRAD_Z=has_grad_z, HAS_EPS=eps is not None or not has_grad_z)
    return grad_mu, grad_logvar


# The launchers, by the name of the op they implement (imggen_fast/ops/_registration.py).
LAUNCHERS = {"reparameterize_kl_forward": reparameterize_kl_forward,
             "reparameterize_kl_backward": reparameterize_kl_backward}
