/*
 * msyncext._msync: msync(2) on the memory behind a Python buffer, with the
 * GIL released for the syscall alone.
 *
 * The Python layer (msyncext/__init__.py) checks flags and builds batches;
 * this file re-checks everything it relies on, because a wrong range here
 * means a syscall on memory the caller never named.
 *
 * Written against the limited API of 3.11 (PyObject_GetBuffer joined it
 * then), so one abi3 wheel serves every GIL build; free-threaded builds
 * compile the same source without Py_LIMITED_API.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(_WIN32)
#error "msyncext needs POSIX msync(2); Windows is not supported"
#endif

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    Py_ssize_t pagesize;
} module_state;

static inline module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* Exactly one of MS_SYNC and MS_ASYNC, optionally with MS_INVALIDATE.
 * Masked comparison, not bit tests: MS_SYNC is 0 on FreeBSD. */
static int
flags_valid(long flags)
{
    long mode;
    if (flags & ~(long)(MS_SYNC | MS_ASYNC | MS_INVALIDATE))
        return 0;
    mode = flags & ~(long)MS_INVALIDATE;
    return mode == MS_SYNC || mode == MS_ASYNC;
}

static void
raise_wrong_type(const char *what, PyObject *obj)
{
    PyObject *tname = PyType_GetName(Py_TYPE(obj));
    if (tname == NULL)
        return;
    PyErr_Format(PyExc_TypeError, "%s must be an integer, not %R (%U)",
                 what, obj, tname);
    Py_DECREF(tname);
}

/* Convert an integer argument to Py_ssize_t; bool and non-integers are
 * TypeError, values beyond Py_ssize_t OverflowError, negatives ValueError.
 * Returns -1 with an exception set on failure. */
static int
to_ssize(PyObject *obj, const char *what, Py_ssize_t *out)
{
    PyObject *index;
    Py_ssize_t value;

    if (PyLong_CheckExact(obj)) {
        value = PyLong_AsSsize_t(obj);
    }
    else {
        if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
            raise_wrong_type(what, obj);
            return -1;
        }
        index = PyNumber_Index(obj);
        if (index == NULL)
            return -1;
        value = PyLong_AsSsize_t(index);
        Py_DECREF(index);
    }
    if (value == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_OverflowError,
                         "%s %R does not fit in a C ssize_t", what, obj);
        }
        return -1;
    }
    if (value < 0) {
        PyErr_Format(PyExc_ValueError, "%s %zd is negative", what, value);
        return -1;
    }
    *out = value;
    return 0;
}

static int
to_flags(PyObject *obj, int *out)
{
    PyObject *index;
    long value;

    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        raise_wrong_type("flags", obj);
        return -1;
    }
    index = PyNumber_Index(obj);
    if (index == NULL)
        return -1;
    value = PyLong_AsLong(index);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        value = -1;  /* never a valid combination; reported below */
    }
    if (!flags_valid(value)) {
        PyErr_Format(PyExc_ValueError,
                     "flags %R is not MS_SYNC (%d) or MS_ASYNC (%d), "
                     "optionally OR-ed with MS_INVALIDATE (%d)",
                     obj, MS_SYNC, MS_ASYNC, MS_INVALIDATE);
        return -1;
    }
    *out = (int)value;
    return 0;
}

/* OSError carrying errno, with a message that names the byte range. */
static void
raise_msync_error(int err, Py_ssize_t offset, Py_ssize_t size,
                  void *start, size_t length)
{
    PyObject *exc;
    PyObject *msg = PyUnicode_FromFormat(
        "%s: msync of buffer bytes [%zd, %zd) (pages %p, %zu bytes)",
        strerror(err), offset, offset + size, start, length);
    if (msg == NULL)
        return;
    exc = PyObject_CallFunction(PyExc_OSError, "iO", err, msg);
    Py_DECREF(msg);
    if (exc == NULL)
        return;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
}

/* The page-aligned span [*start, *start + *length) covering
 * [addr, addr + size); size > 0. */
static void
pages_covering(const char *addr, Py_ssize_t size, Py_ssize_t pagesize,
               void **start, size_t *length)
{
    uintptr_t first = (uintptr_t)addr & ~((uintptr_t)pagesize - 1);
    uintptr_t end = (uintptr_t)addr + (uintptr_t)size;
    *start = (void *)first;
    *length = (size_t)(end - first);
}

/* Positional-or-keyword offset and size, keyword-only flags, parsed by
 * hand: the limited API has no fast argument parser, and PyArg_Parse* on
 * the hot path would cost more than the rest of the call. */
