// Native Euler / exponential-Heun scan of hil's multilayer dynamical network (forward and
// adjoint), loaded by hil/engine.py through ctypes (see hil_scan and HilScanArgs below).
// Work unit: a tile of R batch rows of one trial, integrated over the whole sequence with its
// state in L1; tiles are independent, so threads never synchronise inside the time loop.
// Tile buffers are neuron-major [M][R]: each operation is one SIMD vector over the R rows
// (GCC/Clang vector extensions, 64 bytes: 16 float or 8 double lanes).
//
// Built by hil.engine._build_native with the constants of sims/neurons.py on the command line
// (-DHIL_Z_CAP=... -DHIL_Z_SERIES=... -DHIL_PSI_A={...}), so that they are defined only there.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#if !defined(HIL_Z_CAP) || !defined(HIL_Z_SERIES) || !defined(HIL_PSI_A)
#error "define HIL_Z_CAP, HIL_Z_SERIES and HIL_PSI_A (hil.engine passes them from sims/neurons.py)"
#endif

// Arguments of hil_scan: sizes and flags, the step, and the tensors (contiguous, float32 or
// float64 as the dtype argument says; null where unused). hil.engine.HilScanArgs mirrors it
// field by field; hil_scan_args_layout lets it check the layout when the library is loaded.
struct HilScanArgs {
  int64_t K, B, NT, M;      // trials, batch rows, input points, neurons
  int64_t substeps;         // sub-steps per input point
  int64_t layer_size;       // N: Wr is the layer band of width N (M: dense)
  int64_t kind;             // neuron type (SPIN ... QUAD below)
  int64_t has_q, has_filter;
  int64_t nthreads;
  int64_t block_points;     // input points per adjoint block
  int64_t checkpoints;      // Y checkpoints per tile
  int64_t flush_subnormals;
  int64_t scheme;           // 0: explicit Euler, 1: exponential Heun
  double h;                 // sub-step (ns)
  const void *C, *W, *WT, *X0, *Y0;  // drive (K,B,T,M), Wr and its transpose (K,M,M), start
  const void *gamma, *q, *a;          // (K,M), (K,M), (K)
  void *Xseq, *Xf, *Yf, *Ycp;         // outputs; Ycp: Y at adjoint block starts (tile layout)
  const void *gXseq, *gXf, *gYf;      // adjoint: gradients of the outputs
  void *gC, *gWp, *gW, *gX0, *gY0;    // adjoint: gradients of the inputs (gWp: per tile)
  const void *ah, *th;                // expheun: filter increment factor, thermal floor (K)
};

namespace {

enum { SPIN = 0, CTRNN = 1, LINEAR = 2, LIQUID = 3, QUAD = 4 };

template <class T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(64))); };
template <class T> using V = typename Vec<T>::type;
template <class T> constexpr int RW = 64 / sizeof(T);  // rows per tile

template <class T> struct Job {
  int64_t K, B, NT, M, S, nb, tpk, kind, has_q, has_filter, nthreads, ftz;
  int64_t gslots, ncp;  // input points per adjoint block, Y checkpoints per tile
  int64_t scheme;       // 0: explicit Euler, 1: exponential Heun (see the Python docstring)
  T h;
  const T *C, *W, *WT, *X0, *Y0, *gamma, *q, *a, *ah;  // ah: expheun's filter increment factor
  const T* th;  // expheun: thermal floor per trial (null: none)
  T *Xseq, *Xf, *Yf, *Ycp;  // Ycp: Y at adjoint block starts, tile layout (K, tpk, ncp, M, R)
  const T *gXseq, *gXf, *gYf;
  T *gC, *gWp, *gW, *gX0, *gY0;
};

// 64-byte aligned scratch memory of one worker thread
template <class T> struct Scratch {
  T* p = nullptr;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      std::free(p);
      n = (want + 63) & ~size_t(63);
      p = static_cast<T*>(std::aligned_alloc(64, n * sizeof(T)));
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};

