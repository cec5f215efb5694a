/* TIES's loops over stored chunks, for merger.core.magnitudes (functions of merger.core._floatconv, whose
 * shared parts are in _floatconv.h): the histograms of the deltas' magnitudes that find each model's cut, and
 * the sign election that merges a block, in three tiers (AVX-512, AVX2, portable C) that give the same bits. */
#include "_floatconv.h"

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
 * int64, added to. src and minus are stored as their codes; `tier`: the loops used (see floatconv_best_tier), the same
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

PyObject *floatconv_magnitude_hist16(PyObject *self, PyObject *args) {
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
    const int best = floatconv_best_tier();
    Py_BEGIN_ALLOW_THREADS
    magnitude_hist16_loop(src.buf, src_code, minus.buf, minus_code, n, (int64_t *)counts.buf, high, fine.buf,
                          (uint32_t)window, (uint32_t)rows, tier < best ? tier : best);
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
 * `tier`: the widest loops to use (the CPU's best if lower, see floatconv_best_tier), the same bits whichever. */
PyObject *floatconv_elect(PyObject *self, PyObject *args) {
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
    const int best = floatconv_best_tier();
    Py_BEGIN_ALLOW_THREADS
    elect_loop(base.buf, base_code, out.buf, n, models, count, consensus, normalize, scale, scratch,
               tier < best ? tier : best);
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