static int
parse_flush_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                 PyObject **slots)
{
    static const char *const names[] = {"buf", "offset", "size", "flags"};
    Py_ssize_t i, nkw = 0;
    int k;

    if (nargs > 3) {
        PyErr_Format(PyExc_TypeError,
                     "flush() takes from 1 to 3 positional arguments "
                     "but %zd were given", nargs);
        return -1;
    }
    for (i = 0; i < nargs; i++)
        slots[i] = args[i];
    if (kwnames != NULL && (nkw = PyTuple_Size(kwnames)) < 0)
        return -1;
    for (i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GetItem(kwnames, i);
        if (name == NULL)
            return -1;
        for (k = 0; k < 4; k++) {
            if (PyUnicode_CompareWithASCIIString(name, names[k]) == 0)
                break;
        }
        if (k == 4) {
            PyErr_Format(PyExc_TypeError,
                         "flush() got an unexpected keyword argument %R",
                         name);
            return -1;
        }
        if (slots[k] != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "flush() got multiple values for argument '%s'",
                         names[k]);
            return -1;
        }
        slots[k] = args[nargs + i];
    }
    if (slots[0] == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "flush() missing required argument 'buf'");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(flush_doc,
"flush($module, /, buf, offset=0, size=None, *, flags=MS_SYNC)\n--\n\n"
"Write back the pages holding buf[offset:offset+size] with msync(2).\n\n"
"offset and size are bytes relative to the start of buf, which need not be\n"
"page aligned: exactly the pages the range touches are synced. size=None\n"
"means to the end of buf; size=0 makes no syscall. flags is MS_SYNC or\n"
"MS_ASYNC, optionally OR-ed with MS_INVALIDATE. The GIL is released for\n"
"the syscall and the buffer export is held throughout, so an mmap cannot\n"
"be closed or resized under it. Raises OSError (errno kept) if msync fails.");

static PyObject *
msync_flush(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames)
{
    PyObject *slots[4] = {NULL, NULL, NULL, NULL};
    Py_buffer view;
    Py_ssize_t offset = 0, size = 0;
    int flags = MS_SYNC, rc, err = 0;
    void *start;
    size_t length;

    if (parse_flush_args(args, nargs, kwnames, slots) < 0)
        return NULL;
    if (slots[1] != NULL && to_ssize(slots[1], "offset", &offset) < 0)
        return NULL;
    if (slots[2] == Py_None)
        slots[2] = NULL;
    if (slots[2] != NULL && to_ssize(slots[2], "size", &size) < 0)
        return NULL;
    if (slots[3] != NULL && to_flags(slots[3], &flags) < 0)
        return NULL;

    /* The export keeps an mmap from being closed or resized while the GIL
     * is released: mmap refuses both with BufferError while exports live. */
    if (PyObject_GetBuffer(slots[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;

    if (offset > view.len) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd is past the end of a %zd-byte buffer",
                     offset, view.len);
        goto error;
    }
    if (slots[2] == NULL) {
        size = view.len - offset;
    }
    else if (view.len - offset < size) {
        PyErr_Format(PyExc_ValueError,
                     "size %zd runs past the end of a %zd-byte buffer "
                     "at offset %zd", size, view.len, offset);
        goto error;
    }
    if (size == 0) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }

    pages_covering((const char *)view.buf + offset, size,
                   get_state(module)->pagesize, &start, &length);
    Py_BEGIN_ALLOW_THREADS
    rc = msync(start, length, flags);
    if (rc != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (rc != 0) {
        raise_msync_error(err, offset, size, start, length);
        return NULL;
    }
    Py_RETURN_NONE;

error:
    PyBuffer_Release(&view);
    return NULL;
}

PyDoc_STRVAR(page_offset_doc,
"page_offset($module, buf, /)\n--\n\n"
"Where buf starts within its first page: its address modulo PAGESIZE.");

static PyObject *
msync_page_offset(PyObject *module, PyObject *buf)
{
    Py_buffer view;
    Py_ssize_t pagesize = get_state(module)->pagesize;
    uintptr_t head;

    if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    head = (uintptr_t)view.buf & ((uintptr_t)pagesize - 1);
    PyBuffer_Release(&view);
    return PyLong_FromSize_t((size_t)head);
}

typedef struct {
    char *start;
    size_t length;
} page_run;

static int
list_item_to_ssize(PyObject *list, Py_ssize_t index, const char *what,
                   Py_ssize_t *out)
{
    int rc;
    PyObject *item = PyList_GetItem(list, index);
    if (item == NULL)
        return -1;
    Py_INCREF(item);
    rc = to_ssize(item, what, out);
    Py_DECREF(item);
    return rc;
}


/* Read the flat list [first, count, first, count, ...] of page runs,
 * relative to the page holding buf[0], into absolute spans; every run
 * must lie within the pages the buffer touches. */
static page_run *
runs_from_list(PyObject *list, const Py_buffer *view, Py_ssize_t pagesize,
               Py_ssize_t *nruns)
{
    Py_ssize_t n, i, total_pages;
    uintptr_t head = (uintptr_t)view->buf & ((uintptr_t)pagesize - 1);
    char *base = (char *)view->buf - head;
    page_run *runs;

    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "runs must be a list");
        return NULL;
    }
    n = PyList_Size(list);
    if (n < 0)
        return NULL;
    if (n % 2 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "runs holds %zd integers, not (first, count) pairs", n);
        return NULL;
    }
    /* head < pagesize, so this cannot overflow for any real buffer. */
    total_pages = ((Py_ssize_t)head + view->len + pagesize - 1) / pagesize;
    *nruns = n / 2;
    runs = PyMem_Calloc((size_t)(n / 2) + 1, sizeof(page_run));
    if (runs == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < n / 2; i++) {
        Py_ssize_t first, count;
        /* An item's __index__ may run Python code that shrinks the list or
         * drops the item: fetch each item afresh and own it while using it. */
        if (list_item_to_ssize(list, 2 * i, "first page", &first) < 0
            || list_item_to_ssize(list, 2 * i + 1, "page count", &count) < 0)
            goto error;
        if (count == 0 || first > total_pages
            || count > total_pages - first) {
            PyErr_Format(PyExc_ValueError,
                         "run %zd (pages %zd..%zd) is empty or outside the "
                         "%zd pages of the buffer", i, first, first + count,
                         total_pages);
            goto error;
        }
        runs[i].start = base + first * pagesize;
        runs[i].length = (size_t)count * (size_t)pagesize;
    }
    return runs;

