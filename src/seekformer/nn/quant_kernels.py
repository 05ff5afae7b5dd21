"""Fused weight-only int8 / int4 matrix-vector kernels for CPU decoding (AVX2 + FMA), built on first use.

Decoding multiplies a few rows x [M,I] by every weight; the step is bound by the bytes of weight read,
so the kernels read the packed integers, convert them in registers and accumulate in fp32 — the weight
is never dequantized into memory. Layouts (see nn/quant.py):
  * int8: q [O,I] int8, scale [O] fp32: W[o,i] = q[o,i] * scale[o];
  * int4: q [O,I/2] uint8 in blocks of 32 weights (16 bytes): byte j of a block holds weight j in its low
    nibble and weight j+16 in its high one; scale, minimum [O,I/G] fp32 per group of G (a multiple of
    32) inputs: W[o,i] = q * scale + minimum.  y = sum_g scale_g * (x_g . q_g) + minimum_g * sum(x_g).

The C source below is compiled with gcc (-O3 -mavx2 -mfma -fopenmp; a second or two) the first time a
quantized layer runs, cached under $SEEKFORMER_CACHE or ~/.cache/seekformer/kernels/ by a hash of the
source, and called through ctypes (plain C, no torch headers: a torch C++ extension took minutes to
build here). Where it cannot be built (no compiler, no AVX2, not x86 Linux) `kernels()` returns None
and nn/quant.py falls back to dequantizing in torch. The work splits over output rows on
torch.get_num_threads() OpenMP threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

/* int8: R output rows at a time against M input rows; acc[r][m] are independent FMA chains. */
#define I8_BLOCK(M, R)                                                                                   \
static void i8_##M##_##R(const float* x, int64_t I, const int8_t* q, const float* s, float* y, int64_t O, \
                         int64_t o) {                                                                    \
  __m256 acc[R][M];                                                                                      \
  for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();               \
  for (int64_t i = 0; i < I; i += 8) {                                                                   \
    __m256 xv[M];                                                                                        \
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * I + i);                                  \
    for (int r = 0; r < R; ++r) {                                                                        \
      __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + (o + r) * I + i)))); \
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(w, xv[m], acc[r][m]);                      \
    }                                                                                                    \
  }                                                                                                      \
  for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) y[m * O + o + r] = hsum(acc[r][m]) * s[o + r]; \
}

/* int4: the activations enter as int8 per group of G inputs (xq, scale xd: x ~ xq * xd, as llama.cpp's Q8
   activations), so 32 weights cost one maddubs (u8 nibbles x s8 -> s16 pairs) and one madd (-> s32) per row
   instead of eight int->float conversions and four FMAs; the s32 sums are converted once per group, where
   the weight scale and xd enter. The minimum term uses the exact fp32 group sums xs; as the nibbles are
   0..15 (mean ~7.5), the error of the int8 activations' group sums would enter 7.5x: xs[M*ng + ...] holds
   that error (sum x - xd * sum xq) per group, and 7.5 * scale * error puts it back. */
#define I4_BLOCK(M, R)                                                                                   \
static void i4_##M##_##R(const int8_t* xq, const float* xd, const float* xs, int64_t I, int64_t G,       \
                         const uint8_t* q, const float* sc, const float* mn, float* y, int64_t O, int64_t o) { \
  const int64_t ng = I / G;                                                                              \
  const __m128i low = _mm_set1_epi8(0x0F);                                                               \
  const __m256i ones = _mm256_set1_epi16(1);                                                             \
  __m256 acc[R][M];                                                                                      \
  for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();               \
  for (int64_t g = 0; g < ng; ++g) {                                                                     \
    __m256i d[R][M];                                                                                     \
    for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) d[r][m] = _mm256_setzero_si256();            \
    for (int64_t i = g * G; i < (g + 1) * G; i += 32) {                                                  \
      __m256i xv[M];                                                                                     \
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_si256((const __m256i*)(xq + m * I + i));          \
      for (int r = 0; r < R; ++r) {                                                                      \
        __m128i b = _mm_loadu_si128((const __m128i*)(q + (o + r) * (I / 2) + i / 2));                    \
        __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));   \
        for (int m = 0; m < M; ++m)                                                                      \
          d[r][m] = _mm256_add_epi32(d[r][m], _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv[m]), ones));  \
      }                                                                                                  \
    }                                                                                                    \
    for (int r = 0; r < R; ++r) {                                                                        \
      const float s = sc[(o + r) * ng + g];                                                              \
      for (int m = 0; m < M; ++m)                                                                        \
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r][m]), _mm256_set1_ps(s * xd[m * ng + g]), acc[r][m]); \
    }                                                                                                    \
  }                                                                                                      \
  for (int r = 0; r < R; ++r) {                                                                          \
    const float *mr = mn + (o + r) * ng, *sr = sc + (o + r) * ng;                                        \
    for (int m = 0; m < M; ++m) {                                                                        \
      float tot = hsum(acc[r][m]);                                                                       \
      for (int64_t g = 0; g < ng; ++g) tot += mr[g] * xs[m * ng + g] + 7.5f * sr[g] * xs[(M + m) * ng + g]; \
      y[m * O + o + r] = tot;                                                                            \
    }                                                                                                    \
  }                                                                                                      \
}

I8_BLOCK(1, 4) I8_BLOCK(2, 4) I8_BLOCK(3, 2) I8_BLOCK(4, 2) I8_BLOCK(5, 1) I8_BLOCK(6, 1) I8_BLOCK(7, 1)
I8_BLOCK(8, 1) I8_BLOCK(1, 1) I8_BLOCK(2, 1) I8_BLOCK(3, 1) I8_BLOCK(4, 1)
I4_BLOCK(1, 4) I4_BLOCK(2, 4) I4_BLOCK(3, 2) I4_BLOCK(4, 2) I4_BLOCK(5, 1) I4_BLOCK(6, 1) I4_BLOCK(7, 1)
I4_BLOCK(8, 1) I4_BLOCK(1, 1) I4_BLOCK(2, 1) I4_BLOCK(3, 1) I4_BLOCK(4, 1)

#define RUN(KIND, M, R, ...)                                                                             \
  {                                                                                                      \
    int64_t blocks = O / R;                                                                              \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                    \
    for (int64_t b = 0; b < blocks; ++b) KIND##_##M##_##R(__VA_ARGS__, b * R);                           \
    for (int64_t o = blocks * R; o < O; ++o) KIND##_##M##_1(__VA_ARGS__, o);                             \
  }

#define SWITCH(KIND, ...)                                                                                \
  switch (M) {                                                                                           \
    case 1: RUN(KIND, 1, 4, __VA_ARGS__) break;                                                          \
    case 2: RUN(KIND, 2, 4, __VA_ARGS__) break;                                                          \
    case 3: RUN(KIND, 3, 2, __VA_ARGS__) break;                                                          \
    case 4: RUN(KIND, 4, 2, __VA_ARGS__) break;                                                          \
    case 5: RUN(KIND, 5, 1, __VA_ARGS__) break;                                                          \
    case 6: RUN(KIND, 6, 1, __VA_ARGS__) break;                                                          \
    case 7: RUN(KIND, 7, 1, __VA_ARGS__) break;                                                          \
    default: RUN(KIND, 8, 1, __VA_ARGS__) break;                                                         \
  }

/* x [M,I] fp32 (M <= 8), q [O,I] int8, s [O] -> y [M,O] */
void sf_int8_linear(const float* x, int64_t M, int64_t I, const int8_t* q, const float* s, float* y, int64_t O,
                    int threads) {
  SWITCH(i8, x, I, q, s, y, O)
}

/* x [M,I] fp32 (M <= 8), q [O,I/2] uint8, sc/mn [O,I/G] -> y [M,O] */
void sf_int4_linear(const float* x, int64_t M, int64_t I, int64_t G, const uint8_t* q, const float* sc,
                    const float* mn, float* y, int64_t O, int threads) {
  const int64_t ng = I / G;
  int8_t* xq = (int8_t*)malloc(M * I);  /* activations as int8 per group, their scales xd, their sums */
  float fbuf[3 * 8 * 512];
  float* f = 3 * M * ng <= 3 * 8 * 512 ? fbuf : (float*)malloc(3 * sizeof(float) * M * ng);
  float *xd = f, *sums = f + M * ng;  /* sums: [M,ng] group sums of x, then [M,ng] their int8 errors */
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const float* xg = x + m * I + g * G;
      float t = 0.f, amax = 0.f;
      for (int64_t i = 0; i < G; ++i) {
        t += xg[i];
        amax = fmaxf(amax, fabsf(xg[i]));
      }
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t qs = 0;
      for (int64_t i = 0; i < G; ++i) {
        const int8_t v = (int8_t)lrintf(xg[i] * inv);
        xq[m * I + g * G + i] = v;
        qs += v;
      }
      xd[m * ng + g] = d;
      sums[m * ng + g] = t;
      sums[(M + m) * ng + g] = t - d * (float)qs;
    }
  SWITCH(i4, xq, xd, sums, I, G, q, sc, mn, y, O)
  if (f != fbuf) free(f);
  free(xq);
}
"""

