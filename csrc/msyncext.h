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
 *   - lines.c: lines of the kernel's text files read into a fixed buffer,
 *     and the fields of /proc/self/maps, mountinfo and locks lines (no
 *     syscalls);
 *   - maps.c: which file is mapped at an address (the PROCMAP_QUERY ioctl,
 *     or a parse of /proc/self/maps);
 *   - mounts.c: the file systems around a mapped file (mountinfo, leases)
 *     and the way to the file from its own mount that touches nothing
 *     else;
 *   - writeback.c: the write-back failure record: once msync reports that
 *     write-back of a file failed, every later flush of that file raises
 *     WritebackError until the caller clears it (one record per process);
 *   - writeout.c: what MS_ASYNC asks for, write-out started now, handed to
 *     a background thread (Linux);
 *   - module.c: the syscall, the methods, constants and slots.
 *
 * Uses point one way: module.c uses all the others, batch.c uses pin.c and
 * args.c, pin.c uses args.c; writeout.c and writeback.c use mounts.c and
 * maps.c, mounts.c uses maps.c, maps.c uses lines.c, and lines.c uses
 * none.
 *
 * lines.c, maps.c, mounts.c, writeback.c and writeout.c run without the
 * GIL and use no Python API: they define MSYNCEXT_NO_PYTHON before
 * including this file and see only their own sections, which need libc
 * alone.
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
 * lines.c: lines of the kernel's text files, read into a fixed buffer and
 * parsed field by field. No system calls, no GIL needed.
 */

#include <stddef.h>
#include <sys/types.h>

/* Bytes read into dst (at most n), 0 at the end, -1 with errno set. */
typedef ssize_t (*line_source)(void *ctx, char *dst, size_t n);

typedef struct {
    char *buf;           /* the caller's, cap bytes */
    size_t cap;
    size_t start, end;   /* unread bytes */
    int eof, skipping;   /* skipping: the rest of a line handed out cut */
    int err;             /* the source's errno after line_next gave -1 */
    line_source read;
    void *ctx;
} line_reader;

void line_reader_init(line_reader *r, char *buf, size_t cap, line_source read,
                      void *ctx);
/* 1: the next line, without its newline, NUL-terminated in the buffer
 * (*len bytes, which may hold NULs; valid until the next call), *cut set
 * if the line was longer than cap - 1 bytes and only its start is given;
 * 0: no more lines; -1: the source failed (r->err). Never writes outside
 * the buffer, whatever the source gives. */
int line_next(line_reader *r, char **line, size_t *len, int *cut);

typedef struct {
    uintptr_t start, end;
    uint64_t offset, dev, ino;  /* dev: major << 32 | minor */
    int shared;
    const char *name;           /* within the line; name_len bytes */
    size_t name_len;
} maps_line;

/* A /proc/self/maps line: 1 parsed, 0 malformed. */
int parse_maps_line(const char *line, size_t len, maps_line *out);

typedef struct {
    int mount_id, parent_id;
    uint64_t dev;               /* the superblock's: major << 32 | minor */
    /* within the line, as printed (octal escapes): */
    const char *root;           /* the mount's root within its file system */
    size_t root_len;
    const char *mount_point;
    size_t mount_point_len;
    const char *fstype;
    size_t fstype_len;
    const char *super_options;  /* may be empty */
    size_t super_options_len;
} mountinfo_line;

/* A /proc/self/mountinfo line: 1 parsed, 0 malformed. */
int parse_mountinfo_line(const char *line, size_t len, mountinfo_line *out);
/* The first fields of a mountinfo line (of a line cut short, too): 1 read,
 * 0 malformed. */
int parse_mountinfo_head(const char *line, size_t len, int *mount_id,
                         int *parent_id, uint64_t *dev);

typedef struct {
    int lease;                  /* a lease or an NFS delegation */
    uint64_t dev, ino;          /* the file's superblock device and inode */
} locks_line;

/* A /proc/locks line: 1 parsed, 0 malformed (or no file named). */
int parse_locks_line(const char *line, size_t len, locks_line *out);

/* A name as the kernel printed it (octal escapes such as "\012") into a C
 * string in dst: its length, or (size_t)-1 if it does not fit or holds a
 * NUL. */
size_t unescape_name(const char *name, size_t len, char *dst,
                     size_t dst_size);

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
    int name_cut;          /* the path was asked for and could not be had
                            * whole (longer than the kernel or the buffer
                            * allows): name is "" */
} mapping_info;

void maps_init(void);
/* Whether fd is the descriptor of /proc/self/maps that maps.c keeps open
 * (on a proc mount a chroot may no longer show). */
int maps_fd_is_ours(int fd);
void maps_atfork_child(void);
/* 0 and *out filled (name too, if given: the path, "" if none or cut),
 * ENOENT if nothing is mapped at addr, another errno if it cannot be
 * told. */
