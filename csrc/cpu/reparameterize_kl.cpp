// CPU kernels of the fused VAE reparameterization + KL: the forward writes z and the KL
// partial sums in one sweep; the backward writes grad_mu and grad_logvar in one sweep,
// regenerating the noise from the seed instead of reading it back.
//
// The KL is reduced deterministically: each sample's elements are cut into segments of
// at most kSegment elements (a cut that depends on the shape only), each segment is
// summed in a fixed order, the segment sums of a sample are added in order, and the
// per-sample values are added in order. The thread count only decides which thread
// computes which segment, so the bits do not depend on it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../backend.h"
#include "../reparameterize_kl.h"
#include "cpu_utils.h"

namespace imggen_fast::cpu {
namespace {

using namespace reparameterize_kl;  // the host helpers shared with the other device's kernels

// Elements per reduction segment: one sample's elements are summed in segments of this
// many, so a large sample still spreads over every thread.
constexpr int64_t kSegment = 4096;

using FloatVec = at::vec::Vectorized<float>;
// Philox groups generated together: 4 * kGroupsPerBatch normals.
constexpr int64_t kGroupsPerBatch = 8;
constexpr int64_t kNormalsPerBatch = math::kNormalsPerGroup * kGroupsPerBatch;
// Normals generated at a time: few enough to stay in L1 beside the operands, a
// multiple of every vector width so the vectorized sweep runs on across pieces unchanged.
constexpr int64_t kNoisePiece = 512;
static_assert(kNoisePiece % kNormalsPerBatch == 0);

#if defined(__AVX2__) && defined(__FMA__)
// AVX2 versions of the noise math and of exp: Philox on 8 x uint32 lanes, and float
// log, sin/cos and exp as Cephes' polynomials (about 1 ulp; the scalar functions the
// generator mirrors differ from them only by float rounding). Sleef's calls, which
// Vectorized<float> uses, cost several times more here.
namespace avx2 {

// The high and low 32 bits of the 64-bit products of the uint32 lanes of a and b.
inline void multiply_high_low(__m256i a, __m256i b, __m256i& high, __m256i& low) {
  const __m256i even = _mm256_mul_epu32(a, b);  // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  high = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0b10101010);
  low = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0b10101010);
}

// Triton's uint_to_uniform_float on 8 lanes.
inline __m256 uniform_from_bits(__m256i bits) {
  const __m256i folded = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));  // x < 0 ? ~x : x
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(math::kUniformScale));
}

// log(x) for positive normal x (Cephes logf): x = m * 2^e, m in [sqrt(1/2), sqrt(2)).
inline __m256 log_positive(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256 exponent_raw =
      _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  // frexp's mantissa in [0.5, 1)
  __m256 mantissa = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  const __m256 below_sqrt_half = _mm256_cmp_ps(mantissa, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 exponent = _mm256_sub_ps(exponent_raw, _mm256_and_ps(below_sqrt_half, one));
  // m - 1, doubled first where m < sqrt(1/2)
  mantissa = _mm256_add_ps(_mm256_sub_ps(mantissa, one), _mm256_and_ps(below_sqrt_half, mantissa));
  const __m256 square = _mm256_mul_ps(mantissa, mantissa);
  __m256 poly = _mm256_set1_ps(7.0376836292E-2f);
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(-1.1514610310E-1f));
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(1.1676998740E-1f));
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(-1.2420140846E-1f));
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(1.4249322787E-1f));
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(-1.6668057665E-1f));
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(2.0000714765E-1f));
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(-2.4999993993E-1f));
  poly = _mm256_fmadd_ps(poly, mantissa, _mm256_set1_ps(3.3333331174E-1f));
  __m256 result = _mm256_mul_ps(_mm256_mul_ps(poly, mantissa), square);
  result = _mm256_fmadd_ps(exponent, _mm256_set1_ps(-2.12194440e-4f), result);
  result = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), square, result);
  result = _mm256_add_ps(mantissa, result);
  return _mm256_fmadd_ps(exponent, _mm256_set1_ps(0.693359375f), result);
}

