/* Conversions between 16-bit floats and float32, over whole buffers, without the GIL.
 *
 * numpy converts float16 at 0.2-0.4 G elements/s on CPUs without AVX512-FP16 (its
 * vector path needs it), which made float16 merges several times slower than their
 * reads and writes. These loops use F16C (every x86-64 CPU since 2013) when the CPU
 * has it, chosen at run time, and portable bit arithmetic otherwise; both round to
 * nearest even as numpy does (overflow to infinity, subnormals kept) and give numpy's
 * bits for every value but signalling NaNs, which they quiet as F16C does. bfloat16 is the
 * top half of a float32: widening is a shift, narrowing rounds to nearest even and
 * keeps NaN a NaN (0x7FC0), as torch does.
 *
 * Each function takes (source buffer, destination buffer[, portable]): the
 * destination's size must match the source's element count exactly.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_DISPATCH 1
#include <immintrin.h>
#endif

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

#define INLINE static inline __attribute__((always_inline))

static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float16 bits -> float32 bits, exactly (the method of M. Dukhan's FP16 library):
 * normal and infinite/NaN values take the exponent rebias, subnormals an exact float subtraction. */
static uint32_t half_to_float_bits(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    if (two_w < (1u << 27)) { /* zero or subnormal: 0.5 + m * 2^-24 - 0.5, exact */
        return sign | bits_of(float_of((two_w >> 17) | (126u << 23)) - 0.5f);
    }
    /* exponent + 224 then * 2^-112: a net rebias of 112, and 31 lands on 255 (inf/NaN) */
    return sign | bits_of(float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
}

/* float32 -> float16 bits, rounded to nearest even by the float unit itself. */
static uint16_t float_to_half_bits(float f) {
    const uint32_t w = bits_of(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    if (shl1_w > 0xFF000000u) { /* NaN: quiet, payload's top bits kept */
        return (uint16_t)((sign >> 16) | 0x7E00u | ((w >> 13) & 0x3FFu));
    }
    float base = (float_of(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f; /* overflow -> inf */
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) {
        bias = 0x71000000u;
    }
    base = float_of((bias >> 1) + 0x07800000u) + base; /* the add rounds at float16's last place */
    const uint32_t bits = bits_of(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | nonsign);
}

static void f16_to_f32_portable(const uint16_t *src, float *dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u = half_to_float_bits(src[i]);
        memcpy(dst + i, &u, 4);
    }
}

static void f32_to_f16_portable(const float *src, uint16_t *dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        dst[i] = float_to_half_bits(src[i]);
    }
}

#ifdef HAVE_X86_DISPATCH
__attribute__((target("avx2,f16c"))) static void f16_to_f32_f16c(const uint16_t *src, float *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    f16_to_f32_portable(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void f32_to_f16_f16c(const float *src, uint16_t *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_loadu_ps(src + i);
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    f32_to_f16_portable(src + i, dst + i, n - i);
}

static int has_f16c(void) /* and AVX2 */ {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return known;
}

/* TIES's loops come in three tiers: 2 AVX-512 (512-bit vectors: half the instructions of AVX2's, 10 % less
 * of a TIES merge's time here), 1 AVX2 with F16C, 0 portable C; `best_tier` is the widest the CPU runs */
#if defined(__clang__)
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,f16c"
#else
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,f16c,prefer-vector-width=512"
#endif
static int best_tier(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
        known = has_f16c() ? 1 + avx512 : 0;
    }
    return known;
}

__attribute__((target(AVX512_TARGET))) static void f16_to_f32_avx512(const uint16_t *src, float *dst, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
    }
    f16_to_f32_f16c(src + i, dst + i, n - i);
}
#endif

/* The bfloat16 loops are plain C that compilers vectorise; defined twice, for AVX2 and for any CPU. */
#define BF16_LOOPS(suffix, attribute)                                                                          \
    attribute static void bf16_to_f32_##suffix(const uint16_t *src, uint32_t *dst, Py_ssize_t n) {             \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                 \
            dst[i] = (uint32_t)src[i] << 16;                                                                 \
        }                                                                                                    \
    }                                                                                                        \
    attribute static void f32_to_bf16_##suffix(const uint32_t *src, uint16_t *dst, Py_ssize_t n) {             \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                 \
            const uint32_t b = src[i];                                                                       \
            const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;                                 \
            dst[i] = (uint16_t)(((b & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : rounded);                      \
        }                                                                                                    \
    }

BF16_LOOPS(portable, )
#ifdef HAVE_X86_DISPATCH
BF16_LOOPS(avx2, __attribute__((target("avx2"))))
#endif