// In-register transpose of R vectors of R lanes (AVX-512), else through memory.
#define HIL_INLINE inline __attribute__((always_inline))
template <class T> HIL_INLINE void transpose(V<T>* r) {
  constexpr int R = RW<T>;
  T tmp[R][R];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j) tmp[j][i] = r[i][j];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j) r[i][j] = tmp[i][j];
}
#if defined(__AVX512F__)
template <> HIL_INLINE void transpose<float>(V<float>* rv) {
  __m512* r = reinterpret_cast<__m512*>(rv);
  __m512 t[16], u[16], v[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    u[4 * k + 0] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    v[m] = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    v[4 + m] = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    v[8 + m] = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    v[12 + m] = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm512_shuffle_f32x4(v[m], v[8 + m], 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(v[m], v[8 + m], 0xDD);
    r[4 + m] = _mm512_shuffle_f32x4(v[4 + m], v[12 + m], 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(v[4 + m], v[12 + m], 0xDD);
  }
}
template <> HIL_INLINE void transpose<double>(V<double>* rv) {
  __m512d* r = reinterpret_cast<__m512d*>(rv);
  __m512d t[8], v[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm512_unpacklo_pd(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_pd(r[2 * k], r[2 * k + 1]);
  }
  for (int m = 0; m < 2; ++m) {
    v[m] = _mm512_shuffle_f64x2(t[m], t[2 + m], 0x88);
    v[2 + m] = _mm512_shuffle_f64x2(t[m], t[2 + m], 0xDD);
    v[4 + m] = _mm512_shuffle_f64x2(t[4 + m], t[6 + m], 0x88);
    v[6 + m] = _mm512_shuffle_f64x2(t[4 + m], t[6 + m], 0xDD);
  }
  for (int m = 0; m < 2; ++m) {
    r[m] = _mm512_shuffle_f64x2(v[m], v[4 + m], 0x88);
    r[4 + m] = _mm512_shuffle_f64x2(v[m], v[4 + m], 0xDD);
    r[2 + m] = _mm512_shuffle_f64x2(v[2 + m], v[6 + m], 0x88);
    r[6 + m] = _mm512_shuffle_f64x2(v[2 + m], v[6 + m], 0xDD);
  }
}
#endif

enum Pad { REPEAT, ZERO };
// tile [M][R] from rows [0, nr) of a row-major slice (row stride rs); the missing rows repeat
// the last one (states: padding rows stay finite) or are zero (gradients); ADD accumulates
template <class T, Pad PAD, bool ADD>
void load_tile(T* dst, const T* src, int64_t rs, int nr, int64_t M) {
  constexpr int R = RW<T>;
  V<T>* d = reinterpret_cast<V<T>*>(dst);
  int64_t i0 = 0;
  for (; i0 + R <= M; i0 += R) {
    V<T> r[R];
    for (int k = 0; k < R; ++k) {
      if (PAD == ZERO && k >= nr) {
        r[k] = V<T>{};
      } else {
        std::memcpy(&r[k], src + (int64_t)std::min(k, nr - 1) * rs + i0, sizeof(V<T>));
      }
    }
    transpose<T>(r);
    for (int k = 0; k < R; ++k) {
      if (ADD) d[i0 + k] += r[k];
      else d[i0 + k] = r[k];
    }
  }
  for (int64_t i = i0; i < M; ++i)
    for (int k = 0; k < R; ++k) {
      const T x = (PAD == ZERO && k >= nr) ? T(0) : src[(int64_t)std::min(k, nr - 1) * rs + i];
      if (ADD) dst[i * R + k] += x;
      else dst[i * R + k] = x;
    }
}
template <class T> void store_tile(T* dst, const T* src, int64_t rs, int nr, int64_t M) {
  constexpr int R = RW<T>;
  const V<T>* s = reinterpret_cast<const V<T>*>(src);
  int64_t i0 = 0;
  for (; i0 + R <= M; i0 += R) {
    V<T> r[R];
    for (int k = 0; k < R; ++k) r[k] = s[i0 + k];
    transpose<T>(r);
    for (int k = 0; k < nr; ++k) std::memcpy(dst + k * rs + i0, &r[k], sizeof(V<T>));
  }
  for (int64_t i = i0; i < M; ++i)
    for (int k = 0; k < nr; ++k) dst[k * rs + i] = src[i * R + k];
}

// out[d0+o] = bs * base[d0+o] + sum_{s in [s0,s1)} A[s*M + d0+o] * src[s]  (vectors over rows)
template <class T, int NO>
inline void mv_chunk(const T* __restrict A, int64_t M, const V<T>* __restrict src, int64_t s0,
                     int64_t s1, const V<T>* base, T bs, V<T>* out, int64_t d0) {
  V<T> acc[NO];
  _Pragma("GCC unroll 16") for (int o = 0; o < NO; ++o) acc[o] = base ? bs * base[d0 + o] : V<T>{};
  for (int64_t s = s0; s < s1; ++s) {
    const V<T> v = src[s];
    const T* __restrict w = A + s * M + d0;
    _Pragma("GCC unroll 16") for (int o = 0; o < NO; ++o) acc[o] += w[o] * v;
  }
  _Pragma("GCC unroll 16") for (int o = 0; o < NO; ++o) out[d0 + o] = acc[o];
}

constexpr int NOB = 8;  // outputs per register block

// drive product restricted to the layer band: receivers of layer l read layers l-1 and l
// (fwd, A = Wr[send][recv]); the transpose (A = Wr^T[recv][send]) for the adjoint
template <class T>
void band_mv(const T* A, int64_t M, int64_t nb, bool fwd, const V<T>* src, const V<T>* base,
             T bs, V<T>* out) {
  for (int64_t l = 0; l * nb < M; ++l) {
    const int64_t d_hi = std::min(M, (l + 1) * nb);
    const int64_t s0 = fwd ? std::max<int64_t>(0, (l - 1) * nb) : l * nb;
    const int64_t s1 = std::min(M, fwd ? (l + 1) * nb : (l + 2) * nb);
    int64_t d = l * nb;
    for (; d + NOB <= d_hi; d += NOB) mv_chunk<T, NOB>(A, M, src, s0, s1, base, bs, out, d);
    switch (d_hi - d) {
      case 1: mv_chunk<T, 1>(A, M, src, s0, s1, base, bs, out, d); break;
      case 2: mv_chunk<T, 2>(A, M, src, s0, s1, base, bs, out, d); break;
      case 3: mv_chunk<T, 3>(A, M, src, s0, s1, base, bs, out, d); break;
      case 4: mv_chunk<T, 4>(A, M, src, s0, s1, base, bs, out, d); break;
      case 5: mv_chunk<T, 5>(A, M, src, s0, s1, base, bs, out, d); break;
      case 6: mv_chunk<T, 6>(A, M, src, s0, s1, base, bs, out, d); break;
      case 7: mv_chunk<T, 7>(A, M, src, s0, s1, base, bs, out, d); break;
      default: break;
    }
  }
}

// Weight gradient of the stashed steps: gW[j][i] += sum_k Y_k[j] gD_k[i], k = (step c, row r).
// Y is stashed in tile layout [c][M][R], gD transposed to rows [c*R + r][M], so that a register
// block of NJ senders x NV vectors of receivers accumulates straight into gW's rows.
template <class T, int NJ, int NV>
void gw_micro(const T* __restrict Yb, const T* __restrict Gt, int64_t M, int64_t Lc, int64_t j0,
              int64_t i0, T* __restrict gW) {
  constexpr int R = RW<T>;
  V<T> acc[NJ][NV];
  _Pragma("GCC unroll 16") for (int a = 0; a < NJ; ++a)
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)
      std::memcpy(&acc[a][v], gW + (j0 + a) * M + i0 + v * R, sizeof(V<T>));
  for (int64_t c = 0; c < Lc; ++c) {
    const T* yc = Yb + (c * M + j0) * R;
    for (int r = 0; r < R; ++r) {
      const T* g = Gt + (c * R + r) * M + i0;
      V<T> gv[NV];
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) std::memcpy(&gv[v], g + v * R, sizeof(V<T>));
      _Pragma("GCC unroll 16") for (int a = 0; a < NJ; ++a) {
        const T y = yc[a * R + r];
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) acc[a][v] += y * gv[v];
      }
    }
  }
  _Pragma("GCC unroll 16") for (int a = 0; a < NJ; ++a)
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)
      std::memcpy(gW + (j0 + a) * M + i0 + v * R, &acc[a][v], sizeof(V<T>));
}

constexpr int NJB = 12;  // senders per register block

template <class T, int NV>
void gw_cols(const T* Yb, const T* Gt, int64_t M, int64_t Lc, int64_t s0, int64_t s1, int64_t i0,
             T* gW) {
  int64_t j = s0;
  for (; j + NJB <= s1; j += NJB) gw_micro<T, NJB, NV>(Yb, Gt, M, Lc, j, i0, gW);
  switch (s1 - j) {
    case 1: gw_micro<T, 1, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 2: gw_micro<T, 2, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 3: gw_micro<T, 3, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 4: gw_micro<T, 4, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 5: gw_micro<T, 5, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 6: gw_micro<T, 6, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 7: gw_micro<T, 7, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 8: gw_micro<T, 8, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 9: gw_micro<T, 9, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 10: gw_micro<T, 10, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 11: gw_micro<T, 11, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    default: break;
  }
}

// the whole layer band of gW from Lc stashed steps
template <class T>
void gw_flush(const T* Yb, const T* Gt, int64_t Lc, T* gW, int64_t M, int64_t nb) {
  constexpr int R = RW<T>;
  for (int64_t l = 0; l * nb < M; ++l) {
    const int64_t i1 = std::min(M, (l + 1) * nb);
    const int64_t s0 = std::max<int64_t>(0, (l - 1) * nb), s1 = std::min(M, (l + 1) * nb);
    int64_t i = l * nb;
    for (; i + 2 * R <= i1; i += 2 * R) gw_cols<T, 2>(Yb, Gt, M, Lc, s0, s1, i, gW);
    for (; i + R <= i1; i += R) gw_cols<T, 1>(Yb, Gt, M, Lc, s0, s1, i, gW);
    for (; i < i1; ++i)  // receivers left over from the vectors
      for (int64_t j = s0; j < s1; ++j) {
        T acc = 0;
        for (int64_t c = 0; c < Lc; ++c)
          for (int r = 0; r < R; ++r) acc += Yb[(c * M + j) * R + r] * Gt[(c * R + r) * M + i];
        gW[j * M + i] += acc;
      }
  }
}

