/*
 * msyncext._msync: msync(2) on the memory behind a Python buffer, with the
 * GIL released for the syscalls alone.
 *
 * The Python layer (msyncext/__init__.py) holds the public surface and the
 * defaults; this file checks every argument it relies on, because a wrong
 * range here means a syscall on memory the caller never named.
 *
 * Written against the limited API of 3.11, so one abi3 wheel serves every
 * GIL build; free-threaded builds compile the same source without
 * Py_LIMITED_API.
 *
 * Four concerns live here:
 *   - buffers: a contiguous export of the caller's object, plus an export
 *     of the object that owns the mapping when the caller's object does
 *     not keep it mapped (numpy.memmap drops its own export of the mmap);
 *   - ranges: (offset, size) pairs checked, turned into covering page runs,
 *     sorted and merged (flush_ranges);
 *   - the write-back failure record: once msync reports that write-back of
 *     a file failed, every later flush of a mapping of that file raises
 *     WritebackError until the caller clears it (one record per process);
 *   - the module: constants, the platform's table of valid flags, slots.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(_WIN32)
#error "msyncext needs POSIX msync(2); Windows is not supported"
#endif

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MSYNCEXT_BUILD_MODE
#define MSYNCEXT_BUILD_MODE "release"
#endif

/* While a batch runs without the GIL, signals are checked whenever this
 * much time has passed since the last check (after the msync in flight). */
#define SIGNAL_CHECK_NS (20 * 1000 * 1000)

typedef struct {
    Py_ssize_t pagesize;
    PyObject *mmap_type;        /* mmap.mmap: exporting it pins the mapping */
    PyObject *writeback_error;  /* set by the Python layer; OSError before */
} module_state;

static inline module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------
 * Flags: one table of the combinations this platform's kernel accepts.
 *
 * POSIX: exactly one of MS_SYNC and MS_ASYNC, optionally with
 * MS_INVALIDATE. FreeBSD's (and DragonFly's) kern_msync refuses
 * MS_ASYNC | MS_INVALIDATE with EINVAL. Built from the constants, never
 * by bit tests: MS_SYNC is 0 on FreeBSD.
 */
static const int valid_flags[] = {
    MS_SYNC,
    MS_ASYNC,
    MS_SYNC | MS_INVALIDATE,
#if !defined(__FreeBSD__) && !defined(__DragonFly__)
    MS_ASYNC | MS_INVALIDATE,
#endif
};
#define N_VALID_FLAGS ((int)(sizeof(valid_flags) / sizeof(valid_flags[0])))

static int
flags_valid(long flags)
{
    int i;
    for (i = 0; i < N_VALID_FLAGS; i++) {
        if (flags == valid_flags[i])
            return 1;
    }
    return 0;
}

static const char *
flags_name(int flags)
{
    if (flags == MS_SYNC)
        return "MS_SYNC";
    if (flags == MS_ASYNC)
        return "MS_ASYNC";
    if (flags == (MS_SYNC | MS_INVALIDATE))
        return "MS_SYNC | MS_INVALIDATE";
    return "MS_ASYNC | MS_INVALIDATE";
}

static void
raise_bad_flags(PyObject *obj)
{
    char allowed[256];
    size_t used = 0;
    int i;

    allowed[0] = '\0';
    for (i = 0; i < N_VALID_FLAGS && used < sizeof(allowed); i++) {
        int n = snprintf(allowed + used, sizeof(allowed) - used, "%s%s (%d)",
                         i ? ", " : "", flags_name(valid_flags[i]),
                         valid_flags[i]);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    PyErr_Format(PyExc_ValueError,
                 "flags %R is not one this platform accepts: %s",
                 obj, allowed);
}

/* ------------------------------------------------------------------------
 * Integer arguments
 */

enum {
    COUNT_OK = 0,
    COUNT_ERROR = -1,       /* an exception is set */
    COUNT_NOT_INTEGER = 1,  /* bool, or no __index__; nothing set */
    COUNT_NEGATIVE = 2,     /* *index holds the value, for the message */
    COUNT_TOO_BIG = 3,      /* beyond Py_ssize_t; *index likewise */
};

/* obj as a non-negative Py_ssize_t. On COUNT_NEGATIVE and COUNT_TOO_BIG,
 * *index receives a new reference to the integer, for the caller's
 * message. An __index__ that raises passes its exception through, except
 * that a TypeError (for example __index__ returning a str) is returned as
 * COUNT_ERROR with the exception set, for the caller to reword. */
static int
as_count(PyObject *obj, Py_ssize_t *out, PyObject **index)
{
    PyObject *value;
    Py_ssize_t result;

    if (PyLong_CheckExact(obj)) {
        result = PyLong_AsSsize_t(obj);
        if (result >= 0) {
            *out = result;
            return COUNT_OK;
        }
        Py_INCREF(obj);
        value = obj;
    }
    else {
        if (PyBool_Check(obj) || !PyIndex_Check(obj))
            return COUNT_NOT_INTEGER;
        value = PyNumber_Index(obj);
        if (value == NULL)
            return COUNT_ERROR;
        result = PyLong_AsSsize_t(value);
        if (result >= 0) {
            Py_DECREF(value);
            *out = result;
            return COUNT_OK;
        }
    }
    /* Negative, or too large either way. */
    if (result == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            Py_DECREF(value);
            return COUNT_ERROR;
        }
        PyErr_Clear();
    }
    {
        PyObject *zero = PyLong_FromLong(0);
        int negative;
        if (zero == NULL) {
            Py_DECREF(value);
            return COUNT_ERROR;
        }
        negative = PyObject_RichCompareBool(value, zero, Py_LT);
        Py_DECREF(zero);
        if (negative < 0) {
            Py_DECREF(value);
            return COUNT_ERROR;
        }
        *index = value;
        return negative ? COUNT_NEGATIVE : COUNT_TOO_BIG;
    }
}

/* An __index__ that returns a non-int raises a TypeError that names no
 * argument: replace it with one that does, "what: ..." or, inside a batch,
 * "ranges[3] = (...): what: ...". Other exceptions pass through. The
 * exception is fetched first: no Python API may run with one pending. */
static PyObject *pair_label(Py_ssize_t index, PyObject *pair);

