/*
 * The write-back failure record: once msync has reported that writing a
 * file back failed, no flush of that file reports success until the caller
 * clears it.
 *
 * Linux reports a failed write-back once per open file and marks the failed
 * pages clean, so a later msync returns 0 for data that never reached the
 * device. The record is keyed on the file, not on addresses: a map can be
 * moved (mremap), shrunk, mapped twice or replaced at the same addresses,
 * and only the file behind a flush's own range decides. While anything is
 * recorded, a flush looks up the file behind its range (maps.c) and
 * compares.
 *
 * Files are told apart as the kernel tells them apart:
 *   - by the device and inode /proc/self/maps shows (the superblock's);
 *   - a failed file is held open (O_PATH) while it is recorded, so that its
 *     inode cannot be freed and its number given to a new file (ext4 does
 *     that at once);
 *   - where stat() reports another device than the superblock's (btrfs
 *     subvolumes, which number their inodes alike), the path of the
 *     mapping is stat()ed and that device compared too.
 * When the file behind a flush cannot be established, it is refused.
 *
 * No Python here: this runs without the GIL. The lock guards memory only;
 * every lookup (ioctl, stat, open) happens outside it, so a healthy flush
 * never waits for another thread's I/O. Fork-safe: the lock is taken
 * across fork(), and a child finishes the recordings that other threads
 * had under way (its maps are the same files).
 */
/* Large-file libc entry points (fopen64 on 32-bit Linux), as Python.h's
 * pyconfig.h selects for the files that include it. */
#define _FILE_OFFSET_BITS 64
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  /* sync_file_range, O_PATH, F_DUPFD_CLOEXEC */
#endif

#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <pthread.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/sysmacros.h>
#endif

#ifndef O_PATH
#define O_PATH O_RDONLY
#endif

typedef struct {
    int identified;      /* 0: which file failed is not known */
    uint64_t dev, ino;   /* as /proc/self/maps shows them */
    uint64_t st_dev;     /* as stat() shows it (same encoding); 0 unknown */
    int held_fd;         /* keeps the inode alive; -1 if it could not */
    int err;             /* the first failure's errno */
    int why;             /* not identified: why (an errno) */
    uintptr_t lo, hi;    /* the failing span: clears an unknown one */
} wb_failure;

/* A failure reported by msync and not yet in the list. It lives on the
 * recording thread's stack; a forked child finds it in its copy of the
 * memory and records it itself (that thread does not exist there). */
typedef struct wb_pending {
    uintptr_t lo, hi;
    int err;
    struct wb_pending *next;
} wb_pending;

static pthread_mutex_t wb_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wb_settled = PTHREAD_COND_INITIALIZER;
/* Entries plus recordings under way: the fast path's one load. */
int wb_count;
static wb_failure *wb_list;
static size_t wb_len, wb_cap;
static size_t wb_unknown;   /* entries with identified == 0 */
static wb_pending *wb_inflight;

enum { NAME_SIZE = 4096 + 64 };

/* ------------------------------------------------------------------------
 * Establishing a file
 */

/* The path of a mapping if it can name the file now: not an unlinked
 * file's "... (deleted)", not a pseudo-name such as "[heap]". */
static const char *
usable_path(const char *name)
{
    static const char deleted[] = " (deleted)";
    size_t n = strlen(name), s = sizeof(deleted) - 1;
    if (name[0] != '/')
        return NULL;
    if (n >= s && strcmp(name + n - s, deleted) == 0)
        return NULL;
    return name;
}

/* The stat() device of the file mapped at addr, found through the
 * mapping's path: 1 if the path still names that mapping's inode, else 0. */
static int
path_device_at(uintptr_t addr, uint64_t *st_dev)
{
    mapping_info m;
    struct stat st;
    char *name = malloc(NAME_SIZE);
    const char *path;
    int ok = 0;

    if (name == NULL)
        return 0;
    if (mapping_at(addr, &m, name, NAME_SIZE) == 0
        && (path = usable_path(name)) != NULL && stat_path(path, &st) == 0
        && (uint64_t)st.st_ino == m.ino) {
        *st_dev = dev_key(st.st_dev);
        ok = 1;
    }
    free(name);
    return ok;
}