int mapping_at(uintptr_t addr, mapping_info *out, char *name,
               size_t name_size);

/* A file as msyncext tells files apart: the superblock's device and the
 * inode the mappings show, and, where it could be had, the file system's
 * own handle for it (name_to_handle_at: it carries the inode's generation,
 * which a new file with a reused number does not share, and on btrfs the
 * subvolume). */
#define ID_HANDLE_MAX 128
typedef struct {
    uint64_t dev, ino;
    int handle_type;       /* -1: no handle */
    uint32_t handle_len;
    unsigned char handle[ID_HANDLE_MAX];
    int view;              /* VIEW_*: a file that may be any other */
} file_id;
enum {
    VIEW_NONE = 0,
    VIEW_OVERLAY,   /* an overlayfs view whose real file could not be
                     * found: dev and ino are the overlay's */
    VIEW_UNSHOWN,   /* on a file system no mount of this process shows
                     * (a detached mount, another namespace's) */
};

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
uint64_t dev_key(dev_t dev);

/* Before fork() and after it, in the parent and in the child (the parse's
 * lock; the child's own descriptor of its maps). */
void maps_before_fork(void);
void maps_after_fork_parent(void);

/* Bytes of a /proc file for lines.c: ctx is a proc_source. */
typedef struct {
    int fd;
    off_t pos;
} proc_source;
ssize_t proc_read(void *ctx, char *dst, size_t n);

/* ------------------------------------------------------------------------
 * mounts.c: the file systems around a mapped file, and the way to it that
 * touches nothing else. No GIL needed.
 */

/* How far device and inode numbers name one file on a file system. */
enum {
    FS_UNKNOWN = 0,   /* no mount shows the device, or its line was unread */
    FS_UNIQUE,        /* device and inode name one file while it exists */
    FS_AMBIGUOUS,     /* may name several: btrfs and bcachefs subvolumes,
                       * FUSE, SMB or 9p servers' own numbers */
    FS_OVERLAY,       /* an overlay: its own device, the real file below */
};
/* What a mount's files do when closed. */
enum { MOUNT_PLAIN = 0, MOUNT_CLOSE_WORKS, MOUNT_UNREADABLE };

typedef struct {
    int id, parent;
    uint64_t dev;       /* the superblock's */
    int kind;           /* MOUNT_*: CLOSE_WORKS for FUSE, NFS, SMB, ...;
                         * UNREADABLE: its line was too long to trust */
    int fs;             /* FS_* */
    char *point;        /* unescaped; NULL if it cannot be named */
    char *upper;        /* an overlay's upperdir (plus its root), or NULL */
} mount_entry;
typedef struct {
    mount_entry *items;
    size_t len;
} mount_table;

/* This thread's /proc/.../mountinfo: 0, or an errno (t empty). */
int mount_table_read(mount_table *t);
/* The same through a descriptor of it kept open (mount_table_open: poll()
 * says POLLPRI once the mounts change), read from its start. */
int mount_table_open(void);
int mount_table_read_fd(int fd, mount_table *t);
void mount_table_free(mount_table *t);
/* The mount a mapping of device dev showing path lies on (the longest
 * point prefixing it, hidden by no other mount), or NULL; *point_len is
 * the length of its point within path (0 for "/"). */
const mount_entry *mount_of_path(const mount_table *t, uint64_t dev,
                                 const char *path, size_t *point_len);
/* FS_* of the file system on superblock device dev (remembered 1 s). */
int fs_kind(uint64_t dev);
void mounts_before_fork(void);
void mounts_after_fork_parent(void);
void mounts_atfork_child(void);
/* path opened O_PATH | O_NOFOLLOW from the root of its mount (as above),
 * never leaving it, following no symlink: a descriptor, or -1 with errno
 * (EXDEV: another mount on the way, or FUSE, NFS, SMB when walk_servers is
 * 0: a server that no longer answers would hang the walk). *on (if given)
 * is the mount. */
int open_on_mount(const mount_table *t, uint64_t dev, const char *path,
                  int walk_servers, const mount_entry **on);
/* The handle of the regular file (id->dev, id->ino) reached through path
 * that way: 1 and id's handle filled, else 0. */
int handle_on_mount(const char *path, file_id *id);
/* For a file mapped through an overlay (path and id as the mapping shows
 * them): 1 and *id the real file in the upper layer (its device as its own
 * mapping would show it, its handle); 0 if there is none this process can
 * reach (the view is then the file as far as it can tell); -1 if it
 * cannot be told (id unchanged). */
int resolve_view(const char *path, file_id *id);
/* The files that hold a lease or an NFS delegation, as (device, inode)
 * pairs (/proc/locks; those of this pid namespace): 0, or an errno. */