static void
reword_type_error(const char *what, Py_ssize_t index, PyObject *pair)
{
    PyObject *type, *value, *tb, *text, *label = NULL;

    if (!PyErr_ExceptionMatches(PyExc_TypeError))
        return;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    text = value != NULL ? PyObject_Str(value) : NULL;
    if (text != NULL && pair != NULL)
        label = pair_label(index, pair);
    if (text == NULL || (pair != NULL && label == NULL)) {
        PyErr_Clear();
        PyErr_Restore(type, value, tb);  /* keep the original */
        Py_XDECREF(text);
        return;
    }
    if (label != NULL)
        PyErr_Format(PyExc_TypeError, "%U: %s: %U", label, what, text);
    else
        PyErr_Format(PyExc_TypeError, "%s: %U", what, text);
    Py_XDECREF(label);
    Py_DECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

static PyObject *
type_name(PyObject *obj)
{
    return PyType_GetName(Py_TYPE(obj));
}

/* One argument of flush(): a count, or an exception naming it. */
static int
flush_count_arg(PyObject *obj, const char *what, Py_ssize_t *out)
{
    PyObject *index = NULL, *tname;
    int rc = as_count(obj, out, &index);

    switch (rc) {
    case COUNT_OK:
        return 0;
    case COUNT_NOT_INTEGER:
        tname = type_name(obj);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError, "%s must be an integer, not %R (%U)",
                         what, obj, tname);
            Py_DECREF(tname);
        }
        return -1;
    case COUNT_NEGATIVE:
        PyErr_Format(PyExc_ValueError, "%s %R is negative", what, index);
        Py_DECREF(index);
        return -1;
    case COUNT_TOO_BIG:
        PyErr_Format(PyExc_ValueError,
                     "%s %R is past the end of any buffer", what, index);
        Py_DECREF(index);
        return -1;
    default:
        reword_type_error(what, 0, NULL);
        return -1;
    }
}

static int
to_flags(PyObject *obj, int *out)
{
    PyObject *index, *tname;
    long value;

    if (PyLong_CheckExact(obj)) {
        value = PyLong_AsLong(obj);
        if (!(value == -1 && PyErr_Occurred()) && flags_valid(value)) {
            *out = (int)value;
            return 0;
        }
        PyErr_Clear();
        raise_bad_flags(obj);
        return -1;
    }
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        tname = type_name(obj);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "flags must be an integer, not %R (%U)", obj, tname);
            Py_DECREF(tname);
        }
        return -1;
    }
    index = PyNumber_Index(obj);
    if (index == NULL) {
        reword_type_error("flags", 0, NULL);
        return -1;
    }
    value = PyLong_AsLong(index);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        value = -1;  /* never valid; reported below */
    }
    if (!flags_valid(value)) {
        raise_bad_flags(obj);
        return -1;
    }
    *out = (int)value;
    return 0;
}

/* ------------------------------------------------------------------------
 * Buffers, and keeping their mapping in place
 */

typedef struct {
    Py_buffer view;   /* the caller's object, contiguous */
    Py_buffer owner;  /* the mapping's owner, when view does not pin it */
    int has_owner;
} pinned;

/* The object at the end of obj's chain of owners: memoryview.obj, then
 * .base (NumPy arrays), until an mmap.mmap or an object with no owner.
 * Returns a new reference. */
