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
 * destination's size must match the source's element count exactly. TIES's loops, in the same
 * module, are in _ties.c; what both use is in _floatconv.h.
 */
#include "_floatconv.h"

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

static void f32_to_f16_portable(const float *src, uint16_t *dst, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        dst[i] = float_to_half_bits(src[i]);
    }
}

#ifdef HAVE_X86_DISPATCH
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


int floatconv_best_tier(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
        known = has_f16c() ? 1 + avx512 : 0;
    }
    return known;
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
int floatconv_best_tier(void) { return 0; }
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

static PyObject *py_simd(PyObject *self, PyObject *unused) { return PyLong_FromLong(floatconv_best_tier()); }

static PyMethodDef methods[] = {
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(src, dst, portable=False): float16 bytes into float32"},
    {"f32_to_f16", py_f32_to_f16, METH_VARARGS, "f32_to_f16(src, dst, portable=False): float32 into float16, RNE"},
    {"bf16_to_f32", py_bf16_to_f32, METH_VARARGS, "bf16_to_f32(src, dst): bfloat16 bytes into float32"},
    {"f32_to_bf16", py_f32_to_bf16, METH_VARARGS, "f32_to_bf16(src, dst): float32 into bfloat16, RNE"},
    {"count_masked16", py_count_masked16, METH_VARARGS, "count_masked16(src, mask): 16-bit values with all mask bits set"},
    {"count_masked32", py_count_masked32, METH_VARARGS, "count_masked32(src, mask): 32-bit values with all mask bits set"},
    {"magnitude_hist16", floatconv_magnitude_hist16, METH_VARARGS,
     "magnitude_hist16(src, counts, high, minus=None, fine=None, window=0, src_code=0, minus_code=0, tier=2):"
     " histogram of |src - minus|'s float32 bits"},
    {"elect", floatconv_elect, METH_VARARGS,
     "elect(base, out, models, consensus, normalize, scale, base_code=0, tier=2): TIES sign election"},
    {"simd", py_simd, METH_NOARGS, "simd(): the widest loops the CPU runs: 2 AVX-512, 1 AVX2 and F16C, 0 portable"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_floatconv", NULL, -1, methods};

PyMODINIT_FUNC PyInit__floatconv(void) { return PyModule_Create(&module); }
