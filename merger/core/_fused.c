/* merger.core._fused: a per-key op's linear maths (merger.ops.base.LinearForm) in one pass over
 * raw float16 / bfloat16 / float32 inputs into a float16 / bfloat16 / float32 output, block by block
 * in the CPU's cache, where numpy would convert each input to a float32 array, make a temporary per
 * step and convert the result back (merger.core.fused says when it is used).
 *
 * Bit for bit what numpy computes for the op's `combine`: each input widened exactly to float32;
 * every product, sum and quotient rounded to float32 in numpy's order, with no fused multiply-add
 * (compiled with -ffp-contract=off, and no FMA target); float16 results rounded to nearest even
 * (F16C, as merger.core._floatconv), bfloat16 ones to nearest even with NaN as 0x7FC0 (as
 * merger.core.arrays.f32_to_bf16). Only for CPUs with AVX2 and F16C: elsewhere `linear` returns
 * False and the caller computes with numpy. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_FUSED 1
#endif

#define MAX_INPUTS 64
#define BLOCK 1024 /* elements: each input's block and the accumulator stay in L1 */

enum { CODE_F32, CODE_F16, CODE_BF16 };

static int code_of(char c) {
    switch (c) {
    case 'f': return CODE_F32;
    case 'h': return CODE_F16;
    case 'b': return CODE_BF16;
    default: return -1;
    }
}

static Py_ssize_t size_of(int code) { return code == CODE_F32 ? 4 : 2; }

#ifdef HAVE_FUSED
#define FUSED __attribute__((target("avx2,f16c"), optimize("fp-contract=off")))

static int supported(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return known;
}

FUSED static void load(const char *src, int code, Py_ssize_t n, float *dst) {
    Py_ssize_t i = 0;
    if (code == CODE_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t *half = (const uint16_t *)src;
    if (code == CODE_F16) {
        for (; i + 8 <= n; i += 8) {
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + i))));
        }
        for (; i < n; i++) {
            dst[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(half[i])));
        }
        return;
    }
    uint32_t *bits = (uint32_t *)dst; /* bfloat16: the high half of a float32 */
    for (; i < n; i++) {
        bits[i] = (uint32_t)half[i] << 16;
    }
}