static PyObject *
mapping_owner(module_state *st, PyObject *obj)
{
    PyObject *cur = obj;
    int depth;

    Py_INCREF(cur);
    for (depth = 0; depth < 64; depth++) {
        PyObject *next;
        if ((PyObject *)Py_TYPE(cur) == st->mmap_type)
            break;
        next = PyObject_GetAttrString(cur, PyMemoryView_Check(cur) ? "obj"
                                                                   : "base");
        if (next == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                Py_DECREF(cur);
                return NULL;
            }
            PyErr_Clear();
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
 * while both exports live, mmap refuses close() and resize(). */
static int
pin_buffer(module_state *st, PyObject *obj, pinned *pin)
{
    PyObject *exporter, *owner;

    pin->has_owner = 0;
    if (PyObject_GetBuffer(obj, &pin->view, PyBUF_ANY_CONTIGUOUS) < 0) {
        explain_buffer_failure(obj);
        return -1;
    }
    exporter = pin->view.obj;
    if (exporter == NULL || (PyObject *)Py_TYPE(exporter) == st->mmap_type
        || PyBytes_CheckExact(exporter) || PyByteArray_CheckExact(exporter))
        return 0;
    owner = mapping_owner(st, exporter);
    if (owner == NULL)
        goto error;
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
        else if ((PyObject *)Py_TYPE(owner) == st->mmap_type) {
            /* A closed mmap under a NumPy array: its memory is gone. */
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

static void
unpin_buffer(pinned *pin)
{
    if (pin->has_owner)
        PyBuffer_Release(&pin->owner);
    PyBuffer_Release(&pin->view);
}

/* ------------------------------------------------------------------------
 * The write-back failure record (one per process, shared by every
 * interpreter and thread; never touched with the GIL held, never calls
 * Python while locked).
 *
 * Linux reports a failed write-back once per open file and marks the failed
 * pages clean, so a later msync returns 0 for data that never reached the
 * device. When msync reports such a failure, the file behind the address
 * is recorded with the address ranges of all its shared mappings in the
 * process; a later flush that overlaps one of them (and whose address still
 * maps that file) is refused without calling msync.
 */

typedef struct {
    uintptr_t lo, hi;
} addr_range;

typedef struct {
    unsigned long long dev, ino;
} file_id;

typedef struct {
    int identified;     /* id names the file; else only maps[0] is known */
    file_id id;
    int err;            /* the errno of the first failure */
    addr_range *maps;
    size_t nmaps;
} wb_failure;

static pthread_mutex_t wb_lock = PTHREAD_MUTEX_INITIALIZER;
/* Failures recorded plus failures being recorded; read without the lock.
 * A failure counts from the moment its msync returns, so that another
 * thread whose msync of the same file returned 0 (the kernel reports each
 * failure once) waits on wb_lock for the record instead of succeeding. */
static int wb_count;
static wb_failure *wb_list;
static size_t wb_len;

static inline int
wb_any(void)
{
    return __atomic_load_n(&wb_count, __ATOMIC_ACQUIRE) != 0;
}

static int
is_writeback_errno(int err)
{
    /* Bad calls, not failed write-back: a bad range or flags, part of the
     * range unmapped, MS_INVALIDATE over locked pages. */
    return err != EINVAL && err != ENOMEM && err != EBUSY && err != EINTR;
}

typedef int (*maps_visitor)(void *ctx, uintptr_t lo, uintptr_t hi,
                            int shared, const file_id *id, int has_file);

/* Call visit for every line of /proc/self/maps; -1 if there is no such
 * source (not Linux, /proc not mounted). visit returns non-zero to stop. */
static int
walk_maps(maps_visitor visit, void *ctx)
{
#if defined(__linux__)
    char line[512];
    FILE *maps = fopen("/proc/self/maps", "re");
    int whole = 1;

    if (maps == NULL)
        return -1;
    while (fgets(line, sizeof(line), maps) != NULL) {
        unsigned long lo, hi, ino;
        unsigned int major, minor;
        char perms[5];
        int starts_line = whole;
        file_id id;

        whole = strchr(line, '\n') != NULL;
        if (!starts_line)
            continue;  /* the tail of a long path */
        if (sscanf(line, "%lx-%lx %4s %*x %x:%x %lu", &lo, &hi, perms,
                   &major, &minor, &ino) != 6)
            continue;
        id.dev = ((unsigned long long)major << 32) | minor;
        id.ino = ino;
        if (visit(ctx, (uintptr_t)lo, (uintptr_t)hi, perms[3] == 's', &id,
                  ino != 0))
            break;
    }
    fclose(maps);
    return 0;
#else
    (void)visit;
    (void)ctx;
    return -1;
#endif
}

typedef struct {
    uintptr_t addr;
    int found;
    file_id id;
} identity_query;

static int
visit_identity(void *ctx, uintptr_t lo, uintptr_t hi, int shared,
               const file_id *id, int has_file)
{
    identity_query *q = ctx;
    (void)shared;
    if (q->addr >= lo && q->addr < hi) {
        q->found = has_file;
        q->id = *id;
        return 1;
    }
    return 0;
}

/* 1: addr maps the file *id; 0: it maps no file (or nothing); -1: unknown. */
static int
identity_at(uintptr_t addr, file_id *id)
{
    identity_query q = {addr, 0, {0, 0}};
    if (walk_maps(visit_identity, &q) < 0)
        return -1;
    *id = q.id;
    return q.found;
}

typedef struct {
    file_id id;
    addr_range *maps;
    size_t n, cap;
    int failed;
} ranges_query;

static int
visit_ranges(void *ctx, uintptr_t lo, uintptr_t hi, int shared,
             const file_id *id, int has_file)
{
    ranges_query *q = ctx;
    if (!has_file || !shared || id->dev != q->id.dev || id->ino != q->id.ino)
        return 0;
    if (q->n == q->cap) {
        size_t cap = q->cap ? 2 * q->cap : 8;
        addr_range *grown = realloc(q->maps, cap * sizeof(addr_range));
        if (grown == NULL) {
            q->failed = 1;
            return 1;
        }
        q->maps = grown;
        q->cap = cap;
    }
    q->maps[q->n].lo = lo;
    q->maps[q->n].hi = hi;
    q->n++;
    return 0;
}

static int
overlaps(const addr_range *r, uintptr_t lo, uintptr_t hi)
{
    return r->lo < hi && lo < r->hi;
}

/* Called with wb_lock held. */
static void
wb_drop(size_t index)
{
    free(wb_list[index].maps);
    wb_list[index] = wb_list[wb_len - 1];
    wb_len--;
    __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
}

/* Whether [lo, hi) lies in a mapping of a file whose write-back failed;
 * if so, *err is the first failure's errno. No GIL needed. */
static int
wb_check(uintptr_t lo, uintptr_t hi, int *err)
{
    size_t i, j;
    int hit = 0;

    pthread_mutex_lock(&wb_lock);
    for (i = 0; i < wb_len && !hit; i++) {
        wb_failure *f = &wb_list[i];
        for (j = 0; j < f->nmaps && !hit;) {
            file_id now;
            uintptr_t probe;
            int rc;
            if (!overlaps(&f->maps[j], lo, hi)) {
                j++;
                continue;
            }
            if (!f->identified) {
                hit = 1;
                break;
            }
            /* The address may have been unmapped and reused since: only
             * the same file still mapped there counts. */
            probe = lo > f->maps[j].lo ? lo : f->maps[j].lo;
            rc = identity_at(probe, &now);
            if (rc < 0 || (rc == 1 && now.dev == f->id.dev
                           && now.ino == f->id.ino)) {
                hit = 1;
                break;
            }
            f->maps[j] = f->maps[f->nmaps - 1];
            f->nmaps--;
        }
        if (hit)
            *err = f->err;
    }
    pthread_mutex_unlock(&wb_lock);
    return hit;
}

/* Record a write-back failure seen by msync over [lo, hi); the caller has
 * already counted it in wb_count. Returns the errno to report: the first
 * one recorded for that file. No GIL needed. */
static int
wb_record(uintptr_t lo, uintptr_t hi, int err)
{
    ranges_query q;
    wb_failure *grown, *f = NULL;
    size_t i;
    int known;

    memset(&q, 0, sizeof(q));
    pthread_mutex_lock(&wb_lock);
    known = identity_at(lo, &q.id) == 1;
    if (known && walk_maps(visit_ranges, &q) == 0 && !q.failed) {
        for (i = 0; i < wb_len; i++) {
            if (wb_list[i].identified && wb_list[i].id.dev == q.id.dev
                && wb_list[i].id.ino == q.id.ino) {
                /* Already failed: keep the first errno, take the current
                 * mappings. */
                free(wb_list[i].maps);
                wb_list[i].maps = q.maps;
                wb_list[i].nmaps = q.n;
                err = wb_list[i].err;
                __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
                pthread_mutex_unlock(&wb_lock);
                return err;
            }
        }
    }
    else {
        free(q.maps);
        memset(&q, 0, sizeof(q));
        known = 0;
    }
    grown = realloc(wb_list, (wb_len + 1) * sizeof(wb_failure));
    if (grown != NULL) {
        wb_list = grown;
        f = &wb_list[wb_len];
        if (!known) {
            q.maps = malloc(sizeof(addr_range));
            if (q.maps != NULL) {
                q.maps[0].lo = lo;
                q.maps[0].hi = hi;
                q.n = 1;
            }
        }
        f->identified = known;
        f->id = q.id;
        f->err = err;
        f->maps = q.maps;
        f->nmaps = q.maps != NULL ? q.n : 0;
        wb_len++;
    }
    else {
        free(q.maps);  /* out of memory: this call still raises */
        __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    }
    pthread_mutex_unlock(&wb_lock);
    return err;
}

/* Forget the failures of the file mapped at [lo, hi). Returns the first
 * errno forgotten, or 0. No GIL needed. */
static int
wb_clear(uintptr_t lo, uintptr_t hi)
{
    file_id id;
    int known, err = 0;
    size_t i, j;

    pthread_mutex_lock(&wb_lock);
    known = identity_at(lo, &id) == 1;
    for (i = 0; i < wb_len;) {
        wb_failure *f = &wb_list[i];
        int match = 0;
        if (f->identified)
            match = known && f->id.dev == id.dev && f->id.ino == id.ino;
        else
            for (j = 0; j < f->nmaps && !match; j++)
                match = overlaps(&f->maps[j], lo, hi);
        if (match) {
            if (err == 0)
                err = f->err;
            wb_drop(i);
        }
        else {
            i++;
        }
    }
    pthread_mutex_unlock(&wb_lock);
    return err;
}

/* ------------------------------------------------------------------------
 * The syscall
 */

enum {
    SYNC_OK = 0,
    SYNC_FAILED,     /* msync failed: a bad call (EBUSY, ENOMEM, ...) */
    SYNC_WRITEBACK,  /* msync reported a write-back failure, now recorded */
    SYNC_REFUSED,    /* an earlier failure of this file; msync not called */
};

/* msync one page span, honouring the failure record. No GIL needed. */
static int
sync_span(char *start, size_t length, int flags, int *err)
{
    uintptr_t lo = (uintptr_t)start, hi = lo + length;

    if (wb_any() && wb_check(lo, hi, err))
        return SYNC_REFUSED;
    if (msync(start, length, flags) != 0) {
        *err = errno;
        if (!is_writeback_errno(*err))
            return SYNC_FAILED;
        __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
        *err = wb_record(lo, hi, *err);
        return SYNC_WRITEBACK;
    }
    /* Another thread may have seen this file fail while our msync ran (the
     * kernel reports each failure once): its record speaks for us too. */
    if (wb_any() && wb_check(lo, hi, err))
        return SYNC_REFUSED;
    return SYNC_OK;
}

/* OSError (or WritebackError) with errno, os.strerror(errno) as strerror
 * and the byte range, as buffer offsets, where OSError puts a file name.
 * Steals the reference to where. */
static void
raise_sync_error(module_state *st, int outcome, int err, PyObject *where)
{
    PyObject *cls, *exc;

    if (where == NULL)
        return;
    cls = outcome == SYNC_FAILED || st->writeback_error == NULL
              ? PyExc_OSError
              : st->writeback_error;
    exc = PyObject_CallFunction(cls, "isO", err, strerror(err), where);
    Py_DECREF(where);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* The page-aligned span covering [addr, addr + size), size > 0, rounded up
 * to whole pages: what msync is given, and what messages print. */
static void
pages_covering(const char *addr, Py_ssize_t size, Py_ssize_t pagesize,
               char **start, size_t *length)
{
    uintptr_t mask = (uintptr_t)pagesize - 1;
    uintptr_t first = (uintptr_t)addr & ~mask;
    uintptr_t end = ((uintptr_t)addr + (uintptr_t)size + mask) & ~mask;
    *start = (char *)first;
    *length = (size_t)(end - first);
}

/* ------------------------------------------------------------------------
 * flush()
 */

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
"means to the end of buf; size=0 makes no syscall. flags is one of\n"
"VALID_FLAGS. The GIL is released for the syscall, and the mapping under\n"
"buf cannot be closed or resized meanwhile. Raises OSError (errno kept)\n"
"if msync fails, WritebackError if write-back of the file failed, now or\n"
"in an earlier flush.");

static PyObject *
msync_flush(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames)
{
    module_state *st = get_state(module);
    PyObject *slots[4] = {NULL, NULL, NULL, NULL};
    pinned pin;
    Py_ssize_t offset = 0, size = 0, len;
    int flags = MS_SYNC, outcome, err = 0;
    char *start;
    size_t length;

    if (parse_flush_args(args, nargs, kwnames, slots) < 0)
        return NULL;
    if (slots[1] != NULL && flush_count_arg(slots[1], "offset", &offset) < 0)
        return NULL;
    if (slots[2] == Py_None)
        slots[2] = NULL;
    if (slots[2] != NULL && flush_count_arg(slots[2], "size", &size) < 0)
        return NULL;
    if (slots[3] != NULL && to_flags(slots[3], &flags) < 0)
        return NULL;

    if (pin_buffer(st, slots[0], &pin) < 0)
        return NULL;
    len = pin.view.len;
    if (offset > len) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd is past the end of a %zd-byte buffer",
                     offset, len);
        goto error;
    }
    if (slots[2] == NULL) {
        size = len - offset;
    }
    else if (len - offset < size) {
        PyErr_Format(PyExc_ValueError,
                     "size %zd runs past the end of a %zd-byte buffer "
                     "at offset %zd", size, len, offset);
        goto error;
    }
    if (size == 0) {
        unpin_buffer(&pin);
        Py_RETURN_NONE;
    }

    pages_covering((const char *)pin.view.buf + offset, size, st->pagesize,
                   &start, &length);
    Py_BEGIN_ALLOW_THREADS
    outcome = sync_span(start, length, flags, &err);
    Py_END_ALLOW_THREADS
    unpin_buffer(&pin);
    if (outcome != SYNC_OK) {
        raise_sync_error(st, outcome, err,
                         PyUnicode_FromFormat("buffer bytes [%zd, %zd)",
                                              offset, offset + size));
        return NULL;
    }
    Py_RETURN_NONE;

error:
    unpin_buffer(&pin);
    return NULL;
}

/* ------------------------------------------------------------------------
 * Batches: (offset, size) pairs -> sorted, merged page runs
 */

typedef struct {
    Py_ssize_t first, last;  /* pages, relative to the page of buf[0] */
} page_span;

typedef struct {
    page_span *items;
    Py_ssize_t len, cap;
    Py_ssize_t head;      /* where buf[0] lies in its page */
    Py_ssize_t nbytes;    /* the buffer's length */
    Py_ssize_t pagesize;
} batch;

static int
batch_push(batch *b, Py_ssize_t offset, Py_ssize_t size)
{
    Py_ssize_t start;
    if (size == 0)
        return 0;
    if (b->len == b->cap) {
        Py_ssize_t cap = b->cap ? 2 * b->cap : 16;
        page_span *grown;
        if (cap > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(page_span)
            || (grown = PyMem_Realloc(b->items,
                                      (size_t)cap * sizeof(page_span)))
                   == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->items = grown;
        b->cap = cap;
    }
    /* head < pagesize and offset + size <= nbytes: no overflow for any
     * buffer that fits in memory. */
    start = b->head + offset;
    b->items[b->len].first = start / b->pagesize;
    b->items[b->len].last = (start + size - 1) / b->pagesize;
    b->len++;
    return 0;
}

/* The message prefix naming one pair: "ranges[3] = (1, -2)". */
static PyObject *
pair_label(Py_ssize_t index, PyObject *pair)
{
    return PyUnicode_FromFormat("ranges[%zd] = %R", index, pair);
}

/* Check one value of a pair; 0, or -1 with an exception naming the pair. */
static int
pair_count(Py_ssize_t index, PyObject *pair, PyObject *obj, const char *what,
           Py_ssize_t *out)
{
    PyObject *index_obj = NULL, *label, *tname;
    int rc = as_count(obj, out, &index_obj);

    if (rc == COUNT_OK)
        return 0;
    if (rc == COUNT_ERROR) {
        reword_type_error(what, index, pair);
        return -1;
    }
    label = pair_label(index, pair);
    if (label == NULL) {
        Py_XDECREF(index_obj);
        return -1;
    }
    switch (rc) {
    case COUNT_NOT_INTEGER:
        tname = type_name(obj);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError, "%U: %s must be an integer, not %U",
                         label, what, tname);
            Py_DECREF(tname);
        }
        break;
    case COUNT_NEGATIVE:
        PyErr_Format(PyExc_ValueError, "%U: %s %R is negative", label, what,
                     index_obj);
        break;
    case COUNT_TOO_BIG:
        PyErr_Format(PyExc_ValueError,
                     "%U: %s %R runs past the end of any buffer", label, what,
                     index_obj);
        break;
    default:
        break;
    }
    Py_XDECREF(index_obj);
    Py_DECREF(label);
    return -1;
}

static int
check_and_push(batch *b, Py_ssize_t index, PyObject *pair, Py_ssize_t offset,
               Py_ssize_t size)
{
    if (offset > b->nbytes || size > b->nbytes - offset) {
        PyObject *label = pair_label(index, pair);
        if (label != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "%U: size %zd at offset %zd runs past the end of a "
                         "%zd-byte buffer", label, size, offset, b->nbytes);
            Py_DECREF(label);
        }
        return -1;
    }
    return batch_push(b, offset, size);
}