/* Describe the file of one mapping that failed, holding it open. */
static void
identify_mapping(const mapping_info *m, const char *name, wb_failure *f)
{
    const char *path = usable_path(name);
    struct stat st;
    int fd;

    f->identified = 1;
    f->dev = m->dev;
    f->ino = m->ino;
    fd = path != NULL ? open(path, O_PATH | O_CLOEXEC) : -1;
    if (fd >= 0 && stat_fd(fd, &st) == 0 && (uint64_t)st.st_ino == m->ino) {
        f->held_fd = fd;
        f->st_dev = dev_key(st.st_dev);
        return;
    }
    if (fd >= 0)
        close(fd);
    /* No descriptor free (EMFILE), or no path: stat needs no descriptor. */
    if (path != NULL && stat_path(path, &st) == 0 && (uint64_t)st.st_ino == m->ino)
        f->st_dev = dev_key(st.st_dev);
}

/* ------------------------------------------------------------------------
 * The list (wb_lock held)
 */

static int
same_file(const wb_failure *a, const wb_failure *b)
{
    return a->identified && b->identified && a->dev == b->dev
           && a->ino == b->ino && a->st_dev == b->st_dev;
}

/* Add f, or fold it into the entry for the same file (keeping the first
 * errno). Returns the errno to report. Takes f's descriptor either way. */
static int
insert_locked(const wb_failure *f)
{
    size_t i;

    for (i = 0; i < wb_len; i++) {
        if (same_file(&wb_list[i], f)) {
            if (f->held_fd >= 0 && wb_list[i].held_fd < 0)
                wb_list[i].held_fd = f->held_fd;
            else if (f->held_fd >= 0)
                close(f->held_fd);
            return wb_list[i].err;
        }
    }
    if (wb_len == wb_cap) {
        size_t cap = wb_cap ? 2 * wb_cap : 8;
        wb_failure *grown = realloc(wb_list, cap * sizeof(*grown));
        if (grown == NULL) {
            /* No room to remember which file: the newest entry becomes an
             * unknown file, which refuses every flush (never a success). */
            if (f->held_fd >= 0)
                close(f->held_fd);
            if (wb_len == 0)
                return f->err;  /* raised now; nothing to remember it by */
            if (wb_list[wb_len - 1].identified) {
                wb_list[wb_len - 1].identified = 0;
                wb_list[wb_len - 1].why = ENOMEM;
                wb_unknown++;
            }
            return f->err;
        }
        wb_list = grown;
        wb_cap = cap;
    }
    wb_list[wb_len++] = *f;
    if (!f->identified)
        wb_unknown++;
    __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    return f->err;
}

static void
drop_locked(size_t index)
{
    if (wb_list[index].held_fd >= 0)
        close(wb_list[index].held_fd);
    if (!wb_list[index].identified)
        wb_unknown--;
    wb_list[index] = wb_list[wb_len - 1];
    wb_len--;
    __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
}

/* The errno of any entry, or 0 if there is none. */
static int
any_err_locked(void)
{
    return wb_len > 0 ? wb_list[0].err : 0;
}

/* ------------------------------------------------------------------------
 * Recording
 */

/* Record every file mapped in [lo, hi) as failed with err (msync does not
 * say which of them failed). Returns the errno to report. */