/* The stored dtypes TIES's loops read (merger.core.magnitudes.STORED_CODES): float32 as it is, float16 and
 * bfloat16 widened a block at a time into a float32 buffer that stays in the CPU's cache, so that a pass
 * reads the stored bytes once instead of a float32 copy made of them first (twice their bytes). */
enum { STORED_F32, STORED_F16, STORED_BF16 };
typedef void (*WidenHalf)(const uint16_t *, float *, Py_ssize_t);

static Py_ssize_t stored_size(int code) { return code == STORED_F32 ? 4 : 2; }

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

/* Parses (src, dst[, portable]) and checks dst holds exactly as many elements of out_size bytes. */
static int parse(PyObject *args, Py_buffer *src, Py_buffer *dst, int *portable, Py_ssize_t in_size,
                 Py_ssize_t out_size, Py_ssize_t *count) {
    *portable = 0;
    if (!PyArg_ParseTuple(args, "y*w*|p", src, dst, portable)) {
        return 0;
    }
    if (src->len % in_size != 0 || dst->len % out_size != 0 || src->len / in_size != dst->len / out_size) {
        PyErr_Format(PyExc_ValueError, "buffer sizes do not match: %zd bytes of %zd-byte elements into %zd bytes of %zd",
                     src->len, in_size, dst->len, out_size);
        PyBuffer_Release(src);
        PyBuffer_Release(dst);
        return 0;
    }
    *count = src->len / in_size;
    return 1;
}

static PyObject *done(Py_buffer *src, Py_buffer *dst) {
    PyBuffer_Release(src);
    PyBuffer_Release(dst);
    Py_RETURN_NONE;
}

/* A Python function `name(src, dst, portable=False)` over one loop: the SIMD one where the CPU has
 * it (and `portable` is false), else the portable one; the GIL is released while it runs. */
#define CONVERTER(name, in_size, out_size, in_type, out_type, simd_loop, portable_loop)                        \
    static PyObject *py_##name(PyObject *self, PyObject *args) {                                             \
        Py_buffer src, dst;                                                                                  \
        int portable;                                                                                        \
        Py_ssize_t n;                                                                                        \
        if (!parse(args, &src, &dst, &portable, in_size, out_size, &n)) {                                    \
            return NULL;                                                                                     \
        }                                                                                                    \
        Py_BEGIN_ALLOW_THREADS if (!portable && has_f16c()) {                                                \
            simd_loop((const in_type *)src.buf, (out_type *)dst.buf, n);                                     \
        }                                                                                                    \
        else {                                                                                               \
            portable_loop((const in_type *)src.buf, (out_type *)dst.buf, n);                                 \
        }                                                                                                    \
        Py_END_ALLOW_THREADS return done(&src, &dst);                                                        \
    }

#ifndef HAVE_X86_DISPATCH /* no SIMD loops here: the portable ones stand in, never chosen */
static int has_f16c(void) { return 0; }
static int best_tier(void) { return 0; }
#define f16_to_f32_f16c f16_to_f32_portable
#define f32_to_f16_f16c f32_to_f16_portable
#define bf16_to_f32_avx2 bf16_to_f32_portable
#define f32_to_bf16_avx2 f32_to_bf16_portable
#endif

CONVERTER(f16_to_f32, 2, 4, uint16_t, float, f16_to_f32_f16c, f16_to_f32_portable)
CONVERTER(f32_to_f16, 4, 2, float, uint16_t, f32_to_f16_f16c, f32_to_f16_portable)
CONVERTER(bf16_to_f32, 2, 4, uint16_t, uint32_t, bf16_to_f32_avx2, bf16_to_f32_portable)
CONVERTER(f32_to_bf16, 4, 2, uint32_t, uint16_t, f32_to_bf16_avx2, f32_to_bf16_portable)

/* How many 16-bit values have every bit of `mask` set (the exponent of float16 or bfloat16: NaN or inf),
 * summed in blocks whose count fits the lanes' width (so the loop vectorises without widening). */
#define COUNT16_BLOCK ((Py_ssize_t)65535)
#define COUNT32_BLOCK ((Py_ssize_t)1 << 30)
#define COUNT_LOOP(suffix, attribute)                                                                          \
    attribute static Py_ssize_t count_masked_##suffix(const uint16_t *src, Py_ssize_t n, uint16_t mask) {      \
        Py_ssize_t found = 0;                                                                                \
        for (Py_ssize_t start = 0; start < n; start += COUNT16_BLOCK) {                                      \
            const Py_ssize_t stop = n - start < COUNT16_BLOCK ? n : start + COUNT16_BLOCK;                   \
            uint16_t block = 0; /* a 16-bit sum the compiler keeps in 16-bit lanes: exact, <= 65535 */       \
            for (Py_ssize_t i = start; i < stop; i++) {                                                      \
                block += (uint16_t)((src[i] & mask) == mask);                                                \
            }                                                                                                \
            found += block;                                                                                  \
        }                                                                                                    \
        return found;                                                                                        \
    }

