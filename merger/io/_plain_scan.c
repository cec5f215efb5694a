/* merger.io._plain_scan: the usual safetensors header's entries read in one compiled pass, for a
 * model of many tensors (a 200,000-tensor header is 15 MB of JSON).
 *
 * `tiled(raw, start, stop, max_entries, spec_of)` reads raw[start:stop] as merger.io.safetensors_plain
 * reads the entries of a header in the form writers write (its `_PLAIN_ENTRY` rows, one after the
 * other, with a comma between two) and gives what its `tiled_rows` gives for them: ({key: spec},
 * {key: (begin, end)}, end of the data), when the entries are in data order and tile the data. It
 * gives None for anything else (another form, a key given twice, a key `__metadata__`, a key that is
 * not UTF-8, a row `spec_of` does not take, more than `max_entries` rows, a hole, an overlap, a wrong
 * size), and the caller then reads the header in Python, where the strict reading decides: so this
 * pass only ever says yes where the Python reading says the same yes. `spec_of(dtype, shape)` is
 * safetensors_plain.plain_spec: (spec, bytes, refused) or None, asked once per distinct
 * (dtype, shape) text.
 *
 * The grammar (`_PLAIN_ENTRY`): "KEY":{"dtype":"DTYPE","shape":[DIMS],"data_offsets":[INT,INT]}
 * where KEY is any bytes but '"', '\\' and controls below 0x20, DTYPE is 1-16 of [A-Z0-9_], DIMS is
 * empty or INT(,INT)*, and INT is 0 or [1-9] and at most 17 more digits (so two equal numbers are
 * the same digits, and every one fits in 63 bits). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const char *p;
    const char *end;
} Cursor;

static int literal(Cursor *c, const char *text, size_t n) {
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, text, n) != 0) return 0;
    c->p += n;
    return 1;
}

#define LITERAL(c, text) literal((c), (text), sizeof(text) - 1)

/* INT: 0 | [1-9][0-9]{0,17}; 1 and the value, or 0 */
static int integer(Cursor *c, uint64_t *value) {
    if (c->p >= c->end) return 0;
    char first = *c->p;
    if (first == '0') {
        c->p++;
        *value = 0;
        return 1;
    }
    if (first < '1' || first > '9') return 0;
    uint64_t v = 0;
    int digits = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        if (++digits > 18) return 0;
        v = v * 10 + (uint64_t)(*c->p - '0');
        c->p++;
    }
    *value = v;
    return 1;
}

/* the text of DIMS, up to its ']' (not taken) */
static int dims(Cursor *c) {
    uint64_t ignored;
    if (c->p < c->end && *c->p == ']') return 1;
    if (!integer(c, &ignored)) return 0;
    while (c->p < c->end && *c->p == ',') {
        c->p++;
        if (!integer(c, &ignored)) return 0;
    }
    return 1;
}

/* the (spec, bytes, refused) of a (dtype, shape) text, from `known` or asked of `spec_of`: a new
 * reference, Py_None where the plain reading does not take it, NULL on an error */