error:
    PyMem_Free(runs);
    return NULL;
}

PyDoc_STRVAR(flush_runs_doc,
"flush_runs($module, buf, runs, flags, /)\n--\n\n"
"msync(2) each page run in the flat list [first, count, ...] (pages\n"
"relative to the page holding buf[0]) with the GIL released once for the\n"
"whole batch. Stops at the first failure. Returns the number of msync\n"
"calls made. Use msyncext.flush_ranges, which builds the runs.");

static PyObject *
msync_flush_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pagesize = get_state(module)->pagesize;
    Py_ssize_t nruns = 0, done = 0;
    page_run *runs;
    int flags, err = 0;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "flush_runs() takes 3 positional arguments "
                     "but %zd were given", nargs);
        return NULL;
    }
    if (to_flags(args[2], &flags) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    runs = runs_from_list(args[1], &view, pagesize, &nruns);
    if (runs == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (nruns > 0) {
        Py_BEGIN_ALLOW_THREADS
        for (done = 0; done < nruns; done++) {
            if (msync(runs[done].start, runs[done].length, flags) != 0) {
                err = errno;
                break;
            }
        }
        Py_END_ALLOW_THREADS
    }
    if (err != 0) {
        char *buf_start = (char *)view.buf;
        Py_ssize_t lo = runs[done].start - buf_start;
        Py_ssize_t hi = lo + (Py_ssize_t)runs[done].length;
        /* Report the part of the failed run that lies inside the buffer. */
        raise_msync_error(err, lo < 0 ? 0 : lo,
                          (hi > view.len ? view.len : hi) - (lo < 0 ? 0 : lo),
                          runs[done].start, runs[done].length);
    }
    PyMem_Free(runs);
    PyBuffer_Release(&view);
    if (err != 0)
        return NULL;
    return PyLong_FromSsize_t(done);
}

static PyMethodDef msync_methods[] = {
    {"flush", (PyCFunction)(void (*)(void))msync_flush,
     METH_FASTCALL | METH_KEYWORDS, flush_doc},
    {"flush_runs", (PyCFunction)(void (*)(void))msync_flush_runs,
     METH_FASTCALL, flush_runs_doc},
    {"page_offset", msync_page_offset, METH_O, page_offset_doc},
    {NULL, NULL, 0, NULL}
};

static int
msync_exec(PyObject *module)
{
    long pagesize = sysconf(_SC_PAGESIZE);

    /* pages_covering masks with pagesize - 1, so it must be a power of 2. */
    if (pagesize <= 0 || (pagesize & (pagesize - 1)) != 0) {
        PyErr_Format(PyExc_RuntimeError,
                     "sysconf(_SC_PAGESIZE) gave %ld, not a power of two",
                     pagesize);
        return -1;
    }
    get_state(module)->pagesize = (Py_ssize_t)pagesize;
    if (PyModule_AddIntConstant(module, "PAGESIZE", pagesize) < 0
        || PyModule_AddIntConstant(module, "MS_SYNC", MS_SYNC) < 0
        || PyModule_AddIntConstant(module, "MS_ASYNC", MS_ASYNC) < 0
        || PyModule_AddIntConstant(module, "MS_INVALIDATE", MS_INVALIDATE) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot msync_slots[] = {
    {Py_mod_exec, msync_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL}
};

static struct PyModuleDef msync_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "msyncext._msync",
    .m_doc = "msync(2) on Python buffers with the GIL released.",
    .m_size = sizeof(module_state),
    .m_methods = msync_methods,
    .m_slots = msync_slots,
};

PyMODINIT_FUNC
PyInit__msync(void)
{
    return PyModuleDef_Init(&msync_module);
}