COUNT_LOOP(portable, )
#ifdef HAVE_X86_DISPATCH
COUNT_LOOP(avx2, __attribute__((target("avx2"))))
#endif

static PyObject *py_count_masked16(PyObject *self, PyObject *args) {
    Py_buffer src;
    unsigned short mask;
    Py_ssize_t found;
    if (!PyArg_ParseTuple(args, "y*H", &src, &mask)) {
        return NULL;
    }
    if (src.len % 2 != 0) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "an odd number of bytes is not 16-bit values");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_DISPATCH
    if (has_f16c()) {
        found = count_masked_avx2((const uint16_t *)src.buf, src.len / 2, mask);
    } else
#endif
    {
        found = count_masked_portable((const uint16_t *)src.buf, src.len / 2, mask);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    return PyLong_FromSsize_t(found);
}

/* How many 32-bit values have every bit of `mask` set (float32's exponent: NaN or inf). */
#define COUNT32_LOOP(suffix, attribute)                                                                        \
    attribute static Py_ssize_t count_masked32_##suffix(const uint32_t *src, Py_ssize_t n, uint32_t mask) {    \
        Py_ssize_t found = 0;                                                                                \
        for (Py_ssize_t start = 0; start < n; start += COUNT32_BLOCK) {                                      \
            const Py_ssize_t stop = n - start < COUNT32_BLOCK ? n : start + COUNT32_BLOCK;                   \
            uint32_t block = 0; /* in 32-bit lanes, not widened to 64 bits an element */                     \
            for (Py_ssize_t i = start; i < stop; i++) {                                                      \
                block += (uint32_t)((src[i] & mask) == mask);                                                \
            }                                                                                                \
            found += block;                                                                                  \
        }                                                                                                    \
        return found;                                                                                        \
    }

COUNT32_LOOP(portable, )
#ifdef HAVE_X86_DISPATCH
COUNT32_LOOP(avx2, __attribute__((target("avx2"))))
#endif

static PyObject *py_count_masked32(PyObject *self, PyObject *args) {
    Py_buffer src;
    unsigned int mask;
    Py_ssize_t found;
    if (!PyArg_ParseTuple(args, "y*I", &src, &mask)) {
        return NULL;
    }
    if (src.len % 4 != 0) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "a byte count not a multiple of 4 is not 32-bit values");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_DISPATCH
    if (has_f16c()) {
        found = count_masked32_avx2((const uint32_t *)src.buf, src.len / 4, mask);
    } else
#endif
    {
        found = count_masked32_portable((const uint32_t *)src.buf, src.len / 4, mask);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    return PyLong_FromSsize_t(found);
}

/* Histograms of float32 magnitudes' bit patterns (|x| orders as its bits, as uint32), for an exact top-k
 * threshold (merger.ops.topk): counts[bits >> 16] += 1 for every element, or, given a high half `high` >= 0,
 * counts[bits & 0xFFFF] += 1 for the elements whose high half is `high`. With `minus`, of x = src - minus
 * (float32 subtraction, as numpy's). With `fine` (high < 0 only), also the low halves of the elements whose
 * high half h is in [window, window + W), W = len(fine) / 65536: fine[(h - window) * 65536 + low] += 1, so
 * that a second pass is not needed when the cut falls there. Counts are int64, added to. */
#define HIST_BLOCK 1024

/* |src - minus|'s (|src|'s) bit patterns of one block, in a loop compilers vectorise */
INLINE void hist_bits(const float *src, const float *minus, Py_ssize_t n, uint32_t *bits) {
    if (minus != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            bits[i] = bits_of(src[i] - minus[i]) & 0x7FFFFFFFu;
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            bits[i] = bits_of(src[i]) & 0x7FFFFFFFu;
        }
    }
}

/* The elements of the block whose high half is in [window, window + width) (a few): counted at their fine
 * index. Flags first, in a loop compilers vectorise, then read eight at a time (most words are 0). */