// sin(x) and cos(x) for 0 <= x < 8192 (Cephes sinf/cosf): x = j * pi/4 + r with j even,
// |r| <= pi/4; the quadrant j/2 picks sin r or cos r and the signs.
inline void sincos_nonnegative(__m256 x, __m256& sine, __m256& cosine) {
  __m256i octant = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(1.27323954473516f)));
  octant = _mm256_and_si256(_mm256_add_epi32(octant, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
  const __m256 octant_float = _mm256_cvtepi32_ps(octant);
  // r = x - j * pi/4, pi/4 in three parts so the products are exact
  __m256 r = _mm256_fnmadd_ps(octant_float, _mm256_set1_ps(0.78515625f), x);
  r = _mm256_fnmadd_ps(octant_float, _mm256_set1_ps(2.4187564849853515625e-4f), r);
  r = _mm256_fnmadd_ps(octant_float, _mm256_set1_ps(3.77489497744594108e-8f), r);
  const __m256 square = _mm256_mul_ps(r, r);
  __m256 sin_poly = _mm256_set1_ps(-1.9515295891E-4f);
  sin_poly = _mm256_fmadd_ps(sin_poly, square, _mm256_set1_ps(8.3321608736E-3f));
  sin_poly = _mm256_fmadd_ps(sin_poly, square, _mm256_set1_ps(-1.6666654611E-1f));
  const __m256 sin_r = _mm256_fmadd_ps(_mm256_mul_ps(sin_poly, square), r, r);
  __m256 cos_poly = _mm256_set1_ps(2.443315711809948E-5f);
  cos_poly = _mm256_fmadd_ps(cos_poly, square, _mm256_set1_ps(-1.388731625493765E-3f));
  cos_poly = _mm256_fmadd_ps(cos_poly, square, _mm256_set1_ps(4.166664568298827E-2f));
  const __m256 cos_r = _mm256_fmadd_ps(_mm256_mul_ps(cos_poly, square), square,
                                       _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), square, _mm256_set1_ps(1.0f)));
  // Quadrants 1 and 3 swap sin and cos; sin is negated in quadrants 2, 3, cos in 1, 2.
  const __m256 swap = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(octant, _mm256_set1_epi32(2)), _mm256_set1_epi32(2)));
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(octant, _mm256_set1_epi32(4)), 29));
  const __m256 cos_sign = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(octant, _mm256_set1_epi32(2)), _mm256_set1_epi32(4)), 29));
  sine = _mm256_xor_ps(_mm256_blendv_ps(sin_r, cos_r, swap), sin_sign);
  cosine = _mm256_xor_ps(_mm256_blendv_ps(cos_r, sin_r, swap), cos_sign);
}

// exp(x) (Cephes expf): x = n ln2 + r, |r| <= ln2 / 2, exp(x) = 2^n p(r). 2^n is applied
// as two halves so that results down to the denormals and up to overflow (inf) come
// out right; NaN stays NaN (min/max return their second operand for NaN).
inline __m256 exp(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), _mm256_min_ps(_mm256_set1_ps(89.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 square = _mm256_mul_ps(r, r);
  __m256 poly = _mm256_set1_ps(1.9875691500E-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507E-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073E-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894E-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459E-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 p = _mm256_add_ps(_mm256_fmadd_ps(poly, square, r), _mm256_set1_ps(1.0f));
  const __m256i power = _mm256_cvtps_epi32(n);
  const __m256i half_power = _mm256_srai_epi32(power, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 first_scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half_power, bias), 23));
  const __m256 second_scale = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(power, half_power), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, first_scale), second_scale);
}

// Per-seed round keys of Philox, broadcast to the lanes.
struct PhiloxKeys {
  __m256i k0[math::kPhiloxRounds];
  __m256i k1[math::kPhiloxRounds];

  explicit PhiloxKeys(uint64_t seed) {
    uint32_t key0 = static_cast<uint32_t>(seed);
    uint32_t key1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < math::kPhiloxRounds; ++round) {
      k0[round] = _mm256_set1_epi32(static_cast<int32_t>(key0));
      k1[round] = _mm256_set1_epi32(static_cast<int32_t>(key1));
      key0 += math::kPhiloxKeyA;
      key1 += math::kPhiloxKeyB;
    }
  }
};

