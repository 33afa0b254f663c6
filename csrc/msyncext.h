/*
 * msyncext's one internal header: the types and functions the C files of
 * _msync share, so each file keeps one concern and the rest static.
 *
 *   - args.c: argument conversion, and the platform's table of valid flags;
 *   - pin.c: buffers: a contiguous export of the caller's object, plus an
 *     export of the object that owns the mapping when the caller's object
 *     does not keep it mapped (numpy.memmap drops its own export of the
 *     mmap); memory that is a copy (bytes, bytearray, array.array, and
 *     views of them) refused;
 *   - batch.c: ranges: (offset, size) pairs checked, turned into covering
 *     page runs, sorted and merged (flush_ranges);
 *   - maps.c: which file is mapped at an address (the PROCMAP_QUERY ioctl,
 *     or a parse of /proc/self/maps);
 *   - writeback.c: the write-back failure record: once msync reports that
 *     write-back of a file failed, every later flush of that file raises
 *     WritebackError until the caller clears it (one record per process);
 *   - writeout.c: what MS_ASYNC asks for, write-out started now, handed to
 *     a background thread (Linux);
 *   - module.c: the syscall, the methods, constants and slots.
 *
 * Uses point one way: module.c uses all the others, batch.c uses pin.c and
 * args.c, pin.c uses args.c; writeout.c uses writeback.c and maps.c,
 * writeback.c uses maps.c, and maps.c uses none.
 *
 * maps.c, writeback.c and writeout.c run without the GIL and use no Python
 * API: they define MSYNCEXT_NO_PYTHON before including this file and see
 * only their own sections, which need libc alone.
 */
#ifndef MSYNCEXT_H
#define MSYNCEXT_H

#ifndef MSYNCEXT_NO_PYTHON
/* Before any system header: Python.h may set feature macros. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <stdint.h>

/* Only PyInit__msync leaves the .so (setup.py passes -fvisibility=hidden);
 * declaring the rest hidden lets the compiler reach them directly, as it
 * did when they were static, instead of through the GOT. */
#if defined(__GNUC__)
#pragma GCC visibility push(hidden)
#endif

/* ------------------------------------------------------------------------
 * maps.c: which file is mapped at an address. No GIL needed.
 */

#include <stddef.h>

typedef struct {
    uintptr_t start, end;  /* the mapping (VMA) covering the address */
    uint64_t offset;       /* the file offset of start */
    uint64_t dev, ino;     /* the superblock's device (major << 32 | minor)
                            * and the inode; ino 0: no file */
    int shared;            /* MAP_SHARED */
} mapping_info;

void maps_init(void);
void maps_atfork_child(void);
/* 0 and *out filled (name too, if given: the path, "" if none), ENOENT if
 * nothing is mapped at addr, another errno if it cannot be told. */
int mapping_at(uintptr_t addr, mapping_info *out, char *name,
               size_t name_size);
/* 1 where mapping_at can tell files apart (Linux), else 0. */
int maps_can_identify(void);
/* How: "PROCMAP_QUERY", "/proc/self/maps" (parsed), or "none". */
const char *maps_method(void);
/* stat() of a path or a descriptor: 0 or an errno. */
struct stat;
int stat_path(const char *path, struct stat *st);
int stat_fd(int fd, struct stat *st);
/* A close-on-exec duplicate of fd, or -1. */
int dup_cloexec(int fd);
/* A device number as maps.c states devices: major << 32 | minor. */
#include <sys/types.h>
uint64_t dev_key(dev_t dev);

/* ------------------------------------------------------------------------
 * writeback.c: the write-back failure record. No GIL needed.
 */

/* Failures recorded plus failures being recorded; read without the lock. */
extern int wb_count;

/* Whether any failure is recorded or being recorded: the cheap test before
 * wb_check on every msync. */
static inline int
wb_any(void)
{
    return __atomic_load_n(&wb_count, __ATOMIC_ACQUIRE) != 0;
}

enum {
    WB_CLEAN = 0,   /* no failure of the file(s) in the range */
    WB_FAILED,      /* a recorded failure of that file */
    WB_UNKNOWN,     /* a failure is recorded and the file cannot be told */
};

int wb_init(void);
/* Whether an errno msync gave after msyncext's own checks is a bad call
 * (shown so) rather than a failed write-back. */