INLINE void hist_fine(const uint32_t *bits, Py_ssize_t n, int64_t *fine, uint32_t window, uint32_t width) {
    uint8_t inside[HIST_BLOCK];
    const uint32_t first = window << 16, span = width << 16;
    for (Py_ssize_t i = 0; i < n; i++) {
        inside[i] = bits[i] - first < span; /* unsigned: below the window wraps around */
    }
    Py_ssize_t i = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, inside + i, 8);
        while (word != 0) {
            const int at = __builtin_ctzll(word) >> 3; /* the byte's place in memory */
            fine[bits[i + at] - first]++;
            word &= word - 1;
        }
    }
#endif
    for (; i < n; i++) {
        if (inside[i]) {
            fine[bits[i] - first]++;
        }
    }
}

INLINE void hist_loop(const void *src, int src_code, const void *minus, int minus_code, Py_ssize_t n,
                      int64_t *counts, long high, int64_t *fine, uint32_t window, uint32_t width, WidenHalf half) {
    uint32_t bits[HIST_BLOCK];
    float src_buf[HIST_BLOCK], minus_buf[HIST_BLOCK];
    const uint32_t want = (uint32_t)high;
    for (Py_ssize_t start = 0; start < n; start += HIST_BLOCK) {
        const Py_ssize_t size = n - start < HIST_BLOCK ? n - start : HIST_BLOCK;
        const float *values = widened(src, src_code, start, size, src_buf, half);
        hist_bits(values, minus != NULL ? widened(minus, minus_code, start, size, minus_buf, half) : NULL, size, bits);
        if (high >= 0) { /* a later pass: the few elements of the prefix's bin */
            for (Py_ssize_t i = 0; i < size; i++) {
                if ((bits[i] >> 16) == want) {
                    counts[bits[i] & 0xFFFFu]++;
                }
            }
            continue;
        }
        if (high == -2) { /* the window's only: counts[0] += those below it, counts[1] += those above */
            const uint32_t end = window + width;
            uint32_t below = 0, above = 0;
            for (Py_ssize_t i = 0; i < size; i++) {
                below += (bits[i] >> 16) < window;
                above += (bits[i] >> 16) >= end;
            }
            counts[0] += below;
            counts[1] += above;
        } else {
            for (Py_ssize_t i = 0; i < size; i++) { /* one histogram: four interleaved ones (so that runs of */
                counts[bits[i] >> 16]++;             /* one bin do not wait on each other) measured slower here */
            }
        }
        if (fine != NULL) {
            hist_fine(bits, size, fine, window, width);
        }
    }
}

#define HIST_LOOP(suffix, attribute)                                                                           \
    attribute static void hist_loop_##suffix(const void *src, int src_code, const void *minus, int minus_code,     \
                                             Py_ssize_t n, int64_t *counts, long high, int64_t *fine,            \
                                             uint32_t window, uint32_t width, WidenHalf half) {                  \
        hist_loop(src, src_code, minus, minus_code, n, counts, high, fine, window, width, half);                \
    }

HIST_LOOP(portable, )
#ifdef HAVE_X86_DISPATCH
HIST_LOOP(avx2, __attribute__((target("avx2"))))
HIST_LOOP(avx512, __attribute__((target(AVX512_TARGET))))
#endif

/* Histograms of float32 magnitudes' bit patterns (|x| orders as its bits, as uint32), for an exact top-k
 * threshold (merger.ops.topk): counts[bits >> 16] += 1 for every element (high -1), or, given a high half
 * `high` >= 0, counts[bits & 0xFFFF] += 1 for the elements whose high half is `high`. With `minus`, of
 * x = src - minus (float32 subtraction, as numpy's). With `fine` (high < 0 only), also the low halves of the
 * elements whose high half h is in [window, window + W), W = len(fine) / 65536: fine[(h - window) * 65536 +
 * low] += 1, so that a second pass is not needed when the cut falls there; high -2 counts the window only
 * (the elements below it in counts[0], those above in counts[1]: no scattered count per element). Counts are
 * int64, added to. src and minus are stored as their codes; `tier`: the loops used (see best_tier), the same
 * counts whichever. */
static void magnitude_hist16_loop(const void *src, int src_code, const void *minus, int minus_code, Py_ssize_t n,
                                  int64_t *counts, long high, int64_t *fine, uint32_t window, uint32_t width,
                                  int tier) {
#ifdef HAVE_X86_DISPATCH
    if (tier >= 2) {
        hist_loop_avx512(src, src_code, minus, minus_code, n, counts, high, fine, window, width, f16_to_f32_avx512);
        return;
    }
    if (tier >= 1) {
        hist_loop_avx2(src, src_code, minus, minus_code, n, counts, high, fine, window, width, f16_to_f32_f16c);
        return;
    }
#endif
    hist_loop_portable(src, src_code, minus, minus_code, n, counts, high, fine, window, width, f16_to_f32_portable);
}

