/* Lookup-table gather for the slicer: out = lut[index(src)] over a rectangle, counting zeros.
 *
 * numpy's equivalent (shift, cast to intp, take, count_nonzero) makes four passes and two
 * temporary arrays per tile; this is one pass with nothing allocated. It reads a tile's
 * array, or an uncompressed file's blocks in place through a memory map
 * (sarkit.raster.mapped). Optional: sarkit.raster.quantise falls back to numpy where this
 * module was not built (no C compiler at install time).
 *
 *   rectN(src, src_offset, rows, cols, src_stride, lut, param, out, out_offset, out_stride)
 *       -> number of zero bytes written
 *   rect32: index = (uint32) item >> param    (float32 bits: sign, exponent, top mantissa)
 *   rect16: index = (uint16) item ^ param     (param 0x8000 for int16: offset from minimum)
 *   rect8:  index = (uint8) item ^ param      (param 0x80 for int8)
 *
 * src, lut and out are contiguous buffers; offsets and strides are in bytes. The loop runs
 * without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* src row r starts at src_offset + r * src_stride bytes, out row r at out_offset +
 * r * out_stride; both ranges are checked against the buffers. */
#define GATHER_RECT(NAME, TYPE, INDEX, TABLE, MAXPARAM)                                     \
    static PyObject *NAME(PyObject *self, PyObject *args)                                   \
    {                                                                                       \
        Py_buffer src, lut, out;                                                            \
        Py_ssize_t src_offset, rows, cols, src_stride, out_offset, out_stride;              \
        unsigned int param;                                                                 \
        size_t zeros = 0;                                                                   \
        if (!PyArg_ParseTuple(args, "y*nnnny*Iw*nn", &src, &src_offset, &rows, &cols,        \
                              &src_stride, &lut, &param, &out, &out_offset, &out_stride))   \
            return NULL;                                                                    \
        Py_ssize_t item = (Py_ssize_t)sizeof(TYPE);                                         \
        if (param > (MAXPARAM)) {                                                           \
            PyErr_SetString(PyExc_ValueError, "gather: parameter out of range");            \
        } else if ((unsigned long long)lut.len < (TABLE)) {                                 \
            PyErr_Format(PyExc_ValueError, "gather: the table needs %llu entries",          \
                         (unsigned long long)(TABLE));                                      \
        } else if (rows < 0 || cols < 0 || src_offset < 0 || out_offset < 0 ||              \
                   src_stride < cols * item || out_stride < cols ||                         \
                   (rows > 0 && (src_offset + (rows - 1) * src_stride + cols * item > src.len \
                                 || out_offset + (rows - 1) * out_stride + cols > out.len))) { \
            PyErr_SetString(PyExc_ValueError, "gather: rectangle outside the buffers");     \
        } else {                                                                            \
            const uint8_t *t = (const uint8_t *)lut.buf;                                    \
            Py_BEGIN_ALLOW_THREADS                                                          \
            for (Py_ssize_t r = 0; r < rows; r++) {                                         \
                /* blocks in a file need not be aligned to their items: memcpy loads */     \
                const char *row = (const char *)src.buf + src_offset + r * src_stride;      \
                uint8_t *o = (uint8_t *)out.buf + out_offset + r * out_stride;              \
                for (Py_ssize_t i = 0; i < cols; i++) {                                     \
                    TYPE x;                                                                 \
                    memcpy(&x, row + i * item, sizeof x);                                   \
                    uint8_t v = t[INDEX];                                                   \
                    o[i] = v;                                                               \
                    zeros += (v == 0);                                                      \
                }                                                                           \
            }                                                                               \
            Py_END_ALLOW_THREADS                                                            \
        }                                                                                   \
        PyBuffer_Release(&src);                                                             \
        PyBuffer_Release(&lut);                                                             \
        PyBuffer_Release(&out);                                                             \
        if (PyErr_Occurred())                                                               \
            return NULL;                                                                    \
        return PyLong_FromSize_t(zeros);                                                    \
    }

GATHER_RECT(rect32, uint32_t, x >> param, 1ULL << (32 - param), 31)
GATHER_RECT(rect16, uint16_t, (uint16_t)(x ^ param), 65536, 0xFFFF)
GATHER_RECT(rect8, uint8_t, (uint8_t)(x ^ param), 256, 0xFF)

static PyMethodDef methods[] = {
    {"rect32", rect32, METH_VARARGS, "out = lut[src >> shift] over a rectangle; zeros"},
    {"rect16", rect16, METH_VARARGS, "out = lut[src ^ flip] over a rectangle; zeros"},
    {"rect8", rect8, METH_VARARGS, "out = lut[src ^ flip] over a rectangle; zeros"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lut", "Lookup-table gather for the slicer.", -1, methods,
};

PyMODINIT_FUNC PyInit__lut(void) { return PyModule_Create(&module); }