// The normals of groups [first_group, first_group + 8 * kBatches) in memory order
// (math::randn4x on 8 lanes). kBatches independent batches are interleaved: each
// Philox round and each polynomial is a chain of dependent instructions, and two
// chains side by side keep the vector units busier than one.
template <int kBatches>
inline void normals_batches(const PhiloxKeys& keys, uint64_t first_group, float* out) {
  __m256i c0[kBatches], c1[kBatches], c2[kBatches], c3[kBatches];
  for (int batch = 0; batch < kBatches; ++batch) {
    alignas(32) uint32_t low[kGroupsPerBatch];
    alignas(32) uint32_t high[kGroupsPerBatch];
    for (int64_t lane = 0; lane < kGroupsPerBatch; ++lane) {
      const uint64_t group = first_group + static_cast<uint64_t>(batch * kGroupsPerBatch + lane);
      low[lane] = static_cast<uint32_t>(group);
      high[lane] = static_cast<uint32_t>(group >> 32);
    }
    c0[batch] = _mm256_load_si256(reinterpret_cast<const __m256i*>(low));
    c1[batch] = _mm256_load_si256(reinterpret_cast<const __m256i*>(high));
    c2[batch] = _mm256_setzero_si256();
    c3[batch] = _mm256_setzero_si256();
  }
  const __m256i round_a = _mm256_set1_epi32(static_cast<int32_t>(math::kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int32_t>(math::kPhiloxRoundB));
  for (int round = 0; round < math::kPhiloxRounds; ++round) {
    for (int batch = 0; batch < kBatches; ++batch) {
      __m256i high_b, low_b, high_a, low_a;
      multiply_high_low(round_b, c2[batch], high_b, low_b);
      multiply_high_low(round_a, c0[batch], high_a, low_a);
      c0[batch] = _mm256_xor_si256(_mm256_xor_si256(high_b, c1[batch]), keys.k0[round]);
      c2[batch] = _mm256_xor_si256(_mm256_xor_si256(high_a, c3[batch]), keys.k1[round]);
      c1[batch] = low_b;
      c3[batch] = low_a;
    }
  }
  __m256 normal[kBatches][4];
  for (int pair = 0; pair < 2; ++pair) {
    __m256 radius[kBatches], angle[kBatches];
    for (int batch = 0; batch < kBatches; ++batch) {
      const __m256i first_bits = pair == 0 ? c0[batch] : c2[batch];
      const __m256i second_bits = pair == 0 ? c1[batch] : c3[batch];
      const __m256 u1 = _mm256_max_ps(uniform_from_bits(first_bits), _mm256_set1_ps(math::kUniformFloor));
      angle[batch] = _mm256_mul_ps(_mm256_set1_ps(math::kTwoPi), uniform_from_bits(second_bits));
      radius[batch] = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_positive(u1)));
    }
    for (int batch = 0; batch < kBatches; ++batch) {
      __m256 sine, cosine;
      sincos_nonnegative(angle[batch], sine, cosine);
      normal[batch][2 * pair] = _mm256_mul_ps(radius[batch], cosine);
      normal[batch][2 * pair + 1] = _mm256_mul_ps(radius[batch], sine);
    }
  }
  // 4 x 8 transposes: normal[k][g] goes to out[4 * g + k].
  for (int batch = 0; batch < kBatches; ++batch) {
    float* batch_out = out + batch * kNormalsPerBatch;
    const __m256 t0 = _mm256_unpacklo_ps(normal[batch][0], normal[batch][1]);
    const __m256 t1 = _mm256_unpackhi_ps(normal[batch][0], normal[batch][1]);
    const __m256 t2 = _mm256_unpacklo_ps(normal[batch][2], normal[batch][3]);
    const __m256 t3 = _mm256_unpackhi_ps(normal[batch][2], normal[batch][3]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44);
    const __m256 u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44);
    const __m256 u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    _mm256_storeu_ps(batch_out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(batch_out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(batch_out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(batch_out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}

}  // namespace avx2
#endif

// exp on the accumulation type's vector: the AVX2 polynomial for float where
// Vectorized<float> is 8 lanes, else ATen's (Sleef).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vector_exp(const at::vec::Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__FMA__)
  if constexpr (std::is_same_v<acc_t, float>) {
    return avx2::exp(x);
  }
#endif
  return x.exp();
}

// Fills buffers with the normals of flat index ranges: batches of 16 and 8 groups on
// AVX2, single groups with the shared scalar code (math::randn4x) elsewhere and for the
// groups a range has left over.
class NoiseBuffer {
 public:
  explicit NoiseBuffer(uint64_t seed)
      : seed_(seed)
#if defined(__AVX2__) && defined(__FMA__)
        ,
        keys_(seed)
#endif
  {
  }

  // Fills the normals of flat indices [first, first + count) (count <= kNoisePiece) and
  // returns where the normal of `first` lies.
  const float* fill(int64_t first, int64_t count) {
    const int64_t first_group = first / math::kNormalsPerGroup;
    const int64_t skipped = first - first_group * math::kNormalsPerGroup;
    const int64_t groups = (skipped + count + math::kNormalsPerGroup - 1) / math::kNormalsPerGroup;
    int64_t group = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; group + 2 * kGroupsPerBatch <= groups; group += 2 * kGroupsPerBatch) {
      avx2::normals_batches<2>(keys_, static_cast<uint64_t>(first_group + group),
                               values_ + group * math::kNormalsPerGroup);
    }
    for (; group + kGroupsPerBatch <= groups; group += kGroupsPerBatch) {
      avx2::normals_batches<1>(keys_, static_cast<uint64_t>(first_group + group),
                               values_ + group * math::kNormalsPerGroup);
    }
#endif
    for (; group < groups; ++group) {
      const math::Normals4 normals = math::randn4x(seed_, static_cast<uint64_t>(first_group + group));
      for (int k = 0; k < math::kNormalsPerGroup; ++k) {
        values_[group * math::kNormalsPerGroup + k] = normals.values[k];
      }
    }
    return values_ + skipped;
  }

 private:
  uint64_t seed_;
#if defined(__AVX2__) && defined(__FMA__)
  avx2::PhiloxKeys keys_;
#endif
  alignas(64) float values_[kNoisePiece + 2 * kNormalsPerBatch];
};