static int
record_span(uintptr_t lo, uintptr_t hi, int err)
{
    uintptr_t at = lo;
    int first = 0, rc = 0, recorded = 0;
    char *name = malloc(NAME_SIZE);

    while (name != NULL && at < hi) {
        mapping_info m;
        wb_failure f;
        int reported;

        rc = mapping_at(at, &m, name, NAME_SIZE);
        if (rc != 0)
            break;
        if (m.ino != 0 && m.shared) {
            memset(&f, 0, sizeof(f));
            f.held_fd = -1;
            f.err = err;
            f.lo = lo;
            f.hi = hi;
            identify_mapping(&m, name, &f);
            pthread_mutex_lock(&wb_lock);
            reported = insert_locked(&f);
            pthread_mutex_unlock(&wb_lock);
            if (first == 0)
                first = reported;
            recorded = 1;
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    free(name);
    if (!recorded) {
        /* The file could not be established: record the failure as an
         * unknown file, which refuses every flush until cleared. */
        wb_failure f;
        memset(&f, 0, sizeof(f));
        f.held_fd = -1;
        f.err = err;
        f.why = name == NULL ? ENOMEM : rc != 0 ? rc : ENOENT;
        f.lo = lo;
        f.hi = hi;
        pthread_mutex_lock(&wb_lock);
        first = insert_locked(&f);
        pthread_mutex_unlock(&wb_lock);
    }
    return first;
}

int
wb_record(uintptr_t lo, uintptr_t hi, int err)
{
    wb_pending pending = {lo, hi, err, NULL};
    wb_pending **at;

    /* Counted before the lookup, so that a thread whose msync of the same
     * file returned 0 meanwhile (the kernel reports a failure once) waits
     * for this record (wb_settle) instead of succeeding. */
    pthread_mutex_lock(&wb_lock);
    pending.next = wb_inflight;
    wb_inflight = &pending;
    __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&wb_lock);

    err = record_span(lo, hi, err);

    pthread_mutex_lock(&wb_lock);
    for (at = &wb_inflight; *at != NULL; at = &(*at)->next) {
        if (*at == &pending) {
            *at = pending.next;
            break;
        }
    }
    __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&wb_settled);
    pthread_mutex_unlock(&wb_lock);
    return err;
}

int
wb_record_file(uint64_t dev, uint64_t ino, int fd, int err)
{
    wb_failure f;
    struct stat st;
    int reported;

    /* A failure seen through a descriptor (the write-out thread's): the
     * file is known, and a duplicate of the descriptor holds it. */
    memset(&f, 0, sizeof(f));
    f.identified = 1;
    f.dev = dev;
    f.ino = ino;
    f.err = err;
    f.held_fd = dup_cloexec(fd);
    if (stat_fd(fd, &st) == 0 && (uint64_t)st.st_ino == ino)
        f.st_dev = dev_key(st.st_dev);
    pthread_mutex_lock(&wb_lock);
    reported = insert_locked(&f);
    pthread_mutex_unlock(&wb_lock);
    return reported;
}

void
wb_settle(void)
{
    pthread_mutex_lock(&wb_lock);
    while (wb_inflight != NULL)
        pthread_cond_wait(&wb_settled, &wb_lock);
    pthread_mutex_unlock(&wb_lock);
}

/* ------------------------------------------------------------------------
 * Checking
 */

/* What the list says of one mapping: WB_FAILED with *err, WB_CLEAN, or
 * WB_UNKNOWN when only the device stat() shows can tell (*err is then one
 * candidate's, for when even that cannot be had). */
static int
match_locked(const mapping_info *m, int *err)
{
    size_t i;
    int outcome = WB_CLEAN;

    for (i = 0; i < wb_len; i++) {
        const wb_failure *f = &wb_list[i];
        if (!f->identified || f->dev != m->dev || f->ino != m->ino)
            continue;
        *err = f->err;
        /* Where stat's device is the superblock's, device and inode name
         * one file, and the file held open cannot have given its number to
         * another. Not held, or never stat()ed: it may be a new file with
         * the old number; refused all the same (never a false success). */
        if (f->held_fd < 0 || f->st_dev == 0 || f->st_dev == f->dev)
            return WB_FAILED;
        /* Subvolumes of one btrfs share the device and number inodes
         * alike: the device stat() shows tells them apart. */
        outcome = WB_UNKNOWN;
    }
    return outcome;
}

/* The entry for the file of device, inode and stat() device, if any: its
 * errno, or 0. */