static int optional_buffer(PyObject *object, Py_buffer *view, int writable) {
    if (object == Py_None) {
        return 0;
    }
    return PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0));
}

static PyObject *py_magnitude_hist16(PyObject *self, PyObject *args) {
    Py_buffer src, counts, minus = {0}, fine = {0};
    PyObject *minus_object = Py_None, *fine_object = Py_None, *result = NULL;
    long high, window = 0;
    int src_code = STORED_F32, minus_code = STORED_F32, tier = 2;
    if (!PyArg_ParseTuple(args, "y*w*l|OOliii", &src, &counts, &high, &minus_object, &fine_object, &window, &src_code,
                          &minus_code, &tier)) {
        return NULL;
    }
    if (optional_buffer(minus_object, &minus, 0) < 0 || optional_buffer(fine_object, &fine, 1) < 0) {
        goto finish;
    }
    const Py_ssize_t rows = fine.len / (65536 * 8);
    const int codes_known = src_code >= STORED_F32 && src_code <= STORED_BF16 && minus_code >= STORED_F32 &&
                            minus_code <= STORED_BF16;
    const Py_ssize_t n = codes_known ? src.len / stored_size(src_code) : 0;
    if (!codes_known || src.len % stored_size(src_code) != 0 || counts.len != 65536 * 8 || high > 0xFFFF ||
        high < -2 || (high == -2 && !fine.obj) ||
        (minus.obj && minus.len != n * stored_size(minus_code)) ||
        window < 0 || (fine.obj && (high >= 0 || fine.len % (65536 * 8) != 0 || window + (long)rows > 65536))) {
        PyErr_SetString(PyExc_ValueError, "magnitude_hist16 takes values stored as float32, float16 or bfloat16"
                                          " (codes 0-2), 65536 int64 counts, -2 <= high < 65536 (-2 with fine),"
                                          " minus of src's length, fine of 65536 int64 rows within the bins");
        goto finish;
    }
    Py_BEGIN_ALLOW_THREADS
    magnitude_hist16_loop(src.buf, src_code, minus.buf, minus_code, n, (int64_t *)counts.buf, high, fine.buf,
                          (uint32_t)window, (uint32_t)rows, tier < best_tier() ? tier : best_tier());
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
finish:
    PyBuffer_Release(&src);
    PyBuffer_Release(&counts);
    if (minus.obj != NULL) {
        PyBuffer_Release(&minus);
    }
    if (fine.obj != NULL) {
        PyBuffer_Release(&fine);
    }
    return result;
}

/* TIES-style sign election over task vectors, one pass, float32 (merger.ops.task_vectors: the same
 * float32 operations in the same order as its array form, so the same bits). Per element, for model k:
 *     d = model_k - base; sparsified by kind: 0 as is, 1 where mask_k (else +0), 2 d * 0,
 *         3 where |d|'s bits exceed cut_k, or equal it while ties_k remain (taken in order);
 *     d = d / divide_k (if not 0); d = d * multiply_k (if not 0); d = d * weight_k
 *     vote = sum_k d (consensus 1) or sum_k sign(d) (2); positive = vote >= 0
 *     agree_k = positive ? d > 0 : d < 0; mixed = base * 0 + sum of agreeing d; divisor = base * 0 + sum of
 *     agreeing weight_k, 1 where 0; normalize: mixed / divisor; scale (if not 1): mixed * scale
 *     out = base + mixed                                                                            */
#define ELECT_MAX 32
#define ELECT_BLOCK 1024
typedef struct {
    int kind;
    const float *model; /* the block's, as float32 */
    const uint8_t *mask;
    uint32_t cut;
    Py_ssize_t ties;
    float divide, multiply, weight;
    const void *stored; /* the whole model, stored as `code` */
    int code;
    const uint8_t *masks; /* the whole mask */
} ElectModel;

/* x where `keep` (0 or 1), else +0, without a branch (random masks mispredict a branch half the time) */
INLINE float kept_or_zero(float x, uint32_t keep) { return float_of(bits_of(x) & (0u - keep)); }

/* a where `pick` (0 or 1), else b, by their bits: compilers would keep a branch around a float operation that
 * only one side uses (it might trap), which stops the loop from vectorising */
INLINE float chosen(uint32_t pick, float a, float b) {
    const uint32_t mask = 0u - pick;
    return float_of((bits_of(a) & mask) | (bits_of(b) & ~mask));
}

