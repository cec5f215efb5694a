/* Conversions between 16-bit floats and float32, over whole buffers, without the GIL.
 *
 * numpy converts float16 at 0.2-0.4 G elements/s on CPUs without AVX512-FP16 (its
 * vector path needs it), which made float16 merges several times slower than their
 * reads and writes. These loops use F16C (every x86-64 CPU since 2013) when the CPU
 * has it, chosen at run time, and portable bit arithmetic otherwise; both round to
 * nearest even as numpy does (overflow to infinity, subnormals kept). bfloat16 is the
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

static PyObject *py_f16_to_f32(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int portable;
    Py_ssize_t n;
    if (!parse(args, &src, &dst, &portable, 2, 4, &n)) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_DISPATCH
    if (!portable && has_f16c()) {
        f16_to_f32_f16c((const uint16_t *)src.buf, (float *)dst.buf, n);
    } else
#endif
    {
        f16_to_f32_portable((const uint16_t *)src.buf, (float *)dst.buf, n);
    }
    Py_END_ALLOW_THREADS
    return done(&src, &dst);
}

static PyObject *py_f32_to_f16(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int portable;
    Py_ssize_t n;
    if (!parse(args, &src, &dst, &portable, 4, 2, &n)) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_DISPATCH
    if (!portable && has_f16c()) {
        f32_to_f16_f16c((const float *)src.buf, (uint16_t *)dst.buf, n);
    } else
#endif
    {
        f32_to_f16_portable((const float *)src.buf, (uint16_t *)dst.buf, n);
    }
    Py_END_ALLOW_THREADS
    return done(&src, &dst);
}

static PyObject *py_bf16_to_f32(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int portable;
    Py_ssize_t n;
    if (!parse(args, &src, &dst, &portable, 2, 4, &n)) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_DISPATCH
    if (!portable && has_f16c()) {
        bf16_to_f32_avx2((const uint16_t *)src.buf, (uint32_t *)dst.buf, n);
    } else
#endif
    {
        bf16_to_f32_portable((const uint16_t *)src.buf, (uint32_t *)dst.buf, n);
    }
    Py_END_ALLOW_THREADS
    return done(&src, &dst);
}

static PyObject *py_f32_to_bf16(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int portable;
    Py_ssize_t n;
    if (!parse(args, &src, &dst, &portable, 4, 2, &n)) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_DISPATCH
    if (!portable && has_f16c()) {
        f32_to_bf16_avx2((const uint32_t *)src.buf, (uint16_t *)dst.buf, n);
    } else
#endif
    {
        f32_to_bf16_portable((const uint32_t *)src.buf, (uint16_t *)dst.buf, n);
    }
    Py_END_ALLOW_THREADS
    return done(&src, &dst);
}

/* How many 16-bit values have every bit of `mask` set (the exponent of float16 or bfloat16: NaN or inf). */
#define COUNT_LOOP(suffix, attribute)                                                                          \
    attribute static Py_ssize_t count_masked_##suffix(const uint16_t *src, Py_ssize_t n, uint16_t mask) {      \
        Py_ssize_t found = 0;                                                                                \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                 \
            found += (src[i] & mask) == mask;                                                                \
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
        for (Py_ssize_t i = 0; i < n; i++) {                                                                 \
            found += (src[i] & mask) == mask;                                                                \
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
 * threshold in two passes (merger.ops.topk): counts[(bits >> 16)] += 1 for every element, or, given a high
 * half `high` >= 0, counts[bits & 0xFFFF] += 1 for the elements whose high half is `high`. `counts` holds
 * 65536 int64 and is added to. */
static void magnitude_hist16_loop(const uint32_t *src, Py_ssize_t n, int64_t *counts, long high) {
    if (high < 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            counts[(src[i] & 0x7FFFFFFFu) >> 16]++;
        }
        return;
    }
    const uint32_t want = (uint32_t)high;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint32_t bits = src[i] & 0x7FFFFFFFu;
        if ((bits >> 16) == want) {
            counts[bits & 0xFFFFu]++;
        }
    }
}

static PyObject *py_magnitude_hist16(PyObject *self, PyObject *args) {
    Py_buffer src, counts;
    long high;
    if (!PyArg_ParseTuple(args, "y*w*l", &src, &counts, &high)) {
        return NULL;
    }
    if (src.len % 4 != 0 || counts.len != 65536 * 8 || high > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "magnitude_hist16 takes float32 values, 65536 int64 counts, high < 65536");
        PyBuffer_Release(&src);
        PyBuffer_Release(&counts);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    magnitude_hist16_loop((const uint32_t *)src.buf, src.len / 4, (int64_t *)counts.buf, high);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

static PyObject *py_simd(PyObject *self, PyObject *unused) {
#ifdef HAVE_X86_DISPATCH
    return PyBool_FromLong(has_f16c());
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(src, dst, portable=False): float16 bytes into float32"},
    {"f32_to_f16", py_f32_to_f16, METH_VARARGS, "f32_to_f16(src, dst, portable=False): float32 into float16, RNE"},
    {"bf16_to_f32", py_bf16_to_f32, METH_VARARGS, "bf16_to_f32(src, dst): bfloat16 bytes into float32"},
    {"f32_to_bf16", py_f32_to_bf16, METH_VARARGS, "f32_to_bf16(src, dst): float32 into bfloat16, RNE"},
    {"count_masked16", py_count_masked16, METH_VARARGS, "count_masked16(src, mask): 16-bit values with all mask bits set"},
    {"count_masked32", py_count_masked32, METH_VARARGS, "count_masked32(src, mask): 32-bit values with all mask bits set"},
    {"magnitude_hist16", py_magnitude_hist16, METH_VARARGS,
     "magnitude_hist16(src, counts, high): histogram of float32 |x| bits, high or (high >= 0) low halves"},
    {"simd", py_simd, METH_NOARGS, "simd(): whether the float16 loops use the CPU's F16C instructions"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_floatconv", NULL, -1, methods};

PyMODINIT_FUNC PyInit__floatconv(void) { return PyModule_Create(&module); }