// gD (tile [M][R]) -> rows [r][M] of the stash; padding rows are zero
template <class T> void stash_rows(T* dst, const T* src, int nr, int64_t M) {
  constexpr int R = RW<T>;
  const V<T>* s = reinterpret_cast<const V<T>*>(src);
  int64_t i0 = 0;
  for (; i0 + R <= M; i0 += R) {
    V<T> r[R];
    for (int k = 0; k < R; ++k) r[k] = s[i0 + k];
    transpose<T>(r);
    for (int k = 0; k < R; ++k) {
      if (k >= nr) r[k] = V<T>{};
      std::memcpy(dst + k * M + i0, &r[k], sizeof(V<T>));
    }
  }
  for (int64_t i = i0; i < M; ++i)
    for (int k = 0; k < R; ++k) dst[k * M + i] = k < nr ? src[i * R + k] : T(0);
}

// exp of a vector. double: libm per lane. float: all lanes at once, e^y = 2^n exp(r),
// n = round(y / ln 2), |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (relative error
// < 1e-8); valid for |y| <= 87 (the callers cap their arguments).
template <class T> inline V<T> vexp(V<T> y) {
  for (int r = 0; r < RW<T>; ++r) y[r] = std::exp(y[r]);
  return y;
}
template <> inline V<float> vexp<float>(V<float> y) {
  typedef int32_t VI __attribute__((vector_size(64)));
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  const V<float> n = (y * 1.44269504088896341f + magic) - magic;
  const V<float> r = (y - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V<float> p = 1.0f / 5040 + r * 0.0f;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
// tanh of a vector. double: libm per lane (the exact path the float64 tests compare with).
template <class T> inline V<T> vtanh(V<T> x) {
  for (int r = 0; r < RW<T>; ++r) x[r] = std::tanh(x[r]);
  return x;
}
// float: all 16 lanes at once (libm's scalar tanh made the CTRNN 4x slower to train than the
// spintronic network). |x| < 1/8: odd Taylor series to x^7 (relative error < 2e-9); else
// tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) (vexp); |x| is capped at 9, where tanh is 1 in
// float. Error against libm: a few ulp; NaN stays NaN.
template <> inline V<float> vtanh<float>(V<float> x) {
  const V<float> zero = {};
  const V<float> ax = x < zero ? -x : x;
  const V<float> e = vexp<float>(-2 * (ax > 9 ? zero + 9 : ax));
  const V<float> big = (1 - e) / (1 + e);
  const V<float> x2 = ax * ax;
  const V<float> small =
      ax * (1 + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315))));
  const V<float> t = ax < 0.125f ? small : big;
  return x < zero ? -t : t;
}

// ---- exponential Heun: each neuron's own equation solved exactly at a held drive D ----
// constants defined once in sims/neurons.py, passed as -D macros when the kernel is built
constexpr double Z_CAP = HIL_Z_CAP, Z_SERIES = HIL_Z_SERIES;
// psi1(z) = (1 - e^-z) / z = sum a_n (-z)^n, a_n = 1 / (n+1)!, and its derivative (|z| < 0.5)
constexpr double PSI_A[10] = HIL_PSI_A;
template <class T> HIL_INLINE void psi1_series(V<T> z, V<T>& p, V<T>& dp) {
  const V<T> w = -z, zero = {};
  p = zero + T(PSI_A[9]);
  dp = zero + T(9 * PSI_A[9]);
  for (int n = 8; n >= 0; --n) {
    p = p * w + T(PSI_A[n]);
    if (n >= 1) dp = dp * w + T(n * PSI_A[n]);
  }
  dp = -dp;
}
// one sub-step at held drive D; with G, also dx'/dx (dx) and dx'/dD (dD).
// SPIN: dx/dt = r x - c x^2, r = D - g, c = D + g Q: x' = x / (F + c x psi), F = e^{-r h},
// psi = (1 - F) / r. CTRNN: x' = x E + D W, E = e^{-g h}, W = (1 - E) / g (per neuron: cE, cW).
// dy/dt = r y - c y^2 over h: y' = y / (F + c y psi), F = e^{-r h}, psi = (1 - F) / r; with G
// also dy'/dy, dy'/dr, dy'/dc (as sims.neurons._logistic)
template <bool G, class T>
HIL_INLINE V<T> logistic(V<T> y, V<T> r, V<T> c, T h, V<T>* dy, V<T>* dr, V<T>* dc) {
  const V<T> zero = {}, one = zero + 1, cap = zero + T(Z_CAP);
  const V<T> zr = r * h;
  V<T> z = zr > cap ? cap : zr;
  z = z < -cap ? -cap : z;
  const V<T> az = z < zero ? -z : z;
  const auto small = az < T(Z_SERIES);
  V<T> ps, dps;
  psi1_series<T>(small ? z : zero, ps, dps);
  const V<T> F = small ? 1 - z * ps : vexp<T>(-z);  // see _logistic: no cancellation
  const V<T> zb = small ? one : z;
  const V<T> psi1 = small ? ps : (1 - F) / zb;
  const V<T> psi = h * psi1;
  const V<T> den = F + c * y * psi;
  const V<T> yn = y / den;
  if constexpr (G) {
    const V<T> psir = (h * h) * (small ? dps : (F - psi1) / zb);
    const V<T> Fr = h * (small ? -(ps + z * dps) : -F);  // dF/dr of F as computed
    const V<T> azr = zr < zero ? -zr : zr;
    const V<T> inside = azr < T(Z_CAP) ? one : zero;
    const V<T> q = -yn / den;
    *dy = F / (den * den);
    *dr = q * inside * (c * y * psir + Fr);
    *dc = q * (y * psi);
  }
  return yn;
}
template <class T> HIL_INLINE V<T> vsqrt(V<T> x) {
  for (int r = 0; r < RW<T>; ++r) x[r] = std::sqrt(x[r]);
  return x;
}
#if defined(__AVX512F__)  // one instruction, the same correctly rounded result
#define HIL_VSQRT512(T, REG, SQRT)                              \
  template <> HIL_INLINE V<T> vsqrt<T>(V<T> x) {              \
    REG v;                                                      \
    std::memcpy(&v, &x, sizeof(v));                             \
    v = SQRT(v);                                                \
    std::memcpy(&x, &v, sizeof(v));                             \
    return x;                                                   \
  }