// Loads AccVec<scalar_t>::size() normals, widened to the accumulation type.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> load_noise(const float* noise) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return FloatVec::loadu(noise);
  } else {
    using Vec = at::vec::Vectorized<acc_t>;
    alignas(64) acc_t widened[Vec::size()];
    for (int64_t lane = 0; lane < Vec::size(); ++lane) {
      widened[lane] = static_cast<acc_t>(noise[lane]);
    }
    return Vec::loadu(widened);
  }
}

// Outputs of this size and more are fresh mmaps (glibc serves every allocation that
// large with one) that no cache holds.
constexpr size_t kLargeOutputBytes = size_t{32} << 20;

// An uninitialized tensor like `layout` for the kernel to write once. A large output is
// advised onto transparent huge pages before the sweep touches it first, which cuts
// the page faults from one per 4 KiB to one per 2 MiB (on the development VM a 64 MiB
// output otherwise costs more in faults than the sweep that fills it). The advice is
// only a hint: where huge pages are off it does nothing.
at::Tensor empty_output_like(const at::Tensor& layout) {
  at::Tensor output = at::empty_like(layout);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (output.nbytes() >= kLargeOutputBytes) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(output.data_ptr());
    const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (start + output.nbytes()) & ~(kHugePage - 1);
    if (last > first) {
      madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    }
  }
#endif
  return output;
}

// Stores an output vector; a large output (`stream`) is written with non-temporal
// stores where the address allows, skipping the read-for-ownership of each cache line
// (a third of the memory traffic of a plain write).
template <typename scalar_t>
inline void store_output(scalar_t* data, const AccVec<scalar_t>& values, bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream && reinterpret_cast<uintptr_t>(data) % 32 == 0) {
      _mm256_stream_ps(data, values);
      return;
    }
  }
#endif
  store_acc(data, values);
}

// Orders a thread's non-temporal stores before whatever reads the output next.
inline void finish_output(bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    _mm_sfence();
  }
#endif
}

// How a batch of `samples` samples of `per_sample` elements each (contiguous in memory,
// sample after sample) is cut into reduction segments.
struct Segments {
  int64_t samples;
  int64_t per_sample;
  int64_t per_sample_segments;  // segments of one sample
  int64_t length;               // elements of a full segment

