/*
 * Buffer pinning for _msync. Apart from the arguments, because the rule it
 * keeps is its own: while a syscall runs without the GIL, the memory under
 * it must stay mapped, so the caller's object and, when that object does
 * not hold it, the owner of the mapping stay exported until unpin_buffer.
 */
#include "msyncext.h"

#include <stdint.h>

/* ------------------------------------------------------------------------
 * Buffers, and keeping their mapping in place
 */

static int
is_mmap(module_state *st, PyObject *obj)
{
    /* Subclasses too: they close and resize like mmap.mmap. */
    return PyType_IsSubtype(Py_TYPE(obj), (PyTypeObject *)st->mmap_type);
}

/* bytes and bytearray (subclasses too) hold memory of their own: never a
 * mapping of a file. */
static int
is_bytes_copy(PyObject *obj)
{
    return PyBytes_Check(obj) || PyByteArray_Check(obj);
}

/* Whether obj is an array.array (or a subclass): 1, 0, or -1 with an
 * exception set. The type is found in sys.modules, never imported: array
 * imports collections.abc, which would triple the cost of importing
 * msyncext, and no array.array exists in an interpreter that has not
 * imported it. Looked up each time rather than kept: only buffers that no
 * mmap owns come here, and nothing is shared between threads. */
static int
is_array_array(PyObject *obj)
{
    PyObject *name = PyUnicode_FromString("array"), *module, *type;
    int found = 0;

    if (name == NULL)
        return -1;
    module = PyImport_GetModule(name);
    if (module == NULL) {
        Py_DECREF(name);
        return PyErr_Occurred() ? -1 : 0;
    }
    type = PyObject_GetAttr(module, name);
    Py_DECREF(module);
    Py_DECREF(name);
    if (type == NULL) {
        PyErr_Clear();  /* sys.modules["array"] is not the standard module */
        return 0;
    }
    if (PyType_Check(type))
        found = PyObject_TypeCheck(obj, (PyTypeObject *)type);
    Py_DECREF(type);
    return found;
}

/* obj's type as a user would write it: "bytes", "array.array",
 * "numpy.ndarray". A new reference, or NULL with an exception set. */
static PyObject *
dotted_type_name(PyObject *obj)
{
    PyObject *type = (PyObject *)Py_TYPE(obj), *module, *qualname, *name;

    qualname = PyType_GetQualName(Py_TYPE(obj));
    if (qualname == NULL)
        return NULL;
    module = PyObject_GetAttrString(type, "__module__");
    if (module == NULL || !PyUnicode_Check(module)
        || PyUnicode_CompareWithASCIIString(module, "builtins") == 0) {
        PyErr_Clear();
        Py_XDECREF(module);
        return qualname;
    }
    name = PyUnicode_FromFormat("%U.%U", module, qualname);
    Py_DECREF(module);
    Py_DECREF(qualname);
    return name;
}

/* A TypeError for a buffer whose memory is a copy (owner: bytes, bytearray
 * or array.array, at the end of obj's chain of owners). The commonest way
 * there is slicing an mmap, which copies: the message names both fixes. */
static void
refuse_copy(PyObject *obj, PyObject *owner)
{
    PyObject *what = dotted_type_name(obj), *whose;

    if (what == NULL)
        return;
    whose = owner == obj ? PyUnicode_FromString("") : dotted_type_name(owner);
    if (whose != NULL) {
        PyErr_Format(PyExc_TypeError,
                     "buf (%U%s%U) is memory of its own, never a mapping of "
                     "a file: msync would write back nothing (slicing an "
                     "mmap.mmap, m[100:105], makes such a copy). Pass the map "
                     "and the range, flush(m, 100, 5), or a view of the map, "
                     "memoryview(m)[100:105]",
                     what, owner == obj ? "" : " over ", whose);
        Py_DECREF(whose);
    }
    Py_DECREF(what);
}

/* The memoryview a ctypes object made by from_buffer() keeps of its
 * source: its _objects is that memoryview, or a dict holding it. A new
 * reference, or NULL with nothing set. */