HIL_VSQRT512(float, __m512, _mm512_sqrt_ps)
HIL_VSQRT512(double, __m512d, _mm512_sqrt_pd)
#endif
// one sub-step at held drive D; with G, also dx'/dx (dx) and dx'/dD (dD).
// SPIN: dx/dt = th + r x - c x^2, r = D - g, c = D + g Q, th the thermal floor: the logistic
// step of y = x - b around a root b of the right-hand side (sims.neurons.held_drive_step).
// CTRNN: x' = x E + D W, E = e^{-g h}, W = (1 - E) / g (per neuron: cE, cW).
template <int KIND, bool G, class T>
HIL_INLINE V<T> phi(V<T> x, V<T> D, T g, T gq, T h, T cE, T cW, T th, V<T>* dx = nullptr,
                    V<T>* dD = nullptr) {
  if constexpr (KIND == CTRNN) {
    if constexpr (G) {
      *dx = V<T>{} + cE;
      *dD = V<T>{} + cW;
    }
    return x * cE + D * cW;
  } else {
    const V<T> zero = {}, one = zero + 1;
    const V<T> r = D - g, c = D + gq;
    V<T> dy, dr, dc;
    if (th == T(0)) {
      const V<T> xn = logistic<G, T>(x, r, c, h, &dy, &dr, &dc);
      if constexpr (G) {
        *dx = dy;
        *dD = dr + dc;
      }
      return xn;
    }
    const V<T> s = vsqrt<T>(r * r + 4 * th * c);
    const V<T> sg = r >= zero ? one : -one;
    const V<T> ars = r * sg + s;
    const V<T> b = -2 * th * sg / ars;
    const V<T> xn = logistic<G, T>(x - b, sg * s, c, h, &dy, &dr, &dc) + b;
    if constexpr (G) {
      const V<T> ds = (r + 2 * th) / s;
      const V<T> db = 2 * th * sg * (sg + ds) / (ars * ars);
      *dx = dy;
      *dD = db * (1 - dy) + dr * sg * ds + dc;
    }
    return xn;
  }
}
// o'(x): the output's derivative (tanh for the CTRNN, else 1)
template <int KIND, class T> HIL_INLINE V<T> out_dx(V<T> x) {
  if constexpr (KIND == CTRNN) {
    const V<T> th = vtanh<T>(x);
    return 1 - th * th;
  } else {
    return V<T>{} + 1;
  }
}
template <int KIND, class T> HIL_INLINE V<T> out_of(V<T> x) {
  if constexpr (KIND == CTRNN) return vtanh<T>(x);
  else return x;
}

// predictor: Xp = Phi(X, D0), Yp = filter(Y, Xp, X)
template <int KIND, bool FILT, class T>
void eh_pred(const V<T>* X, const V<T>* Y, const V<T>* D0, V<T>* Xp, V<T>* Yp, const T* gam,
             const T* q, const T* cE, const T* cW, T a, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i];
    const V<T> xp = phi<KIND, false, T>(x, D0[i], g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th);
    if constexpr (FILT) Yp[i] = a * Y[i] + ah * (out_of<KIND, T>(xp) - out_of<KIND, T>(x));
    else Yp[i] = out_of<KIND, T>(xp);
    Xp[i] = xp;
  }
}
// corrector: Dm = (D0 + D1) / 2 (written over D1), Xo = Phi(X, Dm), Yo = filter(Y, Xo, X);
// the outputs may alias X and Y
template <int KIND, bool FILT, class T>
void eh_corr(const V<T>* X, const V<T>* Y, const V<T>* D0, V<T>* Dm, V<T>* Xo, V<T>* Yo,
             const T* gam, const T* q, const T* cE, const T* cW, T a, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i], dm = T(0.5) * (D0[i] + Dm[i]);
    Dm[i] = dm;
    const V<T> xn = phi<KIND, false, T>(x, dm, g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th);
    if constexpr (FILT) Yo[i] = a * Y[i] + ah * (out_of<KIND, T>(xn) - out_of<KIND, T>(x));
    else Yo[i] = out_of<KIND, T>(xn);
    Xo[i] = xn;
  }
}
// adjoint, first half: gX holds dL/dX_{s+1} (direct part), gY = dL/dY_{s+1}. Writes
// gD1 = dL/dD1 and leaves in gX the part of dL/dX_s found so far.
template <int KIND, bool FILT, class T>
void eh_bwd1(const V<T>* X, const V<T>* Xn, const V<T>* Dm, V<T>* gX, const V<T>* gY, V<T>* gD1,
             const T* gam, const T* q, const T* cE, const T* cW, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i], gy = FILT ? ah * gY[i] : gY[i];
    const V<T> gxn = gX[i] + (KIND == CTRNN ? out_dx<KIND, T>(Xn[i]) * gy : gy);
    V<T> gxs = {};
    if constexpr (FILT) gxs = -(KIND == CTRNN ? out_dx<KIND, T>(x) * gy : gy);
    V<T> dx, dD;
    phi<KIND, true, T>(x, Dm[i], g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th, &dx, &dD);
    gX[i] = gxs + dx * gxn;
    gD1[i] = T(0.5) * (dD * gxn);
  }
}
// adjoint, second half, after gYp = dL/dYp = D1's transposed product: writes gD0 = dL/dD0,
// completes gX = dL/dX_s except through D0, and base = gY + gYp (the filter's carry, times a)
template <int KIND, bool FILT, class T>
void eh_bwd2(const V<T>* X, const V<T>* Xp, const V<T>* D0, V<T>* gX, const V<T>* gY,
             const V<T>* gYp, const V<T>* gD1, V<T>* gD0, V<T>* base, const T* gam, const T* q,
             const T* cE, const T* cW, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i], gyp = FILT ? ah * gYp[i] : gYp[i];
    const V<T> gxp = KIND == CTRNN ? out_dx<KIND, T>(Xp[i]) * gyp : gyp;
    V<T> gxs = gX[i];
    if constexpr (FILT) {
      gxs -= KIND == CTRNN ? out_dx<KIND, T>(x) * gyp : gyp;
      base[i] = gY[i] + gYp[i];
    }
    V<T> dx, dD;
    phi<KIND, true, T>(x, D0[i], g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th, &dx, &dD);
    gX[i] = gxs + dx * gxp;
    gD0[i] = gD1[i] + dD * gxp;
  }
}

template <int KIND, class T> inline V<T> gain(V<T> x) {
  if constexpr (KIND == SPIN) return x * (1 - x);
  else if constexpr (KIND == CTRNN || KIND == LINEAR) return x * 0 + 1;
  else if constexpr (KIND == LIQUID) return x;
  else return x * x;
}

// one Euler step given the drive D: (X, Y) -> (Xo, Yo); the outputs may alias the inputs
template <int KIND, bool FILT, class T>
void elem_fwd(const V<T>* X, const V<T>* Y, const V<T>* __restrict D, V<T>* Xo, V<T>* Yo,
              const T* gam, const T* q, T a, T h, T th, int64_t M) {
  constexpr bool CLIP = KIND == LINEAR || KIND == LIQUID || KIND == QUAD;
  const V<T> zero = {}, one = zero + 1;
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i];
    const V<T> x = X[i];
    V<T> damp;
    if (KIND == SPIN && q) damp = g * x * (1 + q[i] * x);
    else damp = g * x;
    V<T> f;
    if constexpr (KIND == CTRNN || KIND == LINEAR) f = -damp + D[i];
    else f = -damp + D[i] * gain<KIND, T>(x);
    if (KIND == SPIN && th != T(0)) f += th;  // the thermal floor (its derivative is 0)
    V<T> xn = x + h * f;
    if constexpr (CLIP) {
      xn = xn < zero ? zero : xn;
      xn = xn > one ? one : xn;
    }
    if constexpr (KIND == CTRNN) {
      if constexpr (FILT) Yo[i] = a * Y[i] + vtanh<T>(xn) - vtanh<T>(x);
      else Yo[i] = vtanh<T>(xn);
    } else {
      if constexpr (FILT) Yo[i] = a * Y[i] + xn - x;
      else Yo[i] = xn;
    }
    Xo[i] = xn;
  }
}