static int
push_pair_object(batch *b, Py_ssize_t index, PyObject *pair)
{
    PyObject *tuple;
    Py_ssize_t offset, size;
    int rc = -1;

    if (PyTuple_CheckExact(pair)) {
        Py_INCREF(pair);
        tuple = pair;
    }
    else {
        /* A copy: a list pair could change under us on free-threaded
         * builds, and any iterable of two integers is a pair. */
        tuple = PySequence_Tuple(pair);
        if (tuple == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError))
                goto not_a_pair;
            return -1;
        }
    }
    if (PyTuple_Size(tuple) != 2)
        goto not_a_pair_owned;
    if (pair_count(index, pair, PyTuple_GetItem(tuple, 0), "offset", &offset)
            == 0
        && pair_count(index, pair, PyTuple_GetItem(tuple, 1), "size", &size)
               == 0)
        rc = check_and_push(b, index, pair, offset, size);
    Py_DECREF(tuple);
    return rc;

not_a_pair_owned:
    Py_DECREF(tuple);
not_a_pair:
    PyErr_Clear();
    {
        PyObject *label = pair_label(index, pair);
        if (label != NULL) {
            PyErr_Format(PyExc_TypeError, "%U is not an (offset, size) pair",
                         label);
            Py_DECREF(label);
        }
    }
    return -1;
}