  Segments(int64_t samples, int64_t per_sample)
      : samples(samples),
        per_sample(per_sample),
        per_sample_segments(std::max<int64_t>(1, (per_sample + kSegment - 1) / kSegment)),
        length(std::min(per_sample, kSegment)) {}

  int64_t count() const { return samples * per_sample_segments; }
  int64_t sample(int64_t segment) const { return segment / per_sample_segments; }
  int64_t begin(int64_t segment) const {
    return sample(segment) * per_sample + (segment % per_sample_segments) * kSegment;
  }
  int64_t end(int64_t segment) const {
    return std::min(begin(segment) + kSegment, (sample(segment) + 1) * per_sample);
  }
  // Segments per parallel_for chunk: about kElementwiseGrain elements.
  int64_t grain() const { return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, length)); }
};

// Runs body(segment, begin, end, noise_buffer) for every segment, the segments spread
// over the threads in contiguous runs, each thread with its own noise buffer.
template <typename SegmentBody>
void for_each_segment(const Segments& segments, uint64_t seed, bool stream, const SegmentBody& body) {
  at::parallel_for(0, segments.count(), segments.grain(), [&](int64_t first_segment, int64_t last_segment) {
    NoiseBuffer noise_buffer(seed);
    for (int64_t segment = first_segment; segment < last_segment; ++segment) {
      body(segment, segments.begin(segment), segments.end(segment), noise_buffer);
    }
    finish_output(stream);
  });
}

// Runs body(piece, piece_end, noise) over [begin, end) in pieces of kNoisePiece, `noise`
// holding the normals of the piece when kNeedsNoise (else null). kNoisePiece is a
// multiple of the vector width, so a vector loop over the pieces visits the lanes as
// one loop over [begin, end) would.
template <bool kNeedsNoise, typename PieceBody>
void for_each_piece(int64_t begin, int64_t end, NoiseBuffer& noise_buffer, const PieceBody& body) {
  for (int64_t piece = begin; piece < end; piece += kNoisePiece) {
    const int64_t piece_end = std::min(piece + kNoisePiece, end);
    const float* noise = kNeedsNoise ? noise_buffer.fill(piece, piece_end - piece) : nullptr;
    body(piece, piece_end, noise);
  }
}

template <typename scalar_t, bool kHasEps>
void forward_sweep(const Segments& segments, const scalar_t* mu, const scalar_t* logvar, const scalar_t* eps,
                   uint64_t seed, scalar_t* z, bool stream, acc_type<scalar_t>* segment_sums) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const Vec half(acc_t(0.5));
  const Vec one(acc_t(1));
  for_each_segment(segments, seed, stream, [&](int64_t segment, int64_t begin, int64_t end, NoiseBuffer& buffer) {
    Vec vector_sum(acc_t(0));
    acc_t tail_sum = 0;
    for_each_piece<!kHasEps>(begin, end, buffer, [&](int64_t piece, int64_t piece_end, const float* noise) {
      int64_t i = piece;
      for (; i + Vec::size() <= piece_end; i += Vec::size()) {
        const Vec mu_values = load_acc(mu + i);
        const Vec logvar_values = load_acc(logvar + i);
        const Vec noise_values = kHasEps ? load_acc(eps + i) : load_noise<acc_t>(noise + (i - piece));
        const Vec std_values = vector_exp<acc_t>(half * logvar_values);
        store_output(z + i, at::vec::fmadd(noise_values, std_values, mu_values), stream);
        vector_sum += one + logvar_values - mu_values * mu_values - std_values * std_values;
      }
      for (; i < piece_end; ++i) {
        const acc_t mu_value = static_cast<acc_t>(mu[i]);
        const acc_t logvar_value = static_cast<acc_t>(logvar[i]);
        const acc_t noise_value = kHasEps ? static_cast<acc_t>(eps[i]) : static_cast<acc_t>(noise[i - piece]);
        const acc_t std_value = std::exp(acc_t(0.5) * logvar_value);
        z[i] = static_cast<scalar_t>(math::reparameterize<acc_t>(mu_value, noise_value, std_value));
        tail_sum += math::kl_term<acc_t>(mu_value, logvar_value, std_value);
      }
    });
    segment_sums[segment] =
        at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vector_sum) + tail_sum;
  });
}