// adjoint of one Euler step: gX holds dL/dX_{s+1} (direct part) and becomes dL/dX_s;
// gY = dL/dY_{s+1}; gD = dL/dD_s is written
template <int KIND, bool FILT, class T>
void elem_bwd(const V<T>* __restrict X, const V<T>* __restrict Xn, const V<T>* __restrict D,
              V<T>* __restrict gX, const V<T>* __restrict gY, V<T>* __restrict gD, const T* gam,
              const T* q, T h, int64_t M) {
  constexpr bool CLIP = KIND == LINEAR || KIND == LIQUID || KIND == QUAD;
  const V<T> zero = {}, one = zero + 1;
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i];
    const V<T> x = X[i], xn = Xn[i], gy = gY[i];
    V<T> gxn;
    if constexpr (KIND == CTRNN) {
      const V<T> th = vtanh<T>(xn);
      gxn = gX[i] + (1 - th * th) * gy;
    } else {
      gxn = gX[i] + gy;
    }
    if constexpr (CLIP) gxn = gxn * ((xn > zero) & (xn < one) ? one : zero);
    const V<T> gf = gxn * h;
    if constexpr (KIND == CTRNN || KIND == LINEAR) gD[i] = gf;
    else gD[i] = gf * gain<KIND, T>(x);
    V<T> dfdx;
    if (KIND == SPIN && q) dfdx = (1 + 2 * q[i] * x) * (-g);
    else dfdx = zero - g;
    if constexpr (KIND == SPIN) dfdx = dfdx + D[i] * (1 - 2 * x);
    else if constexpr (KIND == LIQUID) dfdx = dfdx + D[i];
    else if constexpr (KIND == QUAD) dfdx = dfdx + D[i] * (2 * x);
    V<T> gxs = gxn + gf * dfdx;
    if constexpr (FILT) {
      if constexpr (KIND == CTRNN) {
        const V<T> th = vtanh<T>(x);
        gxs -= (1 - th * th) * gy;
      } else {
        gxs -= gy;
      }
    }
    gX[i] = gxs;
  }
}

template <class T> struct Ctx {
  const Job<T>* j;
  int64_t k, b0, nr;
  const T *W, *WT, *gam, *q;
  const T *cE = nullptr, *cW = nullptr;  // CTRNN exponential Heun: e^{-g h}, (1 - e^{-g h}) / g
  std::vector<T> ew;
  T a, ah, th;
  void set(const Job<T>& jb, int64_t tile) {
    j = &jb;
    k = tile / jb.tpk;
    b0 = (tile % jb.tpk) * RW<T>;
    nr = std::min<int64_t>(RW<T>, jb.B - b0);
    W = jb.W + k * jb.M * jb.M;
    WT = jb.WT ? jb.WT + k * jb.M * jb.M : nullptr;
    gam = jb.gamma + k * jb.M;
    q = jb.has_q ? jb.q + k * jb.M : nullptr;
    a = jb.has_filter ? jb.a[k] : T(0);
    ah = jb.has_filter && jb.ah ? jb.ah[k] : T(1);
    th = jb.th ? jb.th[k] : T(0);
    if (jb.scheme == 1 && jb.kind == CTRNN) {
      ew.resize(2 * jb.M);
      for (int64_t i = 0; i < jb.M; ++i) {
        ew[i] = std::exp(-gam[i] * jb.h);
        ew[jb.M + i] = (1 - ew[i]) / gam[i];
      }
      cE = ew.data();
      cW = ew.data() + jb.M;
    }
  }
  int64_t row(int64_t t) const { return ((k * j->B + b0) * j->NT + t) * j->M; }  // (K,B,T,M)
  int64_t srow() const { return (k * j->B + b0) * j->M; }                         // (K,B,M)
};

template <class T> void step_fwd(const Ctx<T>& c, const V<T>* X, const V<T>* Y, const V<T>* Ct,
                                 V<T>* D, V<T>* Xo, V<T>* Yo) {
  const Job<T>& jb = *c.j;
  band_mv<T>(c.W, jb.M, jb.nb, true, Y, Ct, T(1), D);
  const int64_t M = jb.M;
#define HIL_FWD(KD)                                                                     \
  if (jb.has_filter) elem_fwd<KD, true, T>(X, Y, D, Xo, Yo, c.gam, c.q, c.a, jb.h, c.th, M); \
  else elem_fwd<KD, false, T>(X, Y, D, Xo, Yo, c.gam, c.q, c.a, jb.h, c.th, M);
  switch (jb.kind) {
    case SPIN: HIL_FWD(SPIN) break;
    case CTRNN: HIL_FWD(CTRNN) break;
    case LINEAR: HIL_FWD(LINEAR) break;
    case LIQUID: HIL_FWD(LIQUID) break;
    default: HIL_FWD(QUAD) break;
  }
#undef HIL_FWD
}

template <class T> void step_bwd(const Ctx<T>& c, const V<T>* X, const V<T>* Xn, const V<T>* D,
                                 V<T>* gX, const V<T>* gY, V<T>* gD) {
  const Job<T>& jb = *c.j;
  const int64_t M = jb.M;
#define HIL_BWD(KD)                                                                   \
  if (jb.has_filter) elem_bwd<KD, true, T>(X, Xn, D, gX, gY, gD, c.gam, c.q, jb.h, M); \
  else elem_bwd<KD, false, T>(X, Xn, D, gX, gY, gD, c.gam, c.q, jb.h, M);
  switch (jb.kind) {
    case SPIN: HIL_BWD(SPIN) break;
    case CTRNN: HIL_BWD(CTRNN) break;
    case LINEAR: HIL_BWD(LINEAR) break;
    case LIQUID: HIL_BWD(LIQUID) break;
    default: HIL_BWD(QUAD) break;
  }
#undef HIL_BWD
}

// one exponential-Heun sub-step: (X, Y) -> (Xo, Yo), which may alias X, Y. Leaves the drive
// D0, the mean drive Dm and the predicted Xp, Yp in their buffers (the adjoint's recomputation).
template <class T> void step_fwd_eh(const Ctx<T>& c, const V<T>* X, const V<T>* Y, const V<T>* Ct,
                                    V<T>* D0, V<T>* Dm, V<T>* Xp, V<T>* Yp, V<T>* Xo, V<T>* Yo) {
  const Job<T>& jb = *c.j;
  const int64_t M = jb.M;
  band_mv<T>(c.W, M, jb.nb, true, Y, Ct, T(1), D0);
#define HIL_EH(KD, F)                                                                        \
  eh_pred<KD, F, T>(X, Y, D0, Xp, Yp, c.gam, c.q, c.cE, c.cW, c.a, c.ah, jb.h, c.th, M);              \
  band_mv<T>(c.W, M, jb.nb, true, Yp, Ct, T(1), Dm);                                         \
  eh_corr<KD, F, T>(X, Y, D0, Dm, Xo, Yo, c.gam, c.q, c.cE, c.cW, c.a, c.ah, jb.h, c.th, M);
  if (jb.kind == CTRNN) {
    if (jb.has_filter) { HIL_EH(CTRNN, true) } else { HIL_EH(CTRNN, false) }
  } else {
    if (jb.has_filter) { HIL_EH(SPIN, true) } else { HIL_EH(SPIN, false) }
  }
#undef HIL_EH
}