/* An (n, 2) array of native integers, read in place. 1 if used, 0 if
 * ranges is not such an array (nothing set), -1 on error. */
static int
push_pairs_from_array(batch *b, PyObject *ranges)
{
    Py_buffer arr;
    const char *fmt;
    int is_signed, ok = 0, rc = 0;
    Py_ssize_t i, item;

    if (!PyObject_CheckBuffer(ranges))
        return 0;
    if (PyObject_GetBuffer(ranges, &arr, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        return 0;
    }
    fmt = arr.format ? arr.format : "B";
    if (*fmt == '@' || *fmt == '=')
        fmt++;
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<')
        fmt++;
#else
    else if (*fmt == '>' || *fmt == '!')
        fmt++;
#endif
    item = arr.itemsize;
    if (arr.ndim == 2 && arr.shape[1] == 2 && fmt[0] != '\0' && fmt[1] == '\0'
        && strchr("bhilqnBHILQN", fmt[0]) != NULL
        && (item == 1 || item == 2 || item == 4 || item == 8))
        ok = 1;
    if (!ok) {
        PyBuffer_Release(&arr);
        return 0;
    }
    is_signed = strchr("bhilqn", fmt[0]) != NULL;
    for (i = 0; i < arr.shape[0] && rc == 0; i++) {
        unsigned long long raw[2];
        long long value[2];
        int k, bad = 0;
        for (k = 0; k < 2; k++) {
            const char *p = (const char *)arr.buf + i * arr.strides[0]
                            + k * arr.strides[1];
            switch (item) {
            case 1:
                value[k] = is_signed ? (long long)*(const int8_t *)p
                                     : (long long)*(const uint8_t *)p;
                raw[k] = *(const uint8_t *)p;
                break;
            case 2: {
                uint16_t v;
                memcpy(&v, p, 2);
                value[k] = is_signed ? (long long)(int16_t)v : (long long)v;
                raw[k] = v;
                break;
            }
            case 4: {
                uint32_t v;
                memcpy(&v, p, 4);
                value[k] = is_signed ? (long long)(int32_t)v : (long long)v;
                raw[k] = v;
                break;
            }
            default: {
                uint64_t v;
                memcpy(&v, p, 8);
                value[k] = (long long)v;
                raw[k] = v;
                if (!is_signed && v > (uint64_t)PY_SSIZE_T_MAX)
                    bad = 1;
            }
            }
        }
        if (bad || value[0] < 0 || value[1] < 0
            || value[0] > PY_SSIZE_T_MAX || value[1] > PY_SSIZE_T_MAX) {
            /* Word the error as the generic path would, from Python ints. */
            PyObject *pair = is_signed
                ? Py_BuildValue("(LL)", value[0], value[1])
                : Py_BuildValue("(KK)", raw[0], raw[1]);
            if (pair != NULL) {
                rc = push_pair_object(b, i, pair);
                Py_DECREF(pair);
                if (rc == 0) {  /* cannot happen: the values were bad */
                    PyErr_SetString(PyExc_SystemError, "bad pair accepted");
                    rc = -1;
                }
            }
            else {
                rc = -1;
            }
            break;
        }
        if (value[0] > b->nbytes || value[1] > b->nbytes - value[0]) {
            PyObject *pair = Py_BuildValue("(LL)", value[0], value[1]);
            rc = pair ? check_and_push(b, i, pair, (Py_ssize_t)value[0],
                                       (Py_ssize_t)value[1])
                      : -1;
            Py_XDECREF(pair);
            break;
        }
        rc = batch_push(b, (Py_ssize_t)value[0], (Py_ssize_t)value[1]);
    }
    PyBuffer_Release(&arr);
    return rc < 0 ? -1 : 1;
}

static int
push_pairs(batch *b, PyObject *ranges)
{
    PyObject *iterator, *pair;
    Py_ssize_t index = 0;
    int rc;

    if (!PyList_CheckExact(ranges) && !PyTuple_CheckExact(ranges)) {
        rc = push_pairs_from_array(b, ranges);
        if (rc != 0)
            return rc < 0 ? -1 : 0;
    }
    iterator = PyObject_GetIter(ranges);
    if (iterator == NULL) {
        PyObject *tname;
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return -1;
        PyErr_Clear();
        tname = type_name(ranges);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "ranges must be an iterable of (offset, size) pairs, "
                         "not %U", tname);
            Py_DECREF(tname);
        }
        return -1;
    }
    while ((pair = PyIter_Next(iterator)) != NULL) {
        rc = push_pair_object(b, index++, pair);
        Py_DECREF(pair);
        if (rc < 0) {
            Py_DECREF(iterator);
            return -1;
        }
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : 0;
}