static PyObject *
ctypes_source(PyObject *obj)
{
    PyObject *objects = PyObject_GetAttrString(obj, "_objects"), *found = NULL;

    if (objects == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (PyMemoryView_Check(objects))
        return objects;
    if (PyDict_Check(objects)) {
        PyObject *values = PyDict_Values(objects);
        Py_ssize_t i, n = values != NULL ? PyList_Size(values) : 0;
        for (i = 0; i < n && found == NULL; i++) {
            PyObject *item = PyList_GetItem(values, i);
            if (item != NULL && PyMemoryView_Check(item)) {
                Py_INCREF(item);
                found = item;
            }
        }
        Py_XDECREF(values);
    }
    Py_DECREF(objects);
    PyErr_Clear();
    return found;
}

/* The next owner of obj on the way to its mapping, or NULL (nothing set)
 * at the end of the chain: memoryview.obj; .base (NumPy arrays); for a
 * ctypes object, its base object or the memoryview from_buffer() kept. */
static PyObject *
next_owner(PyObject *obj)
{
    PyObject *next;

    if (PyMemoryView_Check(obj))
        return PyObject_GetAttrString(obj, "obj");
    next = PyObject_GetAttrString(obj, "base");
    if (next != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return next;
    PyErr_Clear();
    next = PyObject_GetAttrString(obj, "_b_base_");
    if (next == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
        return NULL;  /* not ctypes: the end of the chain */
    }
    if (next != Py_None)
        return next;
    Py_DECREF(next);
    next = ctypes_source(obj);
    if (next == NULL)
        Py_RETURN_NONE;
    return next;
}

/* The object at the end of obj's chain of owners, until an mmap.mmap or an
 * object with no owner. Returns a new reference. */
static PyObject *
mapping_owner(module_state *st, PyObject *obj)
{
    PyObject *cur = obj;
    int depth;

    Py_INCREF(cur);
    for (depth = 0; depth < 64; depth++) {
        PyObject *next;
        if (is_mmap(st, cur))
            break;
        next = next_owner(cur);
        if (next == NULL) {
            if (PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                    Py_DECREF(cur);
                    return NULL;
                }
                PyErr_Clear();
            }
            break;
        }
        if (next == Py_None || next == cur) {
            Py_DECREF(next);
            break;
        }
        Py_DECREF(cur);
        cur = next;
    }
    return cur;
}

/* Why a buffer could not be had: a clearer TypeError for objects without
 * one, a BufferError for a buffer that exists but is not contiguous (NumPy
 * says ValueError there, memoryview BufferError: callers get one type). */
static void
explain_buffer_failure(PyObject *obj)
{
    Py_buffer probe;
    PyObject *tname;

    if (!PyObject_CheckBuffer(obj)) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return;
        PyErr_Clear();
        tname = type_name(obj);
        if (tname == NULL)
            return;
        PyErr_Format(PyExc_TypeError,
                     "buf must be an object with the buffer protocol "
                     "(a bytes-like object such as mmap.mmap), not %U", tname);
        Py_DECREF(tname);
        return;
    }
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (PyObject_GetBuffer(obj, &probe, PyBUF_STRIDES) == 0) {
            PyBuffer_Release(&probe);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            tname = type_name(obj);
            if (tname == NULL)
                return;
            PyErr_Format(PyExc_BufferError,
                         "buf (%U) is not contiguous: msync needs one "
                         "contiguous range of memory", tname);
            Py_DECREF(tname);
            return;
        }
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
}

/* Export obj's buffer (any contiguous layout, no format needed) and, when
 * obj does not keep its mapping exported itself, the mapping's owner too:
 * while both exports live, mmap refuses close() and resize(). An exporter
 * whose chain ends elsewhere (an object that neither exposes its owner nor
 * keeps it exported) is pinned through its own export only; the README
 * says what that means. A chain that ends at a bytes, bytearray or
 * array.array is refused with TypeError: that memory is a copy. */
int
pin_buffer(module_state *st, PyObject *obj, pinned *pin)
{
    PyObject *exporter, *owner;

    pin->has_owner = 0;
    if (PyObject_GetBuffer(obj, &pin->view, PyBUF_ANY_CONTIGUOUS) < 0) {
        explain_buffer_failure(obj);
        return -1;
    }
    exporter = pin->view.obj;
    /* A map itself, the common case: nothing more to look up. */
    if (exporter == NULL || (PyObject *)Py_TYPE(exporter) == st->mmap_type)
        return 0;
    owner = mapping_owner(st, exporter);
    if (owner == NULL)
        goto error;
    /* Memory that can never be a shared mapping of a file (a copy such as
     * m[100:105]): msync would return 0 having synced nothing of any file,
     * a silent success. The wrong kind of object, so TypeError. */
    if ((PyObject *)Py_TYPE(owner) != st->mmap_type && !is_mmap(st, owner)) {
        int copy = is_bytes_copy(owner) ? 1 : is_array_array(owner);
        if (copy != 0) {
            if (copy > 0)
                refuse_copy(obj, owner);
            Py_DECREF(owner);
            goto error;
        }
    }
    if (owner != exporter && PyObject_CheckBuffer(owner)) {
        if (PyObject_GetBuffer(owner, &pin->owner, PyBUF_SIMPLE) == 0) {
            uintptr_t lo = (uintptr_t)pin->owner.buf;
            uintptr_t at = (uintptr_t)pin->view.buf;
            pin->has_owner = 1;
            /* An array made over an mmap that was resized since points at
             * memory the mmap no longer holds: never msync that. */
            if (pin->view.len > 0
                && (at < lo || at - lo > (uintptr_t)pin->owner.len
                    || (uintptr_t)pin->view.len
                           > (uintptr_t)pin->owner.len - (at - lo))) {
                PyObject *tname = type_name(owner);
                if (tname != NULL) {
                    PyErr_Format(PyExc_ValueError,
                                 "buf lies outside the memory of the %U it "
                                 "was made from (was that resized?)", tname);
                    Py_DECREF(tname);
                }
                Py_DECREF(owner);
                PyBuffer_Release(&pin->owner);
                pin->has_owner = 0;
                goto error;
            }
        }
        else if (is_mmap(st, owner)) {
            /* A closed mmap under an array or a view: its memory is gone. */
            Py_DECREF(owner);
            goto error;
        }
        else {
            PyErr_Clear();  /* an owner we do not know how to pin */
        }
    }
    Py_DECREF(owner);
    return 0;

error:
    PyBuffer_Release(&pin->view);
    return -1;
}

void
unpin_buffer(pinned *pin)
{
    if (pin->has_owner)
        PyBuffer_Release(&pin->owner);
    PyBuffer_Release(&pin->view);
}
