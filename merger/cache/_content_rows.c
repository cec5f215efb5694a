/* The rows of a model's content hash, written in one compiled loop (merger.cache.hashing).
 *
 * rows(keys, spec, digests, middle, escape) -> bytes: for each key of `keys` (in that order),
 * '[' + the key as a JSON string + middle(spec[key]) + digests[key] as a JSON string + ']', the
 * rows joined by ','. `middle` gives a spec's part of its row (',"F32",[1],') and is called once
 * per distinct spec object (a model's equal specs are mostly one object). A string is copied as
 * it is when it is printable ASCII with no '"' or '\\'; any other is written by `escape` (json's
 * encode_basestring_ascii), so the text is exactly what the Python writer gives. A missing key
 * raises KeyError, a value of another type TypeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    char *data;
    Py_ssize_t size;
    Py_ssize_t used;
} Buffer;

static int reserve(Buffer *b, Py_ssize_t more) {
    if (b->used + more <= b->size) {
        return 0;
    }
    Py_ssize_t size = b->size ? b->size : 4096;
    while (size < b->used + more) {
        if (size > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        size *= 2;
    }
    char *data = PyMem_Realloc(b->data, (size_t)size);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->size = size;
    return 0;
}

static int put(Buffer *b, const char *text, Py_ssize_t length) {
    if (reserve(b, length) < 0) {
        return -1;
    }
    memcpy(b->data + b->used, text, (size_t)length);
    b->used += length;
    return 0;
}

/* An ASCII str's bytes, or NULL (with no error set) when it is not one. */
static const char *ascii_text(PyObject *text, Py_ssize_t *length) {
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text)) {
        return NULL;
    }
    *length = PyUnicode_GET_LENGTH(text);
    return (const char *)PyUnicode_DATA(text);
}

static int plain_key(const char *text, Py_ssize_t length) {
    for (Py_ssize_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') {
            return 0;
        }
    }
    return 1;
}

/* `text` as a JSON string (ensure_ascii). */
static int put_string(Buffer *b, PyObject *text_object, PyObject *escape) {
    Py_ssize_t length;
    const char *text = ascii_text(text_object, &length);
    if (text != NULL && plain_key(text, length)) {
        if (reserve(b, length + 2) < 0) {
            return -1;
        }
        b->data[b->used++] = '"';
        memcpy(b->data + b->used, text, (size_t)length);
        b->used += length;
        b->data[b->used++] = '"';
        return 0;
    }
    PyObject *written = PyObject_CallOneArg(escape, text_object);
    if (written == NULL) {
        return -1;
    }
    const char *out = ascii_text(written, &length);
    int done = out != NULL ? put(b, out, length) : -1;
    if (out == NULL) {
        PyErr_SetString(PyExc_TypeError, "the string writer must give an ASCII str");
    }
    Py_DECREF(written);
    return done;
}

/* middle(tensor), from `seen` or asked once; a borrowed reference into `seen`. `seen` maps the object's
 * address to (the object, its middle): holding the object keeps the address its own while the call
 * runs, whatever the callback does to the caller's dicts. */
static PyObject *middle_of(PyObject *tensor, PyObject *seen, PyObject *middle) {
    PyObject *address = PyLong_FromVoidPtr(tensor);
    if (address == NULL) {
        return NULL;
    }
    PyObject *found = PyDict_GetItemWithError(seen, address);
    if (found != NULL) {
        Py_DECREF(address);
        return PyTuple_GET_ITEM(found, 1);
    }
    PyObject *text = NULL;
    if (!PyErr_Occurred()) {
        PyObject *made = PyObject_CallOneArg(middle, tensor);
        Py_ssize_t length;
        if (made != NULL && ascii_text(made, &length) == NULL) {
            PyErr_SetString(PyExc_TypeError, "a row's middle must be an ASCII str");
        } else if (made != NULL) {
            PyObject *pair = PyTuple_Pack(2, tensor, made);
            if (pair != NULL && PyDict_SetItem(seen, address, pair) == 0) {
                text = made; /* `seen` holds it now, through the pair */
            }
            Py_XDECREF(pair);
        }
        Py_XDECREF(made);
    }
    Py_DECREF(address);
    return text;
}

static PyObject *py_rows(PyObject *self, PyObject *args) {
    PyObject *keys, *spec, *digests, *middle, *escape;
    if (!PyArg_ParseTuple(args, "O!O!O!OO:rows", &PyList_Type, &keys, &PyDict_Type, &spec, &PyDict_Type, &digests,
                          &middle, &escape)) {
        return NULL;
    }
    PyObject *seen = PyDict_New();
    if (seen == NULL) {
        return NULL;
    }
    Buffer b = {NULL, 0, 0};
    /* the previous key's spec object and middle: both held by `seen` */
    PyObject *last_spec = NULL, *last_middle = NULL;
    int failed = 0;
    for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(keys); i++) {
        /* strong references to what this row uses: the callbacks may run any code */
        PyObject *key = PyList_GET_ITEM(keys, i);
        Py_INCREF(key);
        PyObject *tensor = PyDict_GetItemWithError(spec, key);
        Py_XINCREF(tensor);
        PyObject *digest = tensor != NULL ? PyDict_GetItemWithError(digests, key) : NULL;
        Py_XINCREF(digest);
        failed = digest == NULL;
        if (failed && !PyErr_Occurred()) {
            PyErr_SetObject(PyExc_KeyError, key);
        }
        if (!failed && tensor != last_spec) {
            last_middle = middle_of(tensor, seen, middle);
            last_spec = last_middle != NULL ? tensor : NULL;
            failed = last_middle == NULL;
        }
        if (!failed) {
            Py_ssize_t length;
            const char *text = ascii_text(last_middle, &length);
            failed = put(&b, i ? ",[" : "[", i ? 2 : 1) < 0 || put_string(&b, key, escape) < 0 ||
                     put(&b, text, length) < 0 || put_string(&b, digest, escape) < 0 || put(&b, "]", 1) < 0;
        }
        Py_XDECREF(digest);
        Py_XDECREF(tensor);
        Py_DECREF(key);
    }
    Py_DECREF(seen);
    PyObject *out = failed ? NULL : PyBytes_FromStringAndSize(b.data ? b.data : "", b.used);
    PyMem_Free(b.data);
    return out;
}

static PyMethodDef methods[] = {
    {"rows", py_rows, METH_VARARGS, "rows(keys, spec, digests, middle, escape): a content hash's rows, joined"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_content_rows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__content_rows(void) { return PyModule_Create(&module); }