static int
compare_spans(const void *a, const void *b)
{
    const page_span *x = a, *y = b;
    if (x->first != y->first)
        return x->first < y->first ? -1 : 1;
    return (x->last > y->last) - (x->last < y->last);
}

/* Sort the spans and merge, in place, those that overlap, touch, or lie at
 * most gap_pages apart. */
static void
merge_spans(batch *b, Py_ssize_t gap_pages)
{
    Py_ssize_t i, out = 0;

    for (i = 1; i < b->len; i++) {
        if (b->items[i].first < b->items[i - 1].first) {
            qsort(b->items, (size_t)b->len, sizeof(page_span), compare_spans);
            break;
        }
    }
    for (i = 0; i < b->len; i++) {
        page_span s = b->items[i];
        if (out > 0 && s.first - b->items[out - 1].last - 1 <= gap_pages) {
            if (s.last > b->items[out - 1].last)
                b->items[out - 1].last = s.last;
        }
        else {
            b->items[out++] = s;
        }
    }
    b->len = out;
}

/* The common front of flush_batch and batch_runs: buffer pinned, pairs
 * checked, runs merged. On success the caller unpins and frees b->items. */
static int
plan_batch(module_state *st, PyObject *const *args, Py_ssize_t nargs,
           const char *fname, pinned *pin, batch *b, int *flags)
{
    Py_ssize_t max_gap, gap_pages;

    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes 4 positional arguments but %zd were given",
                     fname, nargs);
        return -1;
    }
    if (to_flags(args[2], flags) < 0)
        return -1;
    if (PyLong_CheckExact(args[3]) && PyLong_AsSsize_t(args[3]) >= 0) {
        max_gap = PyLong_AsSsize_t(args[3]);
    }
    else {
        PyObject *index = NULL;
        int rc;
        PyErr_Clear();
        rc = as_count(args[3], &max_gap, &index);
        if (rc == COUNT_TOO_BIG) {
            max_gap = PY_SSIZE_T_MAX;  /* merge everything */
        }
        else if (rc != COUNT_OK) {
            if (rc == COUNT_NOT_INTEGER || rc == COUNT_NEGATIVE) {
                PyErr_Format(rc == COUNT_NEGATIVE ? PyExc_ValueError
                                                  : PyExc_TypeError,
                             "max_gap must be a non-negative integer, not %R",
                             index ? index : args[3]);
            }
            else {
                reword_type_error("max_gap", 0, NULL);
            }
            Py_XDECREF(index);
            return -1;
        }
        Py_XDECREF(index);
    }
    if (pin_buffer(st, args[0], pin) < 0)
        return -1;
    memset(b, 0, sizeof(*b));
    b->pagesize = st->pagesize;
    b->nbytes = pin->view.len;
    b->head = (Py_ssize_t)((uintptr_t)pin->view.buf
                           & ((uintptr_t)st->pagesize - 1));
    if (push_pairs(b, args[1]) < 0) {
        PyMem_Free(b->items);
        unpin_buffer(pin);
        return -1;
    }
    /* MS_INVALIDATE over a page the caller never named could fail (EBUSY
     * on locked pages) or drop cached copies of it: no gaps then. */
    gap_pages = *flags == (MS_SYNC | MS_INVALIDATE)
                        || *flags == (MS_ASYNC | MS_INVALIDATE)
                    ? 0
                    : max_gap / st->pagesize;
    merge_spans(b, gap_pages);
    return 0;
}

