/* What merger's compiled float loops share (one module, merger.core._floatconv, of two files: _floatconv.c,
 * the conversions and counts of non-finite values; _ties.c, TIES's histograms and sign election): bit casts,
 * float16 widening, the codes of the stored dtypes TIES reads, and the tiers of its loops. */
#ifndef MERGER_FLOATCONV_H
#define MERGER_FLOATCONV_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_DISPATCH 1
#include <immintrin.h>
#endif

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

#define INLINE static inline __attribute__((always_inline))

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float16 bits -> float32 bits, exactly (the method of M. Dukhan's FP16 library):
 * normal and infinite/NaN values take the exponent rebias, subnormals an exact float subtraction. */
static inline uint32_t half_to_float_bits(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    if (two_w < (1u << 27)) { /* zero or subnormal: 0.5 + m * 2^-24 - 0.5, exact */
        return sign | bits_of(float_of((two_w >> 17) | (126u << 23)) - 0.5f);
    }
    /* exponent + 224 then * 2^-112: a net rebias of 112, and 31 lands on 255 (inf/NaN) */
    return sign | bits_of(float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
}

static inline void f16_to_f32_portable(const uint16_t *src, float *dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u = half_to_float_bits(src[i]);
        memcpy(dst + i, &u, 4);
    }
}

#ifdef HAVE_X86_DISPATCH
__attribute__((target("avx2,f16c"))) static inline void f16_to_f32_f16c(const uint16_t *src, float *dst,
                                                                         Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    f16_to_f32_portable(src + i, dst + i, n - i);
}

/* TIES's loops come in three tiers: 2 AVX-512 (512-bit vectors: half the instructions of AVX2's, a few % less
 * of a TIES merge's time here), 1 AVX2 with F16C, 0 portable C; floatconv_best_tier is the widest the CPU runs */
#if defined(__clang__)
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,f16c"
#else
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,f16c,prefer-vector-width=512"
#endif
__attribute__((target(AVX512_TARGET))) static inline void f16_to_f32_avx512(const uint16_t *src, float *dst,
                                                                          Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
    }
    f16_to_f32_f16c(src + i, dst + i, n - i);
}
#endif


/* The widest tier of TIES's loops the CPU runs: 2 AVX-512, 1 AVX2 with F16C, 0 portable (_floatconv.c) */
int floatconv_best_tier(void);

/* The stored dtypes TIES's loops read (merger.core.magnitudes.STORED_CODES): float32 as it is, float16 and
 * bfloat16 widened a block at a time into a float32 buffer that stays in the CPU's cache, so that a pass
 * reads the stored bytes once instead of a float32 copy made of them first (twice their bytes). */
enum { STORED_F32, STORED_F16, STORED_BF16 };
typedef void (*WidenHalf)(const uint16_t *, float *, Py_ssize_t);

static inline Py_ssize_t stored_size(int code) { return code == STORED_F32 ? 4 : 2; }

/* Elements [start, start + n) of `src` (stored as `code`) as float32: in place, or widened into `buf` */
INLINE const float *widened(const void *src, int code, Py_ssize_t start, Py_ssize_t n, float *buf, WidenHalf half) {
    if (code == STORED_F32) {
        return (const float *)src + start;
    }
    const uint16_t *bits = (const uint16_t *)src + start;
    if (code == STORED_F16) {
        half(bits, buf, n);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint32_t wide = (uint32_t)bits[i] << 16;
            memcpy(buf + i, &wide, 4);
        }
    }
    return buf;
}


/* TIES's histogram and sign election, the module's magnitude_hist16 and elect (_ties.c) */
PyObject *floatconv_magnitude_hist16(PyObject *self, PyObject *args);
PyObject *floatconv_elect(PyObject *self, PyObject *args);

#endif
