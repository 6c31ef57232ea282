/* Byte-plane grouping kernels: the optional native half of deltackpt/format/planes.py.
 *
 * split(src, dst, word): dst[k * n + i] = src[i * word + k] for n = len(src) / word words;
 * merge(planes, dst, word): the inverse, from a sequence of `word` planes of n bytes each.
 *
 * numpy does the same with one strided copy per plane, several times slower. Words are
 * loaded and stored with memcpy (any alignment) and split into bytes with shifts in
 * little-endian order, which the compiler vectorizes; the GIL is released for the loop.
 * Only word widths 2, 4 and 8 are handled here; planes.py covers every other width.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "deltackpt.format._planes assumes a little-endian target"
#endif

#define KERNELS(W, T)                                                                       \
    static void split##W(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n) {    \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            T w;                                                                            \
            memcpy(&w, s + i * W, W);                                                       \
            for (int k = 0; k < W; k++) d[k * n + i] = (uint8_t)(w >> (8 * k));             \
        }                                                                                   \
    }                                                                                       \
    static void merge##W(const uint8_t *const *p, uint8_t *restrict d, Py_ssize_t n) {      \
        for (Py_ssize_t i = 0; i < n; i++) {                                                \
            T w = 0;                                                                        \
            for (int k = 0; k < W; k++) w |= (T)p[k][i] << (8 * k);                         \
            memcpy(d + i * W, &w, W);                                                       \
        }                                                                                   \
    }

KERNELS(2, uint16_t)
KERNELS(4, uint32_t)

/* 8-byte words as two 4-byte halves: the 8-byte form of split does not vectorize. */
static void split8(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n) {
    for (int j = 0; j < 2; j++) {
        uint8_t *restrict o = d + 4 * j * n;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t w;
            memcpy(&w, s + 8 * i + 4 * j, 4);
            o[i] = (uint8_t)w;
            o[n + i] = (uint8_t)(w >> 8);
            o[2 * n + i] = (uint8_t)(w >> 16);
            o[3 * n + i] = (uint8_t)(w >> 24);
        }
    }
}

static void merge8(const uint8_t *const *p, uint8_t *restrict d, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t lo = (uint32_t)p[0][i] | (uint32_t)p[1][i] << 8 | (uint32_t)p[2][i] << 16
                      | (uint32_t)p[3][i] << 24;
        uint32_t hi = (uint32_t)p[4][i] | (uint32_t)p[5][i] << 8 | (uint32_t)p[6][i] << 16
                      | (uint32_t)p[7][i] << 24;
        memcpy(d + 8 * i, &lo, 4);
        memcpy(d + 8 * i + 4, &hi, 4);
    }
}

static int check_word(int word) {
    if (word == 2 || word == 4 || word == 8) return 0;
    PyErr_Format(PyExc_ValueError, "word width %d is not handled natively", word);
    return -1;
}

static PyObject *py_split(PyObject *self, PyObject *args) {
    Py_buffer s, d;
    int word;
    if (!PyArg_ParseTuple(args, "y*w*i", &s, &d, &word)) return NULL;
    PyObject *result = NULL;
    if (check_word(word) < 0) goto done;
    if (s.len % word || d.len != s.len) {
        PyErr_Format(PyExc_ValueError, "split: %zd source bytes, %zd destination bytes, word %d",
                     s.len, d.len, word);
        goto done;
    }
    Py_ssize_t n = s.len / word;
    Py_BEGIN_ALLOW_THREADS
    if (word == 2) split2(s.buf, d.buf, n);
    else if (word == 4) split4(s.buf, d.buf, n);
    else split8(s.buf, d.buf, n);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    return result;
}

static PyObject *py_merge(PyObject *self, PyObject *args) {
    PyObject *seq;
    Py_buffer d, p[8];
    int word, got = 0;
    if (!PyArg_ParseTuple(args, "Ow*i", &seq, &d, &word)) return NULL;
    PyObject *result = NULL, *fast = NULL;
    if (check_word(word) < 0) goto done;
    fast = PySequence_Fast(seq, "merge: planes must be a sequence");
    if (fast == NULL) goto done;
    if (PySequence_Fast_GET_SIZE(fast) != word || d.len % word) {
        PyErr_Format(PyExc_ValueError, "merge: %zd planes for word %d, %zd destination bytes",
                     PySequence_Fast_GET_SIZE(fast), word, d.len);
        goto done;
    }
    Py_ssize_t n = d.len / word;
    const uint8_t *ptr[8];
    for (; got < word; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &p[got], PyBUF_SIMPLE) < 0)
            goto done;
        if (p[got].len != n) {
            PyErr_Format(PyExc_ValueError, "merge: plane %d has %zd bytes, expected %zd", got,
                         p[got].len, n);
            got++;
            goto done;
        }
        ptr[got] = p[got].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    if (word == 2) merge2(ptr, d.buf, n);
    else if (word == 4) merge4(ptr, d.buf, n);
    else merge8(ptr, d.buf, n);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < got; k++) PyBuffer_Release(&p[k]);
    Py_XDECREF(fast);
    PyBuffer_Release(&d);
    return result;
}

static PyMethodDef methods[] = {
    {"split", py_split, METH_VARARGS, "split(src, dst, word): group bytes into planes"},
    {"merge", py_merge, METH_VARARGS, "merge(planes, dst, word): regroup planes into words"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", NULL, -1, methods};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