/* numpy's sign: -1, 0 or 1, NaN for NaN */
INLINE float sign_of(float x) {
    const float sign = (float)((x > 0.0f) - (x < 0.0f));
    return chosen(x != x, x, sign);
}

/* Model k's sparsified, scaled deltas of one block into x (n <= ELECT_BLOCK): two loops over the block that
 * compilers vectorise (and, for a CUT, a scalar look for the ties to keep while some remain). */
INLINE void elect_deltas(const float *base, Py_ssize_t n, ElectModel *m, float *x) {
    uint32_t keep[ELECT_BLOCK];
    const float *model = m->model;
    const uint32_t cut = m->cut;
    if (m->kind == 3 && m->ties > 0) { /* the first ones equal to the cut are kept too, in order */
        uint32_t equal[ELECT_BLOCK], found = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            x[i] = model[i] - base[i];
            const uint32_t magnitude = bits_of(x[i]) & 0x7FFFFFFFu;
            keep[i] = magnitude > cut;
            equal[i] = magnitude == cut;
            found += equal[i];
        }
        if (found <= m->ties) { /* all of the block's (f16 models' deltas have many equal magnitudes): a loop */
            for (Py_ssize_t i = 0; i < n; i++) { /* that vectorises, not a scalar look at every element */
                keep[i] |= equal[i];
            }
            m->ties -= found;
        } else {
            for (Py_ssize_t i = 0; i < n && m->ties > 0; i++) {
                if (equal[i]) {
                    keep[i] = 1;
                    m->ties--;
                }
            }
        }
    } else if (m->kind == 3) {
        for (Py_ssize_t i = 0; i < n; i++) {
            x[i] = model[i] - base[i];
            keep[i] = (bits_of(x[i]) & 0x7FFFFFFFu) > cut;
        }
    } else if (m->kind == 1) {
        for (Py_ssize_t i = 0; i < n; i++) {
            x[i] = model[i] - base[i];
            keep[i] = m->mask[i] != 0;
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            x[i] = model[i] - base[i];
            keep[i] = 1;
        }
    }
    const int zeroed = m->kind == 2;
    const float divide = m->divide, multiply = m->multiply, weight = m->weight;
    for (Py_ssize_t i = 0; i < n; i++) {
        float value = kept_or_zero(x[i], keep[i]);
        if (zeroed) {
            value = value * 0.0f;
        }
        if (divide != 0.0f) {
            value = value / divide;
        }
        if (multiply != 0.0f) {
            value = value * multiply;
        }
        x[i] = value * weight;
    }
}

/* elect_block's votes and sums for two models (the usual TIES), in one loop over the block: the same
 * operations in the same order, each made and the one wanted chosen (no branch: the loop vectorises). */
INLINE void elect_two(const float *restrict base, float *restrict out, Py_ssize_t n, const ElectModel *models,
                      int consensus, int normalize, float scale, const float *restrict d) {
    const float *restrict x = d, *restrict y = d + ELECT_BLOCK;
    const float wx = models[0].weight, wy = models[1].weight;
    const uint32_t by_sum = consensus == 1, normalized = normalize != 0, scaled = scale != 1.0f;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float a = x[i], b = y[i];
        const float vote = chosen(by_sum, (a + 0.0f) + b, sign_of(a) + sign_of(b));
        const uint32_t positive = vote >= 0.0f;
        const uint32_t agree_a = (positive & (a > 0.0f)) | ((positive ^ 1u) & (a < 0.0f));
        const uint32_t agree_b = (positive & (b > 0.0f)) | ((positive ^ 1u) & (b < 0.0f));
        const float zero = base[i] * 0.0f;
        const float mixed = (zero + kept_or_zero(a, agree_a)) + kept_or_zero(b, agree_b);
        const float divisor = (zero + kept_or_zero(wx, agree_a)) + kept_or_zero(wy, agree_b);
        const float value = chosen(normalized, mixed / (divisor + (float)(divisor == 0.0f)), mixed); /* 1: none agrees */
        out[i] = base[i] + chosen(scaled, value * scale, value);
    }
}

/* One block of at most ELECT_BLOCK elements, in loops over the block that compilers vectorise;
 * `d` holds count * ELECT_BLOCK floats of scratch. Compiled twice: for any CPU, and for AVX2 (without
 * FMA, so that every operation rounds as numpy's). */