# Most rows a kernel call takes; more rows are processed in chunks of this many.
KERNEL_ROWS = 8

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _cache_dir() -> Path:
    root = os.environ.get("SEEKFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seekformer")
    return Path(root) / "kernels"


def _build():
    """Compile _SOURCE into a shared library (once per source version) and bind its two functions."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None
    tag = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    out = _cache_dir() / f"seekformer_quant_{tag}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            c_file, so_tmp = Path(tmp) / "k.c", Path(tmp) / "k.so"
            c_file.write_text(_SOURCE)
            r = subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", str(c_file),
                                "-o", str(so_tmp), "-lm"], capture_output=True, timeout=300)
            if r.returncode != 0:
                return None
            os.replace(so_tmp, out)  # atomic: a concurrent builder finds a whole library or none
    lib = ctypes.CDLL(str(out))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sf_int8_linear.argtypes = [p, i64, i64, p, p, p, i64, i32]
    lib.sf_int4_linear.argtypes = [p, i64, i64, i64, p, p, p, p, i64, i32]
    lib.sf_int8_linear.restype = lib.sf_int4_linear.restype = None
    return lib


def kernels():
    """The compiled library, or None where it cannot be built (set SEEKFORMER_QUANT_KERNEL=0 to disable)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            lib = None
            if os.environ.get("SEEKFORMER_QUANT_KERNEL", "1") != "0" and _cpu_ok():
                try:
                    lib = _build()
                except (OSError, subprocess.SubprocessError):
                    lib = None  # the torch fallback is correct, only slower
            _state["lib"] = lib
        return _state["lib"]


def int8_linear(lib, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M,I] fp32 contiguous (M <= KERNEL_ROWS, I % 8 == 0), q [O,I] int8, scales [O] -> [M,O]."""
    m, i = x.shape
    o = q.shape[0]
    y = torch.empty(m, o, dtype=torch.float32)
    lib.sf_int8_linear(x.data_ptr(), m, i, q.data_ptr(), scales.data_ptr(), y.data_ptr(), o, torch.get_num_threads())
    return y


def int4_linear(lib, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """x [M,I] fp32 contiguous (M <= KERNEL_ROWS), q [O,I/2] uint8, scales/mins [O,I/G] (G % 32 == 0) -> [M,O]."""
    m, i = x.shape
    o, ng = scales.shape
    y = torch.empty(m, o, dtype=torch.float32)
    lib.sf_int4_linear(x.data_ptr(), m, i, i // ng, q.data_ptr(), scales.data_ptr(), mins.data_ptr(), y.data_ptr(),
                       o, torch.get_num_threads())
    return y