static uint64_t
monotonic_ns(void)
{
    struct timespec ts;
#if defined(CLOCK_MONOTONIC_COARSE)
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Tell the signal handler's exception how far the batch got. */
static void
note_interrupted(Py_ssize_t done, Py_ssize_t total)
{
    PyObject *type, *value, *tb, *note, *res;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL) {
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        note = PyUnicode_FromFormat(
            "msyncext.flush_ranges was interrupted after %zd of %zd msync "
            "calls: the pages of those runs were written back, the rest "
            "were not flushed", done, total);
        if (note != NULL) {
            res = PyObject_CallMethod(value, "add_note", "O", note);
            Py_XDECREF(res);
            Py_DECREF(note);
            PyErr_Clear();
        }
    }
    PyErr_Restore(type, value, tb);
}

PyDoc_STRVAR(flush_batch_doc,
"flush_batch($module, buf, ranges, flags, max_gap, /)\n--\n\n"
"Check every (offset, size) pair of ranges, merge their covering pages into\n"
"sorted runs and msync each run, with the GIL released once for the batch\n"
"(and taken back at most every 20 ms to run signal handlers). Returns the\n"
"number of msync calls. Use msyncext.flush_ranges.");

static PyObject *
msync_flush_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    module_state *st = get_state(module);
    pinned pin;
    batch b;
    Py_ssize_t done = 0;
    int flags, outcome = SYNC_OK, err = 0, interrupted = 0;
    char *base;

    if (plan_batch(st, args, nargs, "flush_batch", &pin, &b, &flags) < 0)
        return NULL;
    base = (char *)pin.view.buf - b.head;
    if (b.len > 0) {
        Py_BEGIN_ALLOW_THREADS
        uint64_t last_check = monotonic_ns();
        for (done = 0; done < b.len; done++) {
            page_span *run = &b.items[done];
            outcome = sync_span(base + run->first * b.pagesize,
                                (size_t)(run->last - run->first + 1)
                                    * (size_t)b.pagesize,
                                flags, &err);
            if (outcome != SYNC_OK)
                break;
            if (done + 1 < b.len
                && monotonic_ns() - last_check >= SIGNAL_CHECK_NS) {
                int signalled;
                Py_BLOCK_THREADS
                signalled = PyErr_CheckSignals();
                Py_UNBLOCK_THREADS
                if (signalled < 0) {
                    interrupted = 1;
                    done++;
                    break;
                }
                last_check = monotonic_ns();
            }
        }
        Py_END_ALLOW_THREADS
    }
    if (interrupted) {
        note_interrupted(done, b.len);
    }
    else if (outcome != SYNC_OK) {
        /* The failed run, as buffer offsets (clipped to the buffer). */
        page_span *run = &b.items[done];
        Py_ssize_t lo = run->first * b.pagesize - b.head;
        Py_ssize_t hi = (run->last + 1) * b.pagesize - b.head;
        if (lo < 0)
            lo = 0;
        if (hi > b.nbytes)
            hi = b.nbytes;
        raise_sync_error(st, outcome, err,
                         PyUnicode_FromFormat(
                             "buffer bytes [%zd, %zd), run %zd of %zd",
                             lo, hi, done + 1, b.len));
    }
    PyMem_Free(b.items);
    unpin_buffer(&pin);
    if (interrupted || outcome != SYNC_OK)
        return NULL;
    return PyLong_FromSsize_t(done);
}

PyDoc_STRVAR(batch_runs_doc,
"batch_runs($module, buf, ranges, flags, max_gap, /)\n--\n\n"
"The runs flush_batch would msync, as (first page, page count) pairs with\n"
"pages counted from the page holding buf[0]; no syscall. For tests.");

static PyObject *
msync_batch_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    module_state *st = get_state(module);
    pinned pin;
    batch b;
    int flags;
    Py_ssize_t i;
    PyObject *result;

    if (plan_batch(st, args, nargs, "batch_runs", &pin, &b, &flags) < 0)
        return NULL;
    result = PyList_New(b.len);
    for (i = 0; result != NULL && i < b.len; i++) {
        PyObject *run = Py_BuildValue("(nn)", b.items[i].first,
                                      b.items[i].last - b.items[i].first + 1);
        if (run == NULL || PyList_SetItem(result, i, run) < 0) {
            Py_CLEAR(result);
        }
    }
    PyMem_Free(b.items);
    unpin_buffer(&pin);
    return result;
}

/* ------------------------------------------------------------------------
 * The rest of the module
 */

PyDoc_STRVAR(clear_writeback_error_doc,
"clear_writeback_error($module, buf, /)\n--\n\n"
"Forget a recorded write-back failure of the file mapped under buf, so that\n"
"its next flush reaches msync again. Returns the errno of the failure that\n"
"was forgotten, or None if none was recorded for that file.");