// adjoint of one exponential-Heun sub-step: gX = dL/dX_{s+1} (direct part) becomes dL/dX_s,
// gY = dL/dY_{s+1}; writes gD0, gD1 and gYo = dL/dY_s. gYp and base are scratch.
template <class T> void step_bwd_eh(const Ctx<T>& c, const V<T>* X, const V<T>* Xn, const V<T>* D0,
                                    const V<T>* Dm, const V<T>* Xp, V<T>* gX, const V<T>* gY,
                                    V<T>* gD0, V<T>* gD1, V<T>* gYp, V<T>* base, V<T>* gYo) {
  const Job<T>& jb = *c.j;
  const int64_t M = jb.M;
#define HIL_EHB(KD, F)                                                                          \
  eh_bwd1<KD, F, T>(X, Xn, Dm, gX, gY, gD1, c.gam, c.q, c.cE, c.cW, c.ah, jb.h, c.th, M);                \
  band_mv<T>(c.WT, M, jb.nb, false, gD1, nullptr, T(0), gYp);                                   \
  eh_bwd2<KD, F, T>(X, Xp, D0, gX, gY, gYp, gD1, gD0, base, c.gam, c.q, c.cE, c.cW, c.ah, jb.h, c.th, M);\
  band_mv<T>(c.WT, M, jb.nb, false, gD0, F ? base : nullptr, c.a, gYo);
  if (jb.kind == CTRNN) {
    if (jb.has_filter) { HIL_EHB(CTRNN, true) } else { HIL_EHB(CTRNN, false) }
  } else {
    if (jb.has_filter) { HIL_EHB(SPIN, true) } else { HIL_EHB(SPIN, false) }
  }
#undef HIL_EHB
}

template <class T> void fwd_tile(const Job<T>& jb, int64_t tile, Scratch<T>& sc) {
  constexpr int R = RW<T>;
  const int64_t M = jb.M, TM = jb.NT * M, MR = M * R;
  T* p = sc.get(7 * MR);
  T *X = p, *Y = p + MR, *D = p + 2 * MR, *Ct = p + 3 * MR;
  T *Dm = p + 4 * MR, *Xp = p + 5 * MR, *Yp = p + 6 * MR;  // exponential Heun only
  auto v = [](T* x) { return reinterpret_cast<V<T>*>(x); };
  Ctx<T> c;
  c.set(jb, tile);
  load_tile<T, REPEAT, false>(X, jb.X0 + c.srow(), M, c.nr, M);
  load_tile<T, REPEAT, false>(Y, jb.Y0 + c.srow(), M, c.nr, M);
  for (int64_t t = 0; t < jb.NT; ++t) {
    load_tile<T, REPEAT, false>(Ct, jb.C + c.row(t), TM, c.nr, M);
    if (jb.scheme == 1)
      for (int64_t s = 0; s < jb.S; ++s)
        step_fwd_eh<T>(c, v(X), v(Y), v(Ct), v(D), v(Dm), v(Xp), v(Yp), v(X), v(Y));
    else
      for (int64_t s = 0; s < jb.S; ++s) step_fwd<T>(c, v(X), v(Y), v(Ct), v(D), v(X), v(Y));
    store_tile(jb.Xseq + c.row(t), X, TM, c.nr, M);
    // checkpoint of Y where an adjoint block starts (X's is Xseq itself)
    if (jb.Ycp && (t + 1) % jb.gslots == 0 && t + 1 < jb.NT)
      std::memcpy(jb.Ycp + (tile * jb.ncp + (t + 1) / jb.gslots - 1) * MR, Y, MR * sizeof(T));
  }
  store_tile(jb.Xf + c.srow(), X, M, c.nr, M);
  store_tile(jb.Yf + c.srow(), Y, M, c.nr, M);
}

// Adjoint of one tile, block by block backwards in time. A block is G input points (G*S
// sub-steps, the weight-gradient stash): its sub-steps are recomputed from the checkpoint at
// its start (X from Xseq, Y from Ycp), then walked backwards, then folded into gW.
template <class T> void bwd_tile(const Job<T>& jb, int64_t tile, Scratch<T>& sc) {
  constexpr int R = RW<T>;  // rows per tile
  const int64_t M = jb.M, S = jb.S, TM = jb.NT * M, MR = M * R;
  const int64_t G = jb.gslots, GS = G * S;
  // scratch: gX gY gYn gCt gD | C of the block's points (G) | X_0..X_GS | D_0..D_{GS-1} |
  // Y stash [GS][M][R] | gD stash [GS*R][M]
  T* p = sc.get((5 + G + 1) * MR + 4 * GS * MR);
  auto v = [](T* x) { return reinterpret_cast<V<T>*>(x); };
  auto cv = [](const T* x) { return reinterpret_cast<const V<T>*>(x); };
  V<T> *gX = v(p), *gY = v(p + MR), *gYn = v(p + 2 * MR), *gCt = v(p + 3 * MR), *gD = v(p + 4 * MR);
  T* Cb = p + 5 * MR;
  T* Xst = Cb + G * MR;
  T* Dst = Xst + (GS + 1) * MR;
  T* Yb = Dst + GS * MR;
  T* Gb = Yb + GS * MR;
  Ctx<T> c;
  c.set(jb, tile);
  T* gWt = jb.gWp + tile * M * M;
  std::fill(gWt, gWt + M * M, T(0));
  std::fill(p, p + 2 * MR, T(0));
  if (jb.gXf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gX), jb.gXf + c.srow(), M, c.nr, M);
  if (jb.gYf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gY), jb.gYf + c.srow(), M, c.nr, M);
  for (int64_t t0 = ((jb.NT - 1) / G) * G; t0 >= 0; t0 -= G) {
    const int64_t np = std::min(G, jb.NT - t0), ns = np * S;
    if (t0) {
      load_tile<T, REPEAT, false>(Xst, jb.Xseq + c.row(t0 - 1), TM, c.nr, M);
      std::memcpy(Yb, jb.Ycp + (tile * jb.ncp + t0 / G - 1) * MR, MR * sizeof(T));
    } else {
      load_tile<T, REPEAT, false>(Xst, jb.X0 + c.srow(), M, c.nr, M);
      load_tile<T, REPEAT, false>(Yb, jb.Y0 + c.srow(), M, c.nr, M);
    }
    for (int64_t q = 0; q < np; ++q) {
      T* Ct = Cb + q * MR;
      load_tile<T, REPEAT, false>(Ct, jb.C + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k = q * S + s;
        T* ynext = k + 1 < ns ? Yb + (k + 1) * MR : reinterpret_cast<T*>(gYn);  // last: unused
        step_fwd<T>(c, cv(Xst + k * MR), cv(Yb + k * MR), cv(Ct), v(Dst + k * MR),
                    v(Xst + (k + 1) * MR), v(ynext));
      }
    }
    for (int64_t q = np - 1; q >= 0; --q) {
      if (jb.gXseq)
        load_tile<T, ZERO, true>(reinterpret_cast<T*>(gX), jb.gXseq + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = S - 1; s >= 0; --s) {
        const int64_t k = q * S + s;
        step_bwd<T>(c, cv(Xst + k * MR), v(Xst + (k + 1) * MR), v(Dst + k * MR), gX, gY, gD);
        stash_rows(Gb + k * MR, reinterpret_cast<const T*>(gD), c.nr, M);
        if (s == S - 1)
          for (int64_t i = 0; i < M; ++i) gCt[i] = gD[i];
        else
          for (int64_t i = 0; i < M; ++i) gCt[i] += gD[i];
        band_mv<T>(c.WT, M, jb.nb, false, gD, jb.has_filter ? gY : nullptr, c.a, gYn);
        std::swap(gY, gYn);
      }
      store_tile(jb.gC + c.row(t0 + q), reinterpret_cast<T*>(gCt), TM, c.nr, M);
    }
    gw_flush<T>(Yb, Gb, ns, gWt, M, jb.nb);
  }
  store_tile(jb.gX0 + c.srow(), reinterpret_cast<T*>(gX), M, c.nr, M);
  store_tile(jb.gY0 + c.srow(), reinterpret_cast<T*>(gY), M, c.nr, M);
}