static PyObject *spec_for(PyObject *known, PyObject *spec_of, const char *dtype, Py_ssize_t dtype_len,
                          const char *shape, Py_ssize_t shape_len) {
    char buffer[256];
    Py_ssize_t n = dtype_len + 1 + shape_len;
    PyObject *key;
    if (n <= (Py_ssize_t)sizeof(buffer)) {
        memcpy(buffer, dtype, (size_t)dtype_len);
        buffer[dtype_len] = '\0';
        memcpy(buffer + dtype_len + 1, shape, (size_t)shape_len);
        key = PyBytes_FromStringAndSize(buffer, n);
    } else {
        key = PyBytes_FromStringAndSize(NULL, n);
        if (key != NULL) {
            char *to = PyBytes_AS_STRING(key);
            memcpy(to, dtype, (size_t)dtype_len);
            to[dtype_len] = '\0';
            memcpy(to + dtype_len + 1, shape, (size_t)shape_len);
        }
    }
    if (key == NULL) return NULL;
    PyObject *found = PyDict_GetItemWithError(known, key);
    if (found != NULL) {
        Py_DECREF(key);
        Py_INCREF(found);
        return found;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    /* both texts are ASCII by the grammar */
    PyObject *answer = PyObject_CallFunction(spec_of, "s#s#", dtype, dtype_len, shape, shape_len);
    if (answer == NULL || PyDict_SetItem(known, key, answer) < 0) {
        Py_DECREF(key);
        Py_XDECREF(answer);
        return NULL;
    }
    Py_DECREF(key);
    return answer;
}

static PyObject *py_tiled(PyObject *self, PyObject *args) {
    Py_buffer raw;
    Py_ssize_t start, stop, max_entries;
    PyObject *spec_of;
    if (!PyArg_ParseTuple(args, "y*nnnO:tiled", &raw, &start, &stop, &max_entries, &spec_of)) return NULL;
    PyObject *tensors = NULL, *offsets = NULL, *known = NULL, *result = NULL;
    PyObject *end_int = NULL; /* `end` as an int object, shared by the ranges that meet there */
    PyObject *empty_key = NULL; /* the last key, while it is empty and ends at `end` (borrowed from tensors) */
    const char *empty_text = NULL;
    Py_ssize_t empty_len = 0;
    if (start < 0 || stop > raw.len || start >= stop) goto plain_no;
    tensors = PyDict_New();
    offsets = PyDict_New();
    known = PyDict_New();
    if (tensors == NULL || offsets == NULL || known == NULL) goto error;
    Cursor c = {(const char *)raw.buf + start, (const char *)raw.buf + stop};
    uint64_t end = 0;
    Py_ssize_t count = 0;
    for (;;) {
        /* "KEY": */
        if (!LITERAL(&c, "\"")) goto plain_no;
        const char *key_text = c.p;
        while (c.p < c.end && *c.p != '"') {
            unsigned char b = (unsigned char)*c.p;
            if (b == '\\' || b < 0x20) goto plain_no;
            c.p++;
        }
        Py_ssize_t key_len = c.p - key_text;
        if (!LITERAL(&c, "\":{\"dtype\":\"")) goto plain_no;
        const char *dtype = c.p;
        while (c.p < c.end && ((*c.p >= 'A' && *c.p <= 'Z') || (*c.p >= '0' && *c.p <= '9') || *c.p == '_')) c.p++;
        Py_ssize_t dtype_len = c.p - dtype;
        if (dtype_len < 1 || dtype_len > 16) goto plain_no;
        if (!LITERAL(&c, "\",\"shape\":[")) goto plain_no;
        const char *shape = c.p;
        if (!dims(&c)) goto plain_no;
        Py_ssize_t shape_len = c.p - shape;
        uint64_t begin, finish;
        if (!LITERAL(&c, "],\"data_offsets\":[") || !integer(&c, &begin) || !LITERAL(&c, ",") ||
            !integer(&c, &finish) || !LITERAL(&c, "]}"))
            goto plain_no;
        if (++count > max_entries) goto plain_no;
        if (key_len == 12 && memcmp(key_text, "__metadata__", 12) == 0) goto plain_no;

        PyObject *found = spec_for(known, spec_of, dtype, dtype_len, shape, shape_len);
        if (found == NULL) goto error;
        if (found == Py_None || !PyTuple_CheckExact(found) || PyTuple_GET_SIZE(found) != 3 || begin != end) {
            Py_DECREF(found);
            goto plain_no;
        }
        PyObject *spec = PyTuple_GET_ITEM(found, 0);
        const int refused = PyObject_IsTrue(PyTuple_GET_ITEM(found, 2));
        if (refused != 0) { /* a refused size may not fit in 64 bits: the Python reading says why */
            Py_DECREF(found);
            if (refused < 0) goto error;
            goto plain_no;
        }
        const unsigned long long nbytes = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(found, 1));
        if (nbytes == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(found);
            goto error;
        }
        if (nbytes) {
            /* end < 10**18 and plain_spec refuses a size of 2**61 or more: the sum fits (checked all the same,
             * for another spec_of) */
            if (nbytes > UINT64_MAX - end || finish != end + nbytes) {
                Py_DECREF(found);
                goto plain_no;
            }
        } else {
            if (finish != end) {
                Py_DECREF(found);
                goto plain_no;
            }
            /* empty tensors at one offset come in key order (code points: UTF-8 bytes sort alike) */
            if (empty_key != NULL) {
                Py_ssize_t common = key_len < empty_len ? key_len : empty_len;
                int order = memcmp(key_text, empty_text, (size_t)common);
                if (order < 0 || (order == 0 && key_len < empty_len)) {
                    Py_DECREF(found);
                    goto plain_no;
                }
            }
        }
        PyObject *key = PyUnicode_DecodeUTF8(key_text, key_len, NULL);
        if (key == NULL) {
            Py_DECREF(found);
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) goto error;
            PyErr_Clear();
            goto plain_no;
        }
        int seen = PyDict_Contains(tensors, key);
        if (seen != 0) { /* a key twice: the Python reading decides */
            Py_DECREF(key);
            Py_DECREF(found);
            if (seen < 0) goto error;
            goto plain_no;
        }
        /* a range begins where the previous one ends: one int object for both */
        if (end_int == NULL && (end_int = PyLong_FromUnsignedLongLong((unsigned long long)end)) == NULL) {
            Py_DECREF(key);
            Py_DECREF(found);
            goto error;
        }
        PyObject *finish_int = nbytes ? PyLong_FromUnsignedLongLong((unsigned long long)finish) : end_int;
        if (!nbytes) Py_INCREF(finish_int);
        PyObject *range = finish_int == NULL ? NULL : PyTuple_Pack(2, end_int, finish_int);
        int failed = range == NULL || PyDict_SetItem(tensors, key, spec) < 0 || PyDict_SetItem(offsets, key, range) < 0;
        Py_XDECREF(range);
        Py_DECREF(found);
        Py_DECREF(end_int);
        end_int = finish_int; /* the next range's begin (NULL when it could not be made: failed) */
        if (failed) {
            Py_DECREF(key);
            goto error;
        }
        if (nbytes) {
            end = finish;
            empty_key = NULL;
        } else {
            empty_key = key; /* kept alive by tensors */
            empty_text = key_text;
            empty_len = key_len;
        }
        Py_DECREF(key);
        if (c.p == c.end) break;
        if (!LITERAL(&c, ",") || c.p == c.end) goto plain_no;
    }
    result = Py_BuildValue("(OOK)", tensors, offsets, (unsigned long long)end);
    goto done;
plain_no:
    result = Py_None;
    Py_INCREF(result);
    goto done;
error:
    result = NULL;
done:
    Py_XDECREF(end_int);
    Py_XDECREF(tensors);
    Py_XDECREF(offsets);
    Py_XDECREF(known);
    PyBuffer_Release(&raw);
    return result;
}

static PyMethodDef methods[] = {
    {"tiled", py_tiled, METH_VARARGS,
     "tiled(raw, start, stop, max_entries, spec_of) -> (tensors, offsets, end) | None: the usual header's entries "
     "in raw[start:stop], read as merger.io.safetensors_plain reads them, when they tile the data in order"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_plain_scan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__plain_scan(void) { return PyModule_Create(&module); }