INLINE void elect_block(const float *base, float *out, Py_ssize_t n, ElectModel *models, int count, int consensus,
                        int normalize, float scale, float *d) {
    float vote[ELECT_BLOCK], mixed[ELECT_BLOCK], divisor[ELECT_BLOCK];
    for (int k = 0; k < count; k++) {
        elect_deltas(base, n, &models[k], d + (Py_ssize_t)k * ELECT_BLOCK);
    }
    if (count == 2) {
        elect_two(base, out, n, models, consensus, normalize, scale, d);
        return;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        vote[i] = consensus == 1 ? d[i] + 0.0f : sign_of(d[i]);
    }
    for (int k = 1; k < count; k++) {
        const float *x = d + (Py_ssize_t)k * ELECT_BLOCK;
        for (Py_ssize_t i = 0; i < n; i++) {
            vote[i] += consensus == 1 ? x[i] : sign_of(x[i]);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        mixed[i] = base[i] * 0.0f;
        divisor[i] = base[i] * 0.0f;
    }
    for (int k = 0; k < count; k++) {
        const float *x = d + (Py_ssize_t)k * ELECT_BLOCK;
        const float weight = models[k].weight;
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint32_t positive = vote[i] >= 0.0f;
            const uint32_t agree = (positive & (x[i] > 0.0f)) | ((positive ^ 1u) & (x[i] < 0.0f));
            mixed[i] += kept_or_zero(x[i], agree);
            divisor[i] += kept_or_zero(weight, agree);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        float value = mixed[i];
        if (normalize) {
            value = value / (divisor[i] + (float)(divisor[i] == 0.0f)); /* 1 where none agrees */
        }
        if (scale != 1.0f) {
            value = value * scale;
        }
        out[i] = base[i] + value;
    }
}

#define ELECT_LOOP(suffix, attribute)                                                                          \
    attribute static void elect_block_##suffix(const float *base, float *out, Py_ssize_t n, ElectModel *models,   \
                                               int count, int consensus, int normalize, float scale, float *d) {  \
        elect_block(base, out, n, models, count, consensus, normalize, scale, d);                              \
    }

ELECT_LOOP(portable, )
#ifdef HAVE_X86_DISPATCH
ELECT_LOOP(avx2, __attribute__((target("avx2"))))
ELECT_LOOP(avx512, __attribute__((target(AVX512_TARGET))))
#endif

/* `scratch`: (2 * count + 1) * ELECT_BLOCK floats: the deltas, then the widened blocks of the models and base */
static void elect_loop(const void *base, int base_code, float *out, Py_ssize_t n, ElectModel *models, int count,
                       int consensus, int normalize, float scale, float *scratch, int tier) {
    WidenHalf half = f16_to_f32_portable;
#ifdef HAVE_X86_DISPATCH
    if (tier >= 2) {
        half = f16_to_f32_avx512;
    } else if (tier >= 1) {
        half = f16_to_f32_f16c;
    }
#endif
    float *wide = scratch + (Py_ssize_t)count * ELECT_BLOCK;
    for (Py_ssize_t start = 0; start < n; start += ELECT_BLOCK) {
        const Py_ssize_t size = n - start < ELECT_BLOCK ? n - start : ELECT_BLOCK;
        for (int k = 0; k < count; k++) {
            models[k].model = widened(models[k].stored, models[k].code, start, size, wide + k * ELECT_BLOCK, half);
            models[k].mask = models[k].masks != NULL ? models[k].masks + start : NULL;
        }
        const float *block = widened(base, base_code, start, size, wide + (Py_ssize_t)count * ELECT_BLOCK, half);
#ifdef HAVE_X86_DISPATCH
        if (tier >= 2) {
            elect_block_avx512(block, out + start, size, models, count, consensus, normalize, scale, scratch);
        } else if (tier >= 1) {
            elect_block_avx2(block, out + start, size, models, count, consensus, normalize, scale, scratch);
        } else
#endif
        {
            elect_block_portable(block, out + start, size, models, count, consensus, normalize, scale, scratch);
        }
    }
}

/* elect(base, out, models, consensus, normalize, scale, base_code=0, tier=2) -> [ties left per model]; models:
 * a sequence of (model, kind, mask or None, cut, ties, divide, multiply, weight[, code]); out float32, base
 * and each model of its length stored as their codes (0 float32, 1 float16, 2 bfloat16), masks of bytes;
 * `tier`: the widest loops to use (the CPU's best if lower, see best_tier), the same bits whichever. */