FUSED static void store(const float *src, int code, Py_ssize_t n, char *dst) {
    Py_ssize_t i = 0;
    if (code == CODE_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t *half = (uint16_t *)dst;
    if (code == CODE_F16) {
        for (; i + 8 <= n; i += 8) {
            _mm_storeu_si128((__m128i *)(half + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        }
        for (; i < n; i++) {
            half[i] = (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_set_ss(src[i]), _MM_FROUND_TO_NEAREST_INT));
        }
        return;
    }
    const uint32_t *bits = (const uint32_t *)src;
    for (; i < n; i++) {
        const uint32_t b = bits[i];
        const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        half[i] = (uint16_t)(((b & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : rounded);
    }
}

/* out = x0 * w0; out += xi * wi; out /= divisor (when has_divisor) */
FUSED static void weighted_sum(float *acc, float *x, const float *w, int count, float divisor, int has_divisor,
                               const char **src, const int *codes, Py_ssize_t at, Py_ssize_t n) {
    load(src[0] + at * size_of(codes[0]), codes[0], n, acc);
    const float w0 = w[0];
    for (Py_ssize_t j = 0; j < n; j++) {
        acc[j] = acc[j] * w0;
    }
    for (int k = 1; k < count; k++) {
        load(src[k] + at * size_of(codes[k]), codes[k], n, x);
        const float wk = w[k];
        for (Py_ssize_t j = 0; j < n; j++) {
            const float product = x[j] * wk;
            acc[j] = acc[j] + product;
        }
    }
    if (has_divisor) {
        for (Py_ssize_t j = 0; j < n; j++) {
            acc[j] = acc[j] / divisor;
        }
    }
}

/* out = x1 - x2; out *= w0; out += x0 */
FUSED static void add_difference(float *acc, float *x, float w0, const char **src, const int *codes, Py_ssize_t at,
                                 Py_ssize_t n) {
    load(src[1] + at * size_of(codes[1]), codes[1], n, acc);
    load(src[2] + at * size_of(codes[2]), codes[2], n, x);
    for (Py_ssize_t j = 0; j < n; j++) {
        const float difference = acc[j] - x[j];
        acc[j] = difference * w0;
    }
    load(src[0] + at * size_of(codes[0]), codes[0], n, x);
    for (Py_ssize_t j = 0; j < n; j++) {
        acc[j] = acc[j] + x[j];
    }
}

/* How many of a block's n raw values are NaN or infinite (every exponent bit set), as
 * merger.core.nonfinite counts them: the block is in the cache, read for the maths anyway. */
FUSED static Py_ssize_t nonfinite_block(const char *src, int code, Py_ssize_t n) {
    uint32_t found = 0;
    if (code == CODE_F32) {
        const uint32_t *bits = (const uint32_t *)src;
        for (Py_ssize_t i = 0; i < n; i++) {
            found += (bits[i] & 0x7F800000u) == 0x7F800000u;
        }
        return found;
    }
    const uint16_t *half = (const uint16_t *)src;
    const uint16_t mask = code == CODE_F16 ? 0x7C00u : 0x7F80u;
    for (Py_ssize_t i = 0; i < n; i++) {
        found += (uint16_t)((half[i] & mask) == mask);
    }
    return found;
}
#endif

/* linear(inputs, codes, kind, weights, divisor, out, out_code[, counts]) -> bool
 * inputs: a sequence of buffers, each `count` elements of its code ("f": float32, "h": float16,
 * "b": bfloat16; `codes` is one letter an input); kind 0: a weighted sum, 1: add difference (three
 * inputs, one weight); divisor: None or a number; out: a writable buffer of `count` elements of
 * out_code; counts: None or a writable buffer of one int64 an input, to which each input's count of NaN
 * and infinite values is added. False, with nothing written, where the CPU lacks AVX2 or F16C. */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    PyObject *inputs, *weights, *divisor_object, *counts_object = Py_None;
    const char *codes_text, *out_text;
    Py_ssize_t codes_length, out_length;
    int kind;
    Py_buffer out, counts = {0};
    if (!PyArg_ParseTuple(args, "Os#iOOw*s#|O", &inputs, &codes_text, &codes_length, &kind, &weights, &divisor_object,
                          &out, &out_text, &out_length, &counts_object)) {
        return NULL;
    }
    const int counting = counts_object != Py_None;
    if (counting && PyObject_GetBuffer(counts_object, &counts, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_buffer views[MAX_INPUTS];
    const char *src[MAX_INPUTS];
    int codes[MAX_INPUTS];
    float w[MAX_INPUTS];
    int opened = 0, ok = 0, ran = 0;
    PyObject *sequence = PySequence_Fast(inputs, "inputs must be a sequence of buffers");
    if (sequence == NULL) {
        PyBuffer_Release(&out);
        if (counting) {
            PyBuffer_Release(&counts);
        }
        return NULL;
    }
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    const int out_code = out_length == 1 ? code_of(out_text[0]) : -1;
    if (count < 1 || count > MAX_INPUTS || codes_length != count || out_code < 0 || (kind != 0 && kind != 1) ||
        (kind == 1 && count != 3)) {
        PyErr_SetString(PyExc_ValueError, "linear: bad inputs, codes, kind or output code");
        goto finally;
    }
    if (counting && counts.len != count * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "linear: counts holds one int64 an input");
        goto finally;
    }
    const Py_ssize_t elements = out.len / size_of(out_code);
    if (elements * size_of(out_code) != out.len) {
        PyErr_SetString(PyExc_ValueError, "linear: the output's size is not a whole number of elements");
        goto finally;
    }
    const Py_ssize_t weight_count = PySequence_Size(weights);
    if (weight_count != (kind == 0 ? count : 1)) {
        PyErr_SetString(PyExc_ValueError, "linear: one weight an input (a weighted sum), or one (add difference)");
        goto finally;
    }
    for (Py_ssize_t k = 0; k < weight_count; k++) {
        PyObject *item = PySequence_GetItem(weights, k);
        if (item == NULL) {
            goto finally;
        }
        w[k] = (float)PyFloat_AsDouble(item); /* a Python float rounded to float32, as numpy does */
        Py_DECREF(item);
        if (PyErr_Occurred()) {
            goto finally;
        }
    }
    const int has_divisor = divisor_object != Py_None;
    const float divisor = has_divisor ? (float)PyFloat_AsDouble(divisor_object) : 0.0f;
    if (PyErr_Occurred()) {
        goto finally;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        codes[k] = code_of(codes_text[k]);
        if (codes[k] < 0) {
            PyErr_SetString(PyExc_ValueError, "linear: input codes are f, h or b");
            goto finally;
        }
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, k), &views[k], PyBUF_SIMPLE) < 0) {
            goto finally;
        }
        opened++;
        if (views[k].len != elements * size_of(codes[k])) {
            PyErr_SetString(PyExc_ValueError, "linear: an input does not hold as many elements as the output");
            goto finally;
        }
        src[k] = (const char *)views[k].buf;
    }
    ok = 1;
#ifdef HAVE_FUSED
    if (supported()) {
        ran = 1;
        char *dst = (char *)out.buf;
        Py_BEGIN_ALLOW_THREADS;
        float acc[BLOCK], x[BLOCK];
        for (Py_ssize_t at = 0; at < elements; at += BLOCK) {
            const Py_ssize_t n = elements - at < BLOCK ? elements - at : BLOCK;
            if (kind == 0) {
                weighted_sum(acc, x, w, (int)count, divisor, has_divisor, src, codes, at, n);
            } else {
                add_difference(acc, x, w[0], src, codes, at, n);
            }
            if (counting) {
                for (Py_ssize_t k = 0; k < count; k++) {
                    ((int64_t *)counts.buf)[k] += nonfinite_block(src[k] + at * size_of(codes[k]), codes[k], n);
                }
            }
            store(acc, out_code, n, dst + at * size_of(out_code));
        }
        Py_END_ALLOW_THREADS;
    }
#endif
finally:
    for (int k = 0; k < opened; k++) {
        PyBuffer_Release(&views[k]);
    }
    PyBuffer_Release(&out);
    if (counting) {
        PyBuffer_Release(&counts);
    }
    Py_DECREF(sequence);
    if (!ok) {
        return NULL;
    }
    return PyBool_FromLong(ran);
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS,
     "linear(inputs, codes, kind, weights, divisor, out, out_code[, counts]) -> bool: a weighted sum (kind 0) or "
     "an add difference (kind 1) of float16/bfloat16/float32 inputs in one pass (counting each input's non-finite "
     "values into counts); False where the CPU cannot"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