template <typename scalar_t, bool kHasEps, bool kHasGradZ>
void backward_sweep(const Segments& segments, const scalar_t* grad_z, const scalar_t* grad_kl,
                    int64_t grad_kl_stride, acc_type<scalar_t> kl_grad_factor, const scalar_t* mu,
                    const scalar_t* logvar, const scalar_t* eps, uint64_t seed, scalar_t* grad_mu,
                    scalar_t* grad_logvar, bool stream) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const Vec half(acc_t(0.5));
  const Vec one(acc_t(1));
  for_each_segment(segments, seed, stream, [&](int64_t segment, int64_t begin, int64_t end, NoiseBuffer& buffer) {
    const acc_t kl_grad =
        grad_kl == nullptr ? acc_t(0)
                           : static_cast<acc_t>(grad_kl[segments.sample(segment) * grad_kl_stride]) * kl_grad_factor;
    const Vec kl_grad_values(kl_grad);
    for_each_piece<kHasGradZ && !kHasEps>(begin, end, buffer, [&](int64_t piece, int64_t piece_end,
                                                                   const float* noise) {
      int64_t i = piece;
      for (; i + Vec::size() <= piece_end; i += Vec::size()) {
        const Vec mu_values = load_acc(mu + i);
        const Vec logvar_values = load_acc(logvar + i);
        const Vec std_values = vector_exp<acc_t>(half * logvar_values);
        Vec grad_mu_values = kl_grad_values * mu_values;
        Vec grad_logvar_values = kl_grad_values * (std_values * std_values - one);
        if constexpr (kHasGradZ) {
          const Vec grad_z_values = load_acc(grad_z + i);
          const Vec noise_values = kHasEps ? load_acc(eps + i) : load_noise<acc_t>(noise + (i - piece));
          grad_mu_values += grad_z_values;
          grad_logvar_values = at::vec::fmadd(grad_z_values * noise_values, std_values, grad_logvar_values);
        }
        store_output(grad_mu + i, grad_mu_values, stream);
        store_output(grad_logvar + i, half * grad_logvar_values, stream);
      }
      for (; i < piece_end; ++i) {
        const acc_t mu_value = static_cast<acc_t>(mu[i]);
        const acc_t logvar_value = static_cast<acc_t>(logvar[i]);
        const acc_t std_value = std::exp(acc_t(0.5) * logvar_value);
        acc_t grad_z_value = 0;
        acc_t noise_value = 0;
        if constexpr (kHasGradZ) {
          grad_z_value = static_cast<acc_t>(grad_z[i]);
          noise_value = kHasEps ? static_cast<acc_t>(eps[i]) : static_cast<acc_t>(noise[i - piece]);
        }
        grad_mu[i] = static_cast<scalar_t>(math::grad_mu<acc_t>(grad_z_value, kl_grad, mu_value));
        grad_logvar[i] =
            static_cast<scalar_t>(math::grad_logvar<acc_t>(grad_z_value, kl_grad, noise_value, std_value));
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                             const c10::optional<at::Tensor>& eps,
                                                             const c10::optional<at::Tensor>& seed, double beta,
                                                             c10::string_view reduction_name) {
  if (triton_chosen()) {
    return call_triton<decltype(reparameterize_kl_forward)>("reparameterize_kl_forward", mu, logvar, eps, seed, beta, reduction_name);
  }
  const Reduction reduction = parse_reduction(reduction_name);
  const Operands operands = batch_major_operands(kForwardName, mu, logvar, eps);
  const bool has_eps = operands.eps.defined();
  if (!has_eps) {
    check_seed(kForwardName, seed, mu);
  }
  const uint64_t seed_value = has_eps ? 0 : static_cast<uint64_t>(seed->const_data_ptr<int64_t>()[0]);
  const int64_t samples = operands.samples;
  at::Tensor z = empty_output_like(operands.mu);
  at::Tensor kl = at::empty(reduction == Reduction::kNone ? at::IntArrayRef{samples} : at::IntArrayRef{}, mu.options());
  const Segments segments(samples, operands.per_sample);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), kForwardName, [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> segment_sums(static_cast<size_t>(segments.count()), acc_t(0));
    if (operands.per_sample > 0) {
      (has_eps ? forward_sweep<scalar_t, true> : forward_sweep<scalar_t, false>)(
          segments, operands.mu.const_data_ptr<scalar_t>(), operands.logvar.const_data_ptr<scalar_t>(),
          has_eps ? operands.eps.const_data_ptr<scalar_t>() : nullptr, seed_value, z.mutable_data_ptr<scalar_t>(),
          z.nbytes() >= kLargeOutputBytes, segment_sums.data());
    }
    // Per-sample KL = -0.5 * beta * (its segment sums, in order); then the samples in order.
    const acc_t per_sample_factor = static_cast<acc_t>(-0.5 * beta);
    scalar_t* kl_data = kl.mutable_data_ptr<scalar_t>();
    acc_t total = 0;
    for (int64_t sample = 0; sample < samples; ++sample) {
      acc_t sample_sum = 0;
      for (int64_t part = 0; part < segments.per_sample_segments; ++part) {
        sample_sum += segment_sums[sample * segments.per_sample_segments + part];
      }
      if (reduction == Reduction::kNone) {
        kl_data[sample] = static_cast<scalar_t>(per_sample_factor * sample_sum);
      } else {
        total += sample_sum;
      }
    }
    if (reduction != Reduction::kNone) {
      const acc_t factor = static_cast<acc_t>(reduction_factor(reduction, samples, operands.per_sample));
      kl_data[0] = static_cast<scalar_t>(per_sample_factor * total * factor);
    }
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward(
    const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_kl, const at::Tensor& mu,
    const at::Tensor& logvar, const c10::optional<at::Tensor>& eps, const c10::optional<at::Tensor>& seed,
    double beta, c10::string_view reduction_name) {
  if (triton_chosen()) {
    return call_triton<decltype(reparameterize_kl_backward)>("reparameterize_kl_backward", grad_z, grad_kl, mu, logvar, eps, seed, beta, reduction_name);
  }
  const Reduction reduction = parse_reduction(reduction_name);
  const Operands operands = backward_operands(grad_z, grad_kl, mu, logvar, eps, seed, reduction);
  const bool has_grad_z = operands.grad_z.defined();
  const uint64_t seed_value =
      has_grad_z && !operands.eps.defined() ? static_cast<uint64_t>(seed->const_data_ptr<int64_t>()[0]) : 0;
  at::Tensor grad_mu = empty_output_like(operands.mu);
  at::Tensor grad_logvar = empty_output_like(operands.mu);
  if (operands.per_sample == 0) {
    return {grad_mu, grad_logvar};
  }
  const Segments segments(operands.samples, operands.per_sample);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), kBackwardName, [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t kl_grad_factor =
        static_cast<acc_t>(beta * reduction_factor(reduction, operands.samples, operands.per_sample));
    const scalar_t* grad_kl_data = grad_kl.has_value() ? grad_kl->const_data_ptr<scalar_t>() : nullptr;
    const int64_t grad_kl_stride = grad_kl.has_value() && grad_kl->dim() == 1 ? grad_kl->stride(0) : 0;
    auto sweep = !has_grad_z               ? backward_sweep<scalar_t, true, false>
                 : operands.eps.defined() ? backward_sweep<scalar_t, true, true>
                                          : backward_sweep<scalar_t, false, true>;
    sweep(segments, has_grad_z ? operands.grad_z.const_data_ptr<scalar_t>() : nullptr, grad_kl_data, grad_kl_stride,
          kl_grad_factor, operands.mu.const_data_ptr<scalar_t>(), operands.logvar.const_data_ptr<scalar_t>(),
          operands.eps.defined() ? operands.eps.const_data_ptr<scalar_t>() : nullptr, seed_value,
          grad_mu.mutable_data_ptr<scalar_t>(), grad_logvar.mutable_data_ptr<scalar_t>(),
          grad_mu.nbytes() >= kLargeOutputBytes);
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CPU, m) {
  m.impl("reparameterize_kl_forward", &reparameterize_kl_forward);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward);
}

}  // namespace imggen_fast::cpu