static PyObject *
msync_clear_writeback_error(PyObject *module, PyObject *buf)
{
    module_state *st = get_state(module);
    pinned pin;
    uintptr_t lo, hi;
    int err = 0;

    if (pin_buffer(st, buf, &pin) < 0)
        return NULL;
    lo = (uintptr_t)pin.view.buf;
    hi = lo + (uintptr_t)(pin.view.len > 0 ? pin.view.len : 1);
    if (wb_any()) {
        Py_BEGIN_ALLOW_THREADS
        err = wb_clear(lo, hi);
        Py_END_ALLOW_THREADS
    }
    unpin_buffer(&pin);
    if (err == 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(err);
}

PyDoc_STRVAR(set_writeback_error_doc,
"_set_writeback_error($module, cls, /)\n--\n\n"
"The OSError subclass to raise for write-back failures (msyncext sets it).");

static PyObject *
msync_set_writeback_error(PyObject *module, PyObject *cls)
{
    module_state *st = get_state(module);
    if (!PyType_Check(cls)
        || !PyObject_IsSubclass(cls, PyExc_OSError)) {
        PyErr_SetString(PyExc_TypeError, "expected a subclass of OSError");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XDECREF(st->writeback_error);
    st->writeback_error = cls;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(page_offset_doc,
"page_offset($module, buf, /)\n--\n\n"
"Where buf starts within its first page: its address modulo PAGESIZE.");

static PyObject *
msync_page_offset(PyObject *module, PyObject *buf)
{
    module_state *st = get_state(module);
    pinned pin;
    uintptr_t head;

    if (pin_buffer(st, buf, &pin) < 0)
        return NULL;
    head = (uintptr_t)pin.view.buf & ((uintptr_t)st->pagesize - 1);
    unpin_buffer(&pin);
    return PyLong_FromSize_t((size_t)head);
}

static PyMethodDef msync_methods[] = {
    {"flush", (PyCFunction)(void (*)(void))msync_flush,
     METH_FASTCALL | METH_KEYWORDS, flush_doc},
    {"flush_batch", (PyCFunction)(void (*)(void))msync_flush_batch,
     METH_FASTCALL, flush_batch_doc},
    {"batch_runs", (PyCFunction)(void (*)(void))msync_batch_runs,
     METH_FASTCALL, batch_runs_doc},
    {"clear_writeback_error", msync_clear_writeback_error, METH_O,
     clear_writeback_error_doc},
    {"_set_writeback_error", msync_set_writeback_error, METH_O,
     set_writeback_error_doc},
    {"page_offset", msync_page_offset, METH_O, page_offset_doc},
    {NULL, NULL, 0, NULL}
};

static int
msync_exec(PyObject *module)
{
    module_state *st = get_state(module);
    long pagesize = sysconf(_SC_PAGESIZE);
    PyObject *mmap_module, *flags;
    int i;

    /* pages_covering masks with pagesize - 1, so it must be a power of 2. */
    if (pagesize <= 0 || (pagesize & (pagesize - 1)) != 0) {
        PyErr_Format(PyExc_RuntimeError,
                     "sysconf(_SC_PAGESIZE) gave %ld, not a power of two",
                     pagesize);
        return -1;
    }
    st->pagesize = (Py_ssize_t)pagesize;
    mmap_module = PyImport_ImportModule("mmap");
    if (mmap_module == NULL)
        return -1;
    st->mmap_type = PyObject_GetAttrString(mmap_module, "mmap");
    Py_DECREF(mmap_module);
    if (st->mmap_type == NULL)
        return -1;
    flags = PyTuple_New(N_VALID_FLAGS);
    if (flags == NULL)
        return -1;
    for (i = 0; i < N_VALID_FLAGS; i++) {
        PyObject *value = PyLong_FromLong(valid_flags[i]);
        if (value == NULL || PyTuple_SetItem(flags, i, value) < 0) {
            Py_DECREF(flags);
            return -1;
        }
    }
    if (PyModule_AddObject(module, "VALID_FLAGS", flags) < 0) {
        Py_DECREF(flags);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "PAGESIZE", pagesize) < 0
        || PyModule_AddIntConstant(module, "MS_SYNC", MS_SYNC) < 0
        || PyModule_AddIntConstant(module, "MS_ASYNC", MS_ASYNC) < 0
        || PyModule_AddIntConstant(module, "MS_INVALIDATE", MS_INVALIDATE) < 0
        || PyModule_AddStringConstant(module, "BUILD_MODE",
                                      MSYNCEXT_BUILD_MODE) < 0)
        return -1;
    return 0;
}

static int
msync_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = get_state(module);
    if (st != NULL) {
        Py_VISIT(st->mmap_type);
        Py_VISIT(st->writeback_error);
    }
    return 0;
}

static int
msync_clear(PyObject *module)
{
    module_state *st = get_state(module);
    if (st != NULL) {
        Py_CLEAR(st->mmap_type);
        Py_CLEAR(st->writeback_error);
    }
    return 0;
}

static void
msync_free(void *module)
{
    msync_clear((PyObject *)module);
}

/* The slots. Py_mod_multiple_interpreters (3.12) and Py_mod_gil (3.13) are
 * not in the 3.11 limited API, yet an abi3 module built against it must
 * declare them when it runs on 3.12+, or isolated subinterpreters refuse
 * it. Their numbers and values are part of the stable ABI, so they are
 * given here and added at run time when Py_Version says the interpreter
 * knows them (3.11 rejects unknown slots). 3.15's headers give them new
 * numbers, and 3.15 still accepts the old ones. */
/* Keyed on the value macros: 3.15's headers define the slot numbers at
 * every limited-API level, their values only from the level that added
 * them. */
#if defined(Py_MOD_PER_INTERPRETER_GIL_SUPPORTED)
#define SLOT_MULTIPLE_INTERPRETERS Py_mod_multiple_interpreters
#define PER_INTERPRETER_GIL_SUPPORTED Py_MOD_PER_INTERPRETER_GIL_SUPPORTED
#else
#define SLOT_MULTIPLE_INTERPRETERS 3  /* its stable-ABI number, from 3.12 */
#define PER_INTERPRETER_GIL_SUPPORTED ((void *)2)
#endif
#if defined(Py_MOD_GIL_NOT_USED)
#define SLOT_GIL Py_mod_gil
#define GIL_NOT_USED Py_MOD_GIL_NOT_USED
#else
#define SLOT_GIL 4  /* its stable-ABI number, from 3.13 */
#define GIL_NOT_USED ((void *)1)
#endif

static PyModuleDef_Slot msync_slots[4] = {
    {Py_mod_exec, msync_exec},
    {0, NULL},
    {0, NULL},
    {0, NULL},
};

/* Filled on the first PyInit; interpreters with their own GIL may import
 * at the same time, so every store is atomic (and stores the same values).
 * Not pthread_once: that would raise the wheel's glibc floor to 2.34. */
static int slots_filled;

static void
fill_slots(void)
{
    int n = 1;
    if (__atomic_load_n(&slots_filled, __ATOMIC_ACQUIRE))
        return;
    if (Py_Version >= 0x030C0000) {
        __atomic_store_n(&msync_slots[n].slot, SLOT_MULTIPLE_INTERPRETERS,
                         __ATOMIC_RELAXED);
        __atomic_store_n(&msync_slots[n].value, PER_INTERPRETER_GIL_SUPPORTED,
                         __ATOMIC_RELAXED);
        n++;
    }
    if (Py_Version >= 0x030D0000) {
        __atomic_store_n(&msync_slots[n].slot, SLOT_GIL, __ATOMIC_RELAXED);
        __atomic_store_n(&msync_slots[n].value, GIL_NOT_USED, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&slots_filled, 1, __ATOMIC_RELEASE);
}

static struct PyModuleDef msync_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "msyncext._msync",
    .m_doc = "msync(2) on Python buffers with the GIL released.",
    .m_size = sizeof(module_state),
    .m_methods = msync_methods,
    .m_slots = msync_slots,
    .m_traverse = msync_traverse,
    .m_clear = msync_clear,
    .m_free = msync_free,
};

PyMODINIT_FUNC
PyInit__msync(void)
{
    fill_slots();
    return PyModuleDef_Init(&msync_module);
}