int wb_is_bad_call(uintptr_t lo, uintptr_t hi, int flags, int err);
/* WB_*; *err the recorded errno, *why the lookup's errno for WB_UNKNOWN. */
int wb_check(uintptr_t lo, uintptr_t hi, int *err, int *why);
/* Record the failure msync reported over [lo, hi); returns the errno to
 * report (the first recorded for that file). */
int wb_record(uintptr_t lo, uintptr_t hi, int err);
/* The same for a failure seen through a descriptor of the file. */
int wb_record_file(uint64_t dev, uint64_t ino, int fd, int err);
/* Wait until no other thread is recording a failure. */
void wb_settle(void);
/* Forget the failures of the file(s) in [lo, hi); the first errno or 0. */
int wb_clear(uintptr_t lo, uintptr_t hi);

/* ------------------------------------------------------------------------
 * writeout.c: MS_ASYNC's write-out, started now. No GIL needed.
 */

int writeout_init(void);
/* Start writing back the file pages mapped at [lo, hi), without waiting. */
int writeout_start(uintptr_t lo, uintptr_t hi);
/* Wait up to seconds until everything queued is handed to the kernel. */
void writeout_drain(double seconds);
int writeout_thread_running(void);
/* After MADV_PAGEOUT of [lo, hi): drop what the file's page cache kept of
 * it; *left is how many of its pages are still cached (-1: unknown). 0 or
 * an errno. */
int writeout_drop_cached(uintptr_t lo, uintptr_t hi, long long *left);
/* The thread is started by module.c with CPython's thread API (under the
 * GIL): 1 if the caller should start writeout_thread_main now; if that
 * fails, writeout_start_failed. Requests made while no thread runs are
 * started by the caller itself. */
int writeout_claim_start(void);
void writeout_start_failed(void);
void writeout_thread_main(void *unused);

#ifndef MSYNCEXT_NO_PYTHON

/* ------------------------------------------------------------------------
 * module.c: the module's state, and what its syscall reports.
 */

typedef struct {
    Py_ssize_t pagesize;
    PyObject *mmap_type;        /* mmap.mmap: exporting it pins the mapping */
    PyObject *writeback_error;  /* set by the Python layer; OSError before */
} module_state;

enum {
    SYNC_OK = 0,
    SYNC_FAILED,     /* msync failed: a bad call (EBUSY, ENOMEM, ...) */
    SYNC_WRITEBACK,  /* msync reported a write-back failure, now recorded */
    SYNC_REFUSED,    /* an earlier failure of this file; msync not called */
    SYNC_UNKNOWN,    /* a failure is recorded and this buffer's file cannot
                      * be told apart from it; msync not called */
};

/* ------------------------------------------------------------------------
 * args.c: flags, counts, and the messages that name them.
 */

extern const int valid_flags[];
extern const int n_valid_flags;

enum {
    COUNT_OK = 0,
    COUNT_ERROR = -1,       /* an exception is set */
    COUNT_NOT_INTEGER = 1,  /* bool, or no __index__; nothing set */
    COUNT_NEGATIVE = 2,     /* *index holds the value, for the message */
    COUNT_TOO_BIG = 3,      /* beyond Py_ssize_t; *index likewise */
};

int as_count(PyObject *obj, Py_ssize_t *out, PyObject **index);
PyObject *pair_label(Py_ssize_t index, PyObject *pair);
void reword_type_error(const char *what, Py_ssize_t index, PyObject *pair);
PyObject *type_name(PyObject *obj);
int flush_count_arg(PyObject *obj, const char *what, Py_ssize_t *out);
int to_flags(PyObject *obj, int *out);

/* ------------------------------------------------------------------------
 * pin.c: buffers, and keeping their mapping in place.
 */

typedef struct {
    Py_buffer view;   /* the caller's object, contiguous */
    Py_buffer owner;  /* the mapping's owner, when view does not pin it */
    int has_owner;
} pinned;

int pin_buffer(module_state *st, PyObject *obj, pinned *pin);
void unpin_buffer(pinned *pin);

/* ------------------------------------------------------------------------
 * batch.c: (offset, size) pairs -> sorted, merged page runs.
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

int plan_batch(module_state *st, PyObject *const *args, Py_ssize_t nargs,
               const char *fname, pinned *pin, batch *b, int *flags);

#endif /* MSYNCEXT_NO_PYTHON */

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#endif /* MSYNCEXT_H */