static int
match_device_locked(const mapping_info *m, uint64_t st_dev)
{
    size_t i;
    for (i = 0; i < wb_len; i++) {
        const wb_failure *f = &wb_list[i];
        if (f->identified && f->dev == m->dev && f->ino == m->ino
            && f->st_dev == st_dev)
            return f->err;
    }
    return 0;
}

int
wb_check(uintptr_t lo, uintptr_t hi, int *err, int *why)
{
    uintptr_t at = lo;

    *why = 0;
    pthread_mutex_lock(&wb_lock);
    if (wb_unknown > 0 || !maps_can_identify()) {
        /* A failure of a file that could not be established, or a platform
         * that cannot tell files apart: this flush might be of that file. */
        size_t i;
        *err = any_err_locked();
        *why = ENOSYS;
        for (i = 0; i < wb_len; i++) {
            if (!wb_list[i].identified) {
                *err = wb_list[i].err;
                *why = wb_list[i].why;
                break;
            }
        }
        pthread_mutex_unlock(&wb_lock);
        return *err != 0 ? WB_UNKNOWN : WB_CLEAN;
    }
    pthread_mutex_unlock(&wb_lock);

    while (at < hi) {
        mapping_info m;
        int rc = mapping_at(at, &m, NULL, 0);

        if (rc == ENOENT)
            break;  /* not mapped: msync says ENOMEM itself */
        if (rc != 0) {
            pthread_mutex_lock(&wb_lock);
            *err = any_err_locked();
            pthread_mutex_unlock(&wb_lock);
            *why = rc;
            return *err != 0 ? WB_UNKNOWN : WB_CLEAN;
        }
        if (m.ino != 0 && m.shared) {
            uint64_t st_dev = 0;
            int outcome, found;
            pthread_mutex_lock(&wb_lock);
            outcome = match_locked(&m, err);
            pthread_mutex_unlock(&wb_lock);
            if (outcome == WB_FAILED)
                return WB_FAILED;
            if (outcome == WB_UNKNOWN) {
                if (!path_device_at(at, &st_dev))
                    return WB_FAILED;  /* it may be that file: refuse */
                pthread_mutex_lock(&wb_lock);
                found = match_device_locked(&m, st_dev);
                pthread_mutex_unlock(&wb_lock);
                if (found != 0) {
                    *err = found;
                    return WB_FAILED;
                }
            }
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    return WB_CLEAN;
}

/* ------------------------------------------------------------------------
 * Clearing
 */

int
wb_clear(uintptr_t lo, uintptr_t hi)
{
    uintptr_t at = lo;
    int first = 0;
    size_t i;

    /* A failure of an unknown file is cleared through the span that
     * failed, or anywhere on a platform that cannot tell files apart. */
    pthread_mutex_lock(&wb_lock);
    for (i = 0; i < wb_len;) {
        wb_failure *f = &wb_list[i];
        if (!f->identified && (f->lo < hi && lo < f->hi)) {
            if (first == 0)
                first = f->err;
            drop_locked(i);
        }
        else {
            i++;
        }
    }
    pthread_mutex_unlock(&wb_lock);

    while (at < hi) {
        mapping_info m;

        if (mapping_at(at, &m, NULL, 0) != 0)
            break;
        if (m.ino != 0) {
            uint64_t st_dev = 0;
            int named = path_device_at(at, &st_dev);
            pthread_mutex_lock(&wb_lock);
            for (i = 0; i < wb_len;) {
                wb_failure *f = &wb_list[i];
                /* Where only stat's device tells files apart, an entry of
                 * another device is another file: it stays. */
                int match = f->identified && f->dev == m.dev
                            && f->ino == m.ino
                            && (f->st_dev == 0 || f->st_dev == f->dev
                                || (named && f->st_dev == st_dev));
                if (match) {
                    if (first == 0)
                        first = f->err;
                    drop_locked(i);
                }
                else {
                    i++;
                }
            }
            pthread_mutex_unlock(&wb_lock);
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    return first;
}

/* ------------------------------------------------------------------------
 * fork
 */

static void
before_fork(void)
{
    pthread_mutex_lock(&wb_lock);
}

static void
after_fork_parent(void)
{
    pthread_mutex_unlock(&wb_lock);
}

static void
after_fork_child(void)
{
    wb_pending *p;

    /* Only this thread exists now: reset the lock and condition rather
     * than unlock them, then finish the recordings other threads had under
     * way, against a descriptor of the child's own maps. */
    pthread_mutex_init(&wb_lock, NULL);
    pthread_cond_init(&wb_settled, NULL);
    maps_atfork_child();
    p = wb_inflight;
    wb_inflight = NULL;
    while (p != NULL) {
        wb_pending *next = p->next;
        record_span(p->lo, p->hi, p->err);
        __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
        p = next;
    }
}

static int wb_fork_handlers;

int
wb_init(void)
{
    int expected = 0;

    maps_init();
    if (__atomic_compare_exchange_n(&wb_fork_handlers, &expected, 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        int rc = pthread_atfork(before_fork, after_fork_parent,
                                after_fork_child);
        if (rc != 0) {
            __atomic_store_n(&wb_fork_handlers, 0, __ATOMIC_RELEASE);
            return rc;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------
 * Which errors are bad calls
 */

#if defined(__linux__)
/* Whether any mapping overlapping [lo, hi) is mlock()ed: 1, 0, or -1 if
 * /proc/self/smaps cannot say. Its header lines look like maps' lines;
 * each mapping's "VmFlags:" line holds "lo" when it is locked. */
static int
span_locked(uintptr_t lo, uintptr_t hi)
{
    char line[512];
    int inside = 0, found = -1, whole = 1;
    FILE *smaps = fopen("/proc/self/smaps", "re");

    if (smaps == NULL)
        return -1;
    while (fgets(line, sizeof(line), smaps) != NULL) {
        unsigned long start, end;
        int starts_line = whole;
        whole = strchr(line, '\n') != NULL;
        if (!starts_line)
            continue;
        if (sscanf(line, "%lx-%lx ", &start, &end) == 2
            && strchr(line, '-') < strchr(line, ' ')) {
            inside = start < hi && lo < end;
            continue;
        }
        if (strncmp(line, "VmFlags:", 8) == 0) {
            if (found < 0)
                found = 0;
            if (inside && strstr(line + 8, " lo") != NULL) {
                found = 1;
                break;
            }
        }
    }
    fclose(smaps);
    return found;
}

/* Whether every byte of [lo, hi) is mapped: 1, 0, or -1 if unknown. */
static int
span_mapped(uintptr_t lo, uintptr_t hi)
{
    uintptr_t at = lo;
    while (at < hi) {
        mapping_info m;
        int rc = mapping_at(at, &m, NULL, 0);
        if (rc == ENOENT)
            return 0;
        if (rc != 0 || m.end <= at)
            return -1;
        at = m.end;
    }
    return 1;
}
#endif

int
wb_is_bad_call(uintptr_t lo, uintptr_t hi, int flags, int err)
{
    /* msyncext has already checked what the caller controls: an aligned
     * start, valid flags, a pinned buffer. What the kernel still reports
     * is a failed write-back unless it can be shown to be one of the two
     * bad calls left: MS_INVALIDATE over locked pages (EBUSY, before any
     * write-back is tried), and a range that is not all mapped (ENOMEM).
     * The block layer and FUSE use EBUSY and ENOMEM for failed writes too. */
    int invalidate = flags == (MS_SYNC | MS_INVALIDATE)
                     || flags == (MS_ASYNC | MS_INVALIDATE);
#if defined(__linux__)
    if (err == EBUSY && invalidate)
        return span_locked(lo, hi) == 1;
    if (err == ENOMEM)
        return span_mapped(lo, hi) == 0;
    return 0;
#else
    /* No way to look here: only the documented meaning of EBUSY is taken
     * for a bad call; anything else is a failed write-back. */
    (void)lo;
    (void)hi;
    return err == EBUSY && invalidate;
#endif
}