// Adjoint of one tile for the exponential Heun scheme, organised as bwd_tile. Per sub-step the
// recomputation keeps X, D0, Dm, Xp and both filtered outputs the drives were computed from
// (Y and the predicted Yp: two weight-gradient entries per sub-step, with gD0 and gD1).
template <class T> void bwd_tile_eh(const Job<T>& jb, int64_t tile, Scratch<T>& sc) {
  constexpr int R = RW<T>;
  const int64_t M = jb.M, S = jb.S, TM = jb.NT * M, MR = M * R;
  const int64_t G = jb.gslots, GS = G * S;
  // scratch: gX gY gYn gCt gD0 gD1 gYp base | C of the block's points (G) | X_0..X_GS |
  // D0, Dm, Xp (GS each) | Y stash [2 GS][M][R] | gD stash [2 GS * R][M]
  T* p = sc.get((9 + G) * MR + 8 * GS * MR);
  auto v = [](T* x) { return reinterpret_cast<V<T>*>(x); };
  V<T> *gX = v(p), *gY = v(p + MR), *gYn = v(p + 2 * MR), *gCt = v(p + 3 * MR);
  V<T> *gD0 = v(p + 4 * MR), *gD1 = v(p + 5 * MR), *gYp = v(p + 6 * MR), *base = v(p + 7 * MR);
  T* Cb = p + 8 * MR;
  T* Xst = Cb + G * MR;
  T* D0st = Xst + (GS + 1) * MR;
  T* Dmst = D0st + GS * MR;
  T* Xpst = Dmst + GS * MR;
  T* Yb = Xpst + GS * MR;
  T* Gb = Yb + 2 * GS * MR;
  Ctx<T> c;
  c.set(jb, tile);
  T* gWt = jb.gWp + tile * M * M;
  std::fill(gWt, gWt + M * M, T(0));
  std::fill(p, p + 2 * MR, T(0));
  if (jb.gXf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gX), jb.gXf + c.srow(), M, c.nr, M);
  if (jb.gYf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gY), jb.gYf + c.srow(), M, c.nr, M);
  for (int64_t t0 = ((jb.NT - 1) / G) * G; t0 >= 0; t0 -= G) {
    const int64_t np = std::min(G, jb.NT - t0), ns = np * S;
    if (t0) {
      load_tile<T, REPEAT, false>(Xst, jb.Xseq + c.row(t0 - 1), TM, c.nr, M);
      std::memcpy(Yb, jb.Ycp + (tile * jb.ncp + t0 / G - 1) * MR, MR * sizeof(T));
    } else {
      load_tile<T, REPEAT, false>(Xst, jb.X0 + c.srow(), M, c.nr, M);
      load_tile<T, REPEAT, false>(Yb, jb.Y0 + c.srow(), M, c.nr, M);
    }
    for (int64_t q = 0; q < np; ++q) {
      T* Ct = Cb + q * MR;
      load_tile<T, REPEAT, false>(Ct, jb.C + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k = q * S + s;
        T* ynext = k + 1 < ns ? Yb + 2 * (k + 1) * MR : reinterpret_cast<T*>(gYn);  // last: unused
        step_fwd_eh<T>(c, v(Xst + k * MR), v(Yb + 2 * k * MR), v(Ct), v(D0st + k * MR),
                       v(Dmst + k * MR), v(Xpst + k * MR), v(Yb + (2 * k + 1) * MR),
                       v(Xst + (k + 1) * MR), v(ynext));
      }
    }
    for (int64_t q = np - 1; q >= 0; --q) {
      if (jb.gXseq)
        load_tile<T, ZERO, true>(reinterpret_cast<T*>(gX), jb.gXseq + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = S - 1; s >= 0; --s) {
        const int64_t k = q * S + s;
        step_bwd_eh<T>(c, v(Xst + k * MR), v(Xst + (k + 1) * MR), v(D0st + k * MR),
                       v(Dmst + k * MR), v(Xpst + k * MR), gX, gY, gD0, gD1, gYp, base, gYn);
        stash_rows(Gb + 2 * k * MR, reinterpret_cast<const T*>(gD0), c.nr, M);
        stash_rows(Gb + (2 * k + 1) * MR, reinterpret_cast<const T*>(gD1), c.nr, M);
        if (s == S - 1)
          for (int64_t i = 0; i < M; ++i) gCt[i] = gD0[i] + gD1[i];
        else
          for (int64_t i = 0; i < M; ++i) gCt[i] += gD0[i] + gD1[i];
        std::swap(gY, gYn);
      }
      store_tile(jb.gC + c.row(t0 + q), reinterpret_cast<T*>(gCt), TM, c.nr, M);
    }
    gw_flush<T>(Yb, Gb, 2 * ns, gWt, M, jb.nb);
  }
  store_tile(jb.gX0 + c.srow(), reinterpret_cast<T*>(gX), M, c.nr, M);
  store_tile(jb.gY0 + c.srow(), reinterpret_cast<T*>(gY), M, c.nr, M);
}

// Flush-to-zero and denormals-are-zero for the life of a worker, the caller's mode restored
// after. A spintronic neuron without drive decays towards its fixed point x = 0 and the
// adjoint decays with it: in subnormal range every operation on them takes a microcode
// assist; this made the flip-flop network (no filter) train 9x slower. Values below
// 1.2e-38 (float) or 2.2e-308 (double) become 0, far below anything the model resolves.
struct FlushDenormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  explicit FlushDenormals(bool on) {
    if (on) _mm_setcsr(saved | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
  }
  ~FlushDenormals() { _mm_setcsr(saved); }
#else
  explicit FlushDenormals(bool) {}
#endif
};

template <class T> int run(const Job<T>& jb, bool backward) {
  const int64_t ntiles = jb.K * jb.tpk;
  std::atomic<int64_t> next{0};
  std::atomic<int> failed{0};
  auto worker = [&]() {
    FlushDenormals ftz(jb.ftz != 0);
    try {
      Scratch<T> sc;
      for (int64_t tile; (tile = next.fetch_add(1)) < ntiles;) {
        if (backward && jb.scheme == 1) bwd_tile_eh(jb, tile, sc);
        else if (backward) bwd_tile(jb, tile, sc);
        else fwd_tile(jb, tile, sc);
      }
    } catch (...) {
      failed = 1;
    }
  };
  const int64_t nt = std::max<int64_t>(1, std::min(jb.nthreads, ntiles));
  std::vector<std::thread> pool;
  try {
    for (int64_t i = 1; i < nt; ++i) pool.emplace_back(worker);
  } catch (...) {  // fewer threads than asked: the ones running share all the tiles
  }
  worker();
  for (auto& th : pool) th.join();
  if (failed) return 1;
  if (backward) {  // weight gradient: tile partials summed in a fixed order (deterministic)
    const int64_t MM = jb.M * jb.M;
    for (int64_t k = 0; k < jb.K; ++k) {
      T* out = jb.gW + k * MM;
      std::fill(out, out + MM, T(0));
      for (int64_t tb = 0; tb < jb.tpk; ++tb) {
        const T* part = jb.gWp + (k * jb.tpk + tb) * MM;
        for (int64_t e = 0; e < MM; ++e) out[e] += part[e];
      }
    }
  }
  return 0;
}