int leases_read(uint64_t **pairs, size_t *n);
/* The mount id of descriptor fd of this thread's table (fdinfo), or -1. */
int mount_id_of(int fd);

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
    WB_FAILED,      /* a recorded failure of that very file */
    WB_UNSURE,      /* a recorded failure of a file msyncext cannot tell
                     * apart from this one */
    WB_UNKNOWN,     /* a failure is recorded and the file behind the range
                     * cannot be looked up */
};

/* What a refusal is about: the entry that refuses, for the message. */
typedef struct {
    int outcome;         /* WB_* */
    int err;             /* the recorded failure's errno */
    int why;             /* WB_UNKNOWN, or an unidentified entry: the
                          * errno of the lookup that failed */
    int identified;      /* the entry names its file (dev, ino, path) */
    int view;            /* ... a view it could not see through (VIEW_*) */
    int candidate_view;  /* WB_UNSURE: this buffer's file is such a view */
    uint64_t dev, ino;
    char path[512];      /* its path at the failure, "" if none */
    int path_cut;        /* path holds only the start of a longer one */
} wb_report;

/* A failure msync reported, counted from the moment it is seen until it
 * is recorded or shown to be a bad call (lives on the caller's stack). */
typedef struct wb_pending wb_pending;
struct wb_pending {
    uintptr_t lo, hi;
    int err;
    int record;
    wb_pending *next;
};

int wb_init(void);
/* Whether an errno msync gave after msyncext's own checks is a bad call
 * (shown so) rather than a failed write-back. */
int wb_is_bad_call(uintptr_t lo, uintptr_t hi, int flags, int err);
/* What the record says of the file(s) mapped in [lo, hi): WB_*, with
 * *out describing the refusing entry. */
int wb_check(uintptr_t lo, uintptr_t hi, wb_report *out);
/* msync failed with err over [lo, hi): count it in at once (wb_begin),
 * then wb_end with record = 0 (a bad call) or 1 (a failed write-back:
 * recorded; returns the errno to report, the first of that file). */
void wb_begin(wb_pending *pending, uintptr_t lo, uintptr_t hi, int err);
int wb_end(wb_pending *pending, int record);
/* Wait until no other thread is recording a failure. */
void wb_settle(void);
/* Forget the failures of the file(s) in [lo, hi) that are certainly those
 * files, and lift the refusals of those that may be; the errno of a
 * failure forgotten (or whose very mapping was cleared), or 0. */
int wb_clear(uintptr_t lo, uintptr_t hi);

/* ------------------------------------------------------------------------
 * writeout.c: MS_ASYNC's write-out, started now. No GIL needed.
 */

/* The thread's state: none, being started (by module.c, which holds the
 * GIL that CPython's thread start needs), running, unavailable (its
 * private descriptor table was refused: nothing is started, for good) or
 * blocked (not safe to make now: tried again by the next caller). */
enum { WO_NONE = 0, WO_STARTING, WO_RUNNING, WO_UNAVAILABLE, WO_BLOCKED };

int writeout_init(void);
/* Before a call that may use the thread (with the GIL): counts the caller
 * in, so that the thread does not end meanwhile, and returns the state it
 * found. WO_NONE: the caller must start writeout_thread_main (then
 * writeout_start_failed if that fails) and, like a caller that found
 * WO_STARTING, wait for writeout_wait_started (without the GIL). */
int writeout_enter(void);
void writeout_start_failed(void);
int writeout_wait_started(void);
void writeout_thread_main(void *unused);
/* After the call (every caller of writeout_enter but WO_UNAVAILABLE's). */
void writeout_leave(void);
/* Queue the write-out of the file pages mapped at [lo, hi); *wait_for is
 * raised to the hand-over the caller should wait for (0: none). */
int writeout_start(uintptr_t lo, uintptr_t hi, unsigned long long *wait_for);
/* Wait, briefly (bounded), until that hand-over is done. */
void writeout_wait(unsigned long long batch);
/* After MADV_PAGEOUT of [lo, hi): have the thread drop what the file's
 * page cache kept of it (waiting briefly, bounded). 0 or a lookup's
 * errno. */
int writeout_drop_cached(uintptr_t lo, uintptr_t hi);
/* Wait up to seconds until everything queued is handed to the kernel. */
void writeout_drain(double seconds);
/* Requests queued, later passes pending, and a batch being handed over. */
int writeout_pending(void);
/* The state, and why it is WO_UNAVAILABLE or WO_BLOCKED. */
int writeout_state(char *why, size_t why_size);

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
    SYNC_UNSURE,     /* an earlier failure of a file msyncext cannot tell
                      * apart from this one; msync not called */
    SYNC_UNKNOWN,    /* a failure is recorded and this buffer's file cannot
                      * be looked up; msync not called */
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