static PyObject *py_elect(PyObject *self, PyObject *args) {
    Py_buffer base, out, views[2 * ELECT_MAX];
    PyObject *sequence, *result = NULL;
    int consensus, normalize, count, held = 0, base_code = STORED_F32, tier = 2;
    float scale;
    ElectModel models[ELECT_MAX];
    if (!PyArg_ParseTuple(args, "y*w*Oipf|ii", &base, &out, &sequence, &consensus, &normalize, &scale, &base_code,
                          &tier)) {
        return NULL;
    }
    const Py_ssize_t n = out.len / 4;
    PyObject *items = PySequence_Fast(sequence, "elect takes a sequence of models");
    if (items == NULL) {
        goto finish;
    }
    count = (int)PySequence_Fast_GET_SIZE(items);
    if (count < 1 || count > ELECT_MAX || out.len % 4 != 0 || base_code < STORED_F32 || base_code > STORED_BF16 ||
        base.len != n * stored_size(base_code)) {
        PyErr_SetString(PyExc_ValueError, "elect takes 1 to 32 models, a float32 out and a base of its length");
        goto finish;
    }
    for (int k = 0; k < count; k++) {
        PyObject *model_object, *mask_object;
        unsigned long cut;
        ElectModel *m = &models[k];
        m->code = STORED_F32;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, k), "OiOknfff|i", &model_object, &m->kind, &mask_object,
                              &cut, &m->ties, &m->divide, &m->multiply, &m->weight, &m->code)) {
            goto finish;
        }
        m->cut = (uint32_t)cut;
        if (m->code < STORED_F32 || m->code > STORED_BF16) {
            PyErr_SetString(PyExc_ValueError, "elect: a model's code is not 0, 1 or 2");
            goto finish;
        }
        if (PyObject_GetBuffer(model_object, &views[held], PyBUF_C_CONTIGUOUS) < 0) {
            goto finish;
        }
        m->stored = views[held++].buf;
        if (views[held - 1].len != n * stored_size(m->code)) {
            PyErr_SetString(PyExc_ValueError, "elect: a model's length is not out's");
            goto finish;
        }
        m->masks = NULL;
        if (m->kind == 1) {
            if (PyObject_GetBuffer(mask_object, &views[held], PyBUF_C_CONTIGUOUS) < 0) {
                goto finish;
            }
            m->masks = views[held++].buf;
            if (views[held - 1].len != n) {
                PyErr_SetString(PyExc_ValueError, "elect: a mask's length is not out's");
                goto finish;
            }
        }
    }
    float *scratch = PyMem_RawMalloc((size_t)(2 * count + 1) * ELECT_BLOCK * sizeof(float));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto finish;
    }
    Py_BEGIN_ALLOW_THREADS
    elect_loop(base.buf, base_code, out.buf, n, models, count, consensus, normalize, scale, scratch,
               tier < best_tier() ? tier : best_tier());
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scratch);
    result = PyList_New(count);
    for (int k = 0; result != NULL && k < count; k++) {
        PyList_SET_ITEM(result, k, PyLong_FromSsize_t(models[k].ties));
    }
finish:
    Py_XDECREF(items);
    for (int j = 0; j < held; j++) {
        PyBuffer_Release(&views[j]);
    }
    PyBuffer_Release(&base);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_simd(PyObject *self, PyObject *unused) { return PyLong_FromLong(best_tier()); }

static PyMethodDef methods[] = {
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(src, dst, portable=False): float16 bytes into float32"},
    {"f32_to_f16", py_f32_to_f16, METH_VARARGS, "f32_to_f16(src, dst, portable=False): float32 into float16, RNE"},
    {"bf16_to_f32", py_bf16_to_f32, METH_VARARGS, "bf16_to_f32(src, dst): bfloat16 bytes into float32"},
    {"f32_to_bf16", py_f32_to_bf16, METH_VARARGS, "f32_to_bf16(src, dst): float32 into bfloat16, RNE"},
    {"count_masked16", py_count_masked16, METH_VARARGS, "count_masked16(src, mask): 16-bit values with all mask bits set"},
    {"count_masked32", py_count_masked32, METH_VARARGS, "count_masked32(src, mask): 32-bit values with all mask bits set"},
    {"magnitude_hist16", py_magnitude_hist16, METH_VARARGS,
     "magnitude_hist16(src, counts, high, minus=None, fine=None, window=0, src_code=0, minus_code=0, tier=2):"
     " histogram of |src - minus|'s float32 bits"},
    {"elect", py_elect, METH_VARARGS,
     "elect(base, out, models, consensus, normalize, scale, base_code=0, tier=2): TIES sign election"},
    {"simd", py_simd, METH_NOARGS, "simd(): the widest loops the CPU runs: 2 AVX-512, 1 AVX2 and F16C, 0 portable"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_floatconv", NULL, -1, methods};

PyMODINIT_FUNC PyInit__floatconv(void) { return PyModule_Create(&module); }