template <class T> int entry(int backward, const HilScanArgs& a) {
  Job<T> jb;
  jb.K = a.K; jb.B = a.B; jb.NT = a.NT; jb.M = a.M; jb.S = a.substeps; jb.nb = a.layer_size;
  jb.kind = a.kind; jb.has_q = a.has_q; jb.has_filter = a.has_filter; jb.nthreads = a.nthreads;
  jb.tpk = (jb.B + RW<T> - 1) / RW<T>;
  jb.gslots = a.block_points;
  jb.ncp = a.checkpoints;
  jb.ftz = a.flush_subnormals;
  jb.scheme = a.scheme;
  jb.h = (T)a.h;
  jb.C = (const T*)a.C; jb.W = (const T*)a.W; jb.WT = (const T*)a.WT;
  jb.X0 = (const T*)a.X0; jb.Y0 = (const T*)a.Y0; jb.gamma = (const T*)a.gamma;
  jb.q = (const T*)a.q; jb.a = (const T*)a.a;
  jb.Xseq = (T*)a.Xseq; jb.Xf = (T*)a.Xf; jb.Yf = (T*)a.Yf; jb.Ycp = (T*)a.Ycp;
  jb.gXseq = (const T*)a.gXseq; jb.gXf = (const T*)a.gXf; jb.gYf = (const T*)a.gYf;
  jb.gC = (T*)a.gC; jb.gWp = (T*)a.gWp; jb.gW = (T*)a.gW; jb.gX0 = (T*)a.gX0;
  jb.gY0 = (T*)a.gY0;
  jb.ah = (const T*)a.ah;
  jb.th = (const T*)a.th;
  return run(jb, backward != 0);
}

// The kernel's neuron functions on n values, lane by lane as the scan evaluates them, so that
// tests can compare them with sims/neurons.py: gain g(x), output o(x) and o'(x); for the
// held-drive kinds also phi, the exponential-Heun sub-step at drive D, with dx'/dx and dx'/dD.
template <int KIND, class T>
void probe(int64_t n, const T* x, const T* D, T g, T q, T h, T th, T* gn, T* o, T* odx, T* xn,
           T* dx, T* dD) {
  constexpr int R = RW<T>;
  const T gq = g * q;
  const T cE = std::exp(-g * h), cW = (1 - cE) / g;  // as Ctx::set
  for (int64_t i0 = 0; i0 < n; i0 += R) {
    const int nr = (int)std::min<int64_t>(R, n - i0);
    V<T> vx, vD;
    for (int r = 0; r < R; ++r) {
      vx[r] = x[i0 + std::min(r, nr - 1)];
      vD[r] = D ? D[i0 + std::min(r, nr - 1)] : T(0);
    }
    V<T> out[6];
    out[0] = gain<KIND, T>(vx);
    out[1] = out_of<KIND, T>(vx);
    out[2] = out_dx<KIND, T>(vx);
    if constexpr (KIND == SPIN || KIND == CTRNN) {
      out[3] = phi<KIND, true, T>(vx, vD, g, gq, h, cE, cW, th, &out[4], &out[5]);
    }
    T* dst[6] = {gn, o, odx, xn, dx, dD};
    for (int k = 0; k < 6; ++k)
      if (dst[k] && (k < 3 || KIND == SPIN || KIND == CTRNN))
        for (int r = 0; r < nr; ++r) dst[k][i0 + r] = out[k][r];
  }
}

template <class T>
int probe_kind(int kind, int64_t n, const void* x, const void* D, double g, double q, double h,
               double th, void* const* outs) {
  const T *xs = (const T*)x, *Ds = (const T*)D;
  T* o[6];
  for (int k = 0; k < 6; ++k) o[k] = (T*)outs[k];
#define HIL_PROBE(KD) \
  probe<KD, T>(n, xs, Ds, T(g), T(q), T(h), T(th), o[0], o[1], o[2], o[3], o[4], o[5])
  switch (kind) {
    case SPIN: HIL_PROBE(SPIN); return 0;
    case CTRNN: HIL_PROBE(CTRNN); return 0;
    case LINEAR: HIL_PROBE(LINEAR); return 0;
    case LIQUID: HIL_PROBE(LIQUID); return 0;
    case QUAD: HIL_PROBE(QUAD); return 0;
    default: return 1;
  }
#undef HIL_PROBE
}

}  // namespace

extern "C" {
// dtype: 0 float32, 1 float64; backward: 0 forward scan, 1 adjoint. Returns 0 on success.
int hil_scan(int dtype, int backward, const HilScanArgs* args) {
  return dtype == 0 ? entry<float>(backward, *args) : entry<double>(backward, *args);
}
int hil_rows_per_tile(int dtype) { return dtype == 0 ? RW<float> : RW<double>; }
// sizeof(HilScanArgs) and the byte offset of each of its fields in declaration order (writes
// at most max_fields); returns the number of fields. The loader compares them with its mirror.
int hil_scan_args_layout(int64_t* size, int64_t* offsets, int max_fields) {
#define HIL_F(f) offsetof(HilScanArgs, f)
  const int64_t off[] = {
      HIL_F(K), HIL_F(B), HIL_F(NT), HIL_F(M), HIL_F(substeps), HIL_F(layer_size), HIL_F(kind),
      HIL_F(has_q), HIL_F(has_filter), HIL_F(nthreads), HIL_F(block_points),
      HIL_F(checkpoints), HIL_F(flush_subnormals), HIL_F(scheme), HIL_F(h), HIL_F(C), HIL_F(W),
      HIL_F(WT), HIL_F(X0), HIL_F(Y0), HIL_F(gamma), HIL_F(q), HIL_F(a), HIL_F(Xseq),
      HIL_F(Xf), HIL_F(Yf), HIL_F(Ycp), HIL_F(gXseq), HIL_F(gXf), HIL_F(gYf), HIL_F(gC),
      HIL_F(gWp), HIL_F(gW), HIL_F(gX0), HIL_F(gY0), HIL_F(ah), HIL_F(th)};
#undef HIL_F
  const int n = (int)(sizeof(off) / sizeof(off[0]));
  *size = (int64_t)sizeof(HilScanArgs);
  for (int i = 0; i < n && i < max_fields; ++i) offsets[i] = off[i];
  return n;
}
// The neuron functions of the kernel (see probe): x and D (D may be null) hold n values;
// outs[6]: g(x), o(x), o'(x), phi, dphi/dx, dphi/dD (null: not wanted; the last three only for
// the held-drive kinds, SPIN and CTRNN). Returns 0, or 1 for an unknown kind. For tests.
int hil_neuron(int dtype, int kind, int64_t n, const void* x, const void* D, double gamma,
               double q, double h, double th, void* const* outs) {
  return dtype == 0 ? probe_kind<float>(kind, n, x, D, gamma, q, h, th, outs)
                    : probe_kind<double>(kind, n, x, D, gamma, q, h, th, outs);
}
}
