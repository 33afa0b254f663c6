/*
 * Write-out started now: what MS_ASYNC means by POSIX ("initiate or
 * schedule"), made true on Linux, where msync(MS_ASYNC) does nothing at all
 * since 2.6.19 and dirty pages wait for the flusher threads (up to
 * vm.dirty_expire_centisecs, 30 s). And, for evict=True, dropping what the
 * page cache keeps of a written range.
 *
 * The rule: msyncext changes nothing that others see.
 *   - It never releases a lock the process holds. Closing ANY descriptor of
 *     a file releases all the process's POSIX record locks on it (they
 *     belong to the descriptor table), so the file is opened and closed
 *     only by one thread whose descriptor table is its own and empty
 *     (close_range(0, ~0U, CLOSE_RANGE_UNSHARE), Linux 5.9+). The kernel
 *     still copies the table's first 64 slots before closing the copies,
 *     and closing a FUSE, NFS or SMB file does work (FUSE writes it back,
 *     sends a FLUSH and clears the errors its owner's close() would
 *     report), so the table is made private only while no descriptor
 *     below 64 is on such a file system (table_copy_is_inert). Where that
 *     is refused or unsafe, nothing is started: MS_ASYNC is then the
 *     kernel's, and evict=True only pages out.
 *   - It never consumes an error that another descriptor would have seen:
 *     a failed write-back is marked seen by whoever waits for or checks it
 *     (fsync, MS_SYNC, sync_file_range with a WAIT flag), after which a
 *     descriptor opened later never hears of it. The thread only starts the
 *     write (SYNC_FILE_RANGE_WRITE, or POSIX_FADV_DONTNEED, which checks
 *     nothing); the next MS_SYNC of the file, through the map's own open
 *     file, reports a failure (and the record then refuses the file), as
 *     does anyone's fsync.
 *   - It never opens anything but the mapped regular file, and never
 *     blocks opening it. The path the mapping shows is walked from the
 *     root of the mount of the mapping's device on which it lies, with
 *     openat2(RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS): no symlink is
 *     followed and no other file system mounted on the way (a hung FUSE
 *     server's, an overlay put over a directory) is entered. The end is
 *     opened O_PATH | O_NOFOLLOW (no FIFO or device is opened), checked to
 *     be a regular file with the mapping's inode number, and only then
 *     reopened for reading through /proc/thread-self/fd, O_NONBLOCK. A
 *     file someone holds a lease or an NFS delegation on (/proc/locks) is
 *     not opened: the open would break it, and the lease holder's process
 *     is sent SIGIO. FUSE, NFS and SMB files are never walked to at all.
 *   - It holds nothing once the call or its hand-over is done: a caller
 *     waits (at most WAIT_NS) until the thread has handed its range to the
 *     kernel and closed the file again, so a map closed right after can be
 *     unmounted. A file handed over moments before (RECENT_NS: a tight
 *     loop, a writer streaming through a file) is not waited for: its
 *     request joins the next hand-over, which waits COALESCE_NS after the
 *     last one while nobody waits for it (ranges of a few MiB are written
 *     out far better than a stream of 1 MiB ones: B9's final stall was
 *     ten times longer without). Pages of the last hand-over asked for
 *     again are passed over while still under write-back of their older
 *     version, so they get further passes later (later_ns), holding
 *     nothing in between.
 *   - It leaves no thread idle: the thread (named "msyncext-wout", as `ps
 *     -L` shows) ends after IDLE_NS without work and is started again on
 *     the next request, so a process that forks later is single-threaded
 *     again (CPython 3.12+ warns at fork otherwise).
 * Every wait is a futex wait with a relative, monotonic timeout: a step of
 * the wall clock stretches no bound.
 *
 * overlayfs: a map shows the overlay's device and path, and a descriptor
 * opened there belongs to the overlay, whose page cache is empty:
 * sync_file_range on it starts nothing. overlayfs passes posix_fadvise
 * through to the real file, and POSIX_FADV_DONTNEED starts its write-out
 * (it also drops clean pages of the range that nobody maps).
 *
 * The queue holds files and offsets, never addresses: the map can be closed
 * or resized as soon as the call returns, and closing it cancels nothing.
 * One entry per file (device, inode and path: btrfs subvolumes give one
 * inode number to several files), at most QUEUE_MAX; past that a request is
 * left to the kernel's flusher. The thread never touches Python and serves
 * every interpreter of the process; a forked child has none until it asks
 * (the parent's thread writes what was queued before the fork: the same
 * files), and the queue is handed to the kernel before the process exits
 * (writeout_drain).
 */
/* Large-file libc entry points (fopen64 on 32-bit Linux), as Python.h's
 * pyconfig.h selects for the files that include it. */
#define _FILE_OFFSET_BITS 64
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  /* sync_file_range, O_PATH */
#endif

#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <pthread.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/prctl.h>
#include <sys/vfs.h>
#endif

#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE) && defined(O_PATH)
#define HAVE_WRITEOUT 1
#else
#define HAVE_WRITEOUT 0
#endif

#if HAVE_WRITEOUT

#include <linux/futex.h>
#include <limits.h>
#include <poll.h>

/* The same numbers on x86_64 and aarch64 (the generic table); headers
 * older than the calls do not name them. */
#if !defined(SYS_close_range)
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_UNSHARE
#define CLOSE_RANGE_UNSHARE (1U << 1)
#endif

/* statx(2) (Linux 4.11), which manylinux2014's headers and glibc lack: its
 * number where this file knows it, and the kernel's struct statx. */
#if !defined(SYS_statx) && defined(__x86_64__)
#define SYS_statx 332
#elif !defined(SYS_statx) && defined(__aarch64__)
#define SYS_statx 291
#endif
#define STATX_TYPE_ 0x0001U
#define AT_STATX_DONT_SYNC_ 0x4000
struct msyncext_statx {
    uint32_t mask, blksize;
    uint64_t attributes;
    uint32_t nlink, uid, gid;
    uint16_t mode, pad1;
    uint64_t ino, size, blocks, attributes_mask;
    struct {
        int64_t sec;
        uint32_t nsec;
        int32_t pad;
    } atime, btime, ctime, mtime;
    uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
    uint64_t spare[14];
};


#define QUEUE_MAX 4096
#define WAIT_NS (50 * 1000 * 1000LL)
#define RECENT_NS (5 * 1000 * 1000LL)
#define COALESCE_NS (5 * 1000 * 1000LL)
#define IDLE_NS (1000 * 1000 * 1000LL)
#define RECENT_SLOTS 64
#define THREAD_NAME "msyncext-wout"
#define PATH_SIZE (4096 + 64)
/* A file asked for again while its last write-out may still be in flight
 * gets further passes this much later (the first pass passes over pages
 * still under write-back of their older version). */
static const long long later_ns[] = {20 * 1000 * 1000LL, 200 * 1000 * 1000LL};
#define PASSES ((int)(sizeof(later_ns) / sizeof(later_ns[0])))

enum { KIND_WRITE, KIND_DROP };

typedef struct {
    uint64_t dev, ino;
    uint64_t lo, hi;       /* file offsets */
    char *path;
    int kind;
    /* KIND_WRITE: the part of the range asked for again while its last
     * hand-over may still be under write-back (its pages rewritten since
     * are passed over: passes later cover it), and the passes made of it;
     * passes_done -1: none needed. */
    uint64_t again_lo, again_hi;
    int passes_done;
    long long not_before;  /* a later pass: not before this time */
} request;

typedef struct {
    uint64_t dev, ino, path_hash;
    long long at_ns;       /* when it was last handed to the kernel, or
                            * IN_HAND while it is being handed over */
    uint64_t lo, hi;       /* the range of that hand-over */
} recent_file;
#define IN_HAND LLONG_MAX

typedef struct {
    request *items;
    size_t len, cap;
} request_list;

static pthread_mutex_t wo_lock = PTHREAD_MUTEX_INITIALIZER;
/* Waits are on this counter with futex(2): its timeouts are relative and
 * on the monotonic clock, so a step of the wall clock stretches no bound
 * (pthread_cond_timedwait takes CLOCK_REALTIME here: choosing its clock
 * would raise the wheel's glibc floor). Bumped, with wo_lock held, at
 * every change a waiter may be waiting for. */
static unsigned int wo_seq;
static request_list wo_queue;   /* to hand over now */
static request_list wo_later;   /* further passes, each not_before */
/* Batches: the thread takes the whole queue as batch taken + 1; callers
 * wait until done reaches the batch their request is in. */
static unsigned long long wo_taken, wo_done_batch;
static int wo_busy;            /* a batch is being handed over */
static int wo_urgent;          /* a caller waits for what is queued */
static int wo_users;           /* callers between enter and leave */
static int wo_state;
static char wo_why[160];       /* WO_UNAVAILABLE, WO_BLOCKED: why */
static long long wo_blocked_at; /* WO_BLOCKED: when */
static recent_file wo_recent[RECENT_SLOTS];
static size_t wo_recent_next;

/* Stores are made with wo_lock held; writeout_start reads it without. */
static void
set_state(int state)
{
    __atomic_store_n(&wo_state, state, __ATOMIC_RELEASE);
}

static long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* wo_lock held: wake every waiter. */
static void
notify_locked(void)
{
    __atomic_add_fetch(&wo_seq, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, &wo_seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Release wo_lock and sleep until a notify after `seen` was read, or until
 * (monotonic) `until`; take wo_lock again. 0, or ETIMEDOUT once past. */
static int
sleep_unlocked(unsigned int seen, long long until)
{
    long long left = until - now_ns();
    struct timespec ts;

    pthread_mutex_unlock(&wo_lock);
    if (left > 0) {
        ts.tv_sec = (time_t)(left / 1000000000LL);
        ts.tv_nsec = (long)(left % 1000000000LL);
        syscall(SYS_futex, &wo_seq, FUTEX_WAIT_PRIVATE, seen, &ts, NULL, 0);
    }
    pthread_mutex_lock(&wo_lock);
    return now_ns() >= until ? ETIMEDOUT : 0;
}

static uint64_t
path_hash(const char *path)
{
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
    for (; *path != '\0'; path++)
        h = (h ^ (unsigned char)*path) * 1099511628211ULL;
    return h;
}

static int
list_push(request_list *l, const request *r)
{
    if (l->len == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        request *grown = realloc(l->items, cap * sizeof(*grown));
        if (grown == NULL)
            return ENOMEM;
        l->items = grown;
        l->cap = cap;
    }
    l->items[l->len++] = *r;
    return 0;
}

static void
list_free(request_list *l)
{
    size_t i;
    for (i = 0; i < l->len; i++)
        free(l->items[i].path);
    free(l->items);
    l->items = NULL;
    l->len = l->cap = 0;
}

/* ------------------------------------------------------------------------
 * The thread's way to a file, in its own descriptor table
 */

/* What the thread learns of the system once a batch: the mounts, and the
 * files someone holds a lease or an NFS delegation on. */
typedef struct {
    mount_table mounts;
    int have_mounts;
    uint64_t *leases;
    size_t n_leases;
    int have_leases;
} batch_facts;

static int
under_lease(const batch_facts *facts, uint64_t dev, uint64_t ino)
{
    size_t i;
    /* Not known: opening could break one (a lease holder is sent SIGIO,
     * whose default action ends its process; an NFS client's delegation
     * is recalled). */
    if (!facts->have_leases)
        return 1;
    for (i = 0; i < facts->n_leases; i++) {
        if (facts->leases[2 * i] == dev && facts->leases[2 * i + 1] == ino)
            return 1;
    }
    return 0;
}

/* The mapped file itself, open for reading, or -1: see the rule above.
 * *stacked is set for an overlayfs view of it. */
static int
open_mapped_file(const request *r, const batch_facts *facts, int *stacked)
{
    const mount_entry *m;
    char proc_path[64];
    struct stat st;
    int where, fd = -1;

    *stacked = 0;
    if (!facts->have_mounts || under_lease(facts, r->dev, r->ino))
        return -1;
    where = open_on_mount(&facts->mounts, r->dev, r->path, 0, &m);
    if (where < 0)
        return -1;
    if (stat_fd(where, &st) == 0 && S_ISREG(st.st_mode)
        && (uint64_t)st.st_ino == r->ino) {
        *stacked = m->fs == FS_OVERLAY;
        snprintf(proc_path, sizeof(proc_path), "/proc/thread-self/fd/%d",
                 where);
        fd = open(proc_path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    }
    close(where);
    return fd;
}

static void
serve(const request *r, const batch_facts *facts)
{
    int stacked, fd = open_mapped_file(r, facts, &stacked);
    off_t lo = (off_t)r->lo, len = (off_t)(r->hi - r->lo);

    if (fd < 0)
        return;
    /* Started, never waited for or checked: see the rule above. */
    if (r->kind == KIND_DROP || stacked)
        posix_fadvise(fd, lo, len, POSIX_FADV_DONTNEED);
    else
        sync_file_range(fd, (off64_t)lo, (off64_t)len, SYNC_FILE_RANGE_WRITE);
    close(fd);
}

static void
remember_handed_over(const request *r, long long at)
{
    uint64_t hash = path_hash(r->path);
    recent_file *slot = NULL;
    size_t i;

    for (i = 0; i < RECENT_SLOTS && slot == NULL; i++) {
        if (wo_recent[i].dev == r->dev && wo_recent[i].ino == r->ino
            && wo_recent[i].path_hash == hash)
            slot = &wo_recent[i];
    }
    if (slot == NULL)
        slot = &wo_recent[wo_recent_next++ % RECENT_SLOTS];
    slot->dev = r->dev;
    slot->ino = r->ino;
    slot->path_hash = hash;
    slot->at_ns = at;
    slot->lo = r->lo;
    slot->hi = r->hi;
}

/* The file's last hand-over, if it is under way or was moments ago. */
static const recent_file *
handed_over_lately(uint64_t dev, uint64_t ino, uint64_t hash, long long now)
{
    size_t i;
    for (i = 0; i < RECENT_SLOTS; i++) {
        const recent_file *f = &wo_recent[i];
        if (f->dev == dev && f->ino == ino && f->path_hash == hash
            && f->at_ns != 0
            && (f->at_ns == IN_HAND || now - f->at_ns < RECENT_NS))
            return f;
    }
    return NULL;
}

/* Whether descriptor fd's copy in a new table may be closed without its
 * file doing work: 1 yes, 0 no (*why filled), -1 not open. */
static int
copy_is_inert(int fd, const mount_table *t, char *why, size_t why_size)
{
    char path[64], target[16];
    ssize_t got;
    int id;
    size_t i;

    snprintf(path, sizeof(path), "/proc/thread-self/fd/%d", fd);
    got = readlink(path, target, sizeof(target) - 1);
    if (got < 0)
        return errno == ENOENT ? -1 : 0;
    target[got] = '\0';
    /* Sockets, pipes, eventfds, ...: "socket:[...]", not a path; memfds
     * live on the kernel's own tmpfs. */
    if (target[0] != '/' || strncmp(target, "/memfd:", 7) == 0)
        return 1;
    /* msyncext's own /proc/self/maps, opened perhaps before a chroot that
     * no longer shows its mount: procfs, whose close does nothing. */
    if (maps_fd_is_ours(fd))
        return 1;
    id = mount_id_of(fd);
    for (i = 0; id >= 0 && i < t->len; i++) {
        if (t->items[i].id != id)
            continue;
        if (t->items[i].kind == MOUNT_PLAIN)
            return 1;
        snprintf(why, why_size,
                 "descriptor %d is on a file system whose close writes back "
                 "or notifies its server (FUSE, NFS, SMB, ...)", fd);
        return 0;
    }
    if (id < 0 && readlink(path, target, sizeof(target) - 1) < 0
        && errno == ENOENT)
        return -1;  /* closed meanwhile */
#if defined(SYS_statx)
    {
        /* A mount this table does not show: in a chroot, one of the
         * mounts outside it (the host's /dev, of a /dev/null opened before
         * the chroot). Its file's type and superblock, from the attributes
         * the kernel has cached (AT_STATX_DONT_SYNC: FUSE, NFS and SMB ask
         * no server). A device node, FIFO or socket closes through its
         * driver, whatever the file system (as on the mounts shown); a
         * file on the superblock of a mount shown is that mount's kind. */
        struct msyncext_statx sx;
        memset(&sx, 0, sizeof(sx));
        if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC_,
                    STATX_TYPE_, &sx) == 0
            && (sx.mask & STATX_TYPE_)) {
            mode_t mode = (mode_t)sx.mode;
            uint64_t dev = ((uint64_t)sx.dev_major << 32) | sx.dev_minor;
            int found = 0, plain = 1;
            if (S_ISCHR(mode) || S_ISBLK(mode) || S_ISFIFO(mode)
                || S_ISSOCK(mode))
                return 1;
            for (i = 0; i < t->len; i++) {
                if (t->items[i].dev == dev) {
                    found = 1;
                    plain = plain && t->items[i].kind == MOUNT_PLAIN;
                }
            }
            if (found && plain)
                return 1;
            if (found) {
                snprintf(why, why_size,
                         "descriptor %d is on a file system whose close "
                         "writes back or notifies its server (FUSE, NFS, "
                         "SMB, ...)", fd);
                return 0;
            }
        }
    }
#endif
    /* A mount this thread's table does not show (lazily detached, another
     * namespace's), or no descriptor left to look (EMFILE): what cannot be
     * looked at is not taken for inert. */
    snprintf(why, why_size,
             "descriptor %d is on a file system that cannot be looked at "
             "(a detached mount?)", fd);
    return 0;
}

/* Whether copying this thread's descriptor table (shared with the thread
 * that started it, and with the process) and closing the copies is inert.
 * close_range(CLOSE_RANGE_UNSHARE) copies at least the first 64 slots (the
 * kernel's smallest table) before closing them, and a close runs the
 * file's flush: FUSE writes the file back, sends its server a FLUSH and
 * clears errors that the owner's close() would report; NFS and SMB write
 * back. POSIX locks are not touched (they belong to the shared table). So
 * the table is made private only if every descriptor below 64 is known to
 * be on another kind of file system. The check and the copy are not
 * atomic: a descriptor opened in between by another thread is the window.
 * 1 inert; 0 not, why filled. */
static int
table_copy_is_inert(char *why, size_t why_size)
{
    mount_table t;
    int fd, inert = 1;
    int rc = mount_table_read(&t);

    if (rc != 0) {
        snprintf(why, why_size, "the mounts cannot be read: %s",
                 strerror(rc));
        return 0;
    }
    for (fd = 0; fd < 64 && inert; fd++)
        inert = copy_is_inert(fd, &t, why, why_size) != 0;
    mount_table_free(&t);
    return inert;
}

/* Widen [*lo, *hi) (empty when *lo == *hi) to cover [lo, hi). */
static void
widen(uint64_t *to_lo, uint64_t *to_hi, uint64_t lo, uint64_t hi)
{
    if (lo >= hi)
        return;
    if (*to_lo >= *to_hi) {
        *to_lo = lo;
        *to_hi = hi;
        return;
    }
    if (lo < *to_lo)
        *to_lo = lo;
    if (hi > *to_hi)
        *to_hi = hi;
}

/* Queue one file range (wo_lock held). Returns the batch to wait for, or
 * 0. A later pass (later != 0) keeps its count of passes made. */
static unsigned long long
enqueue_locked(const request *r, long long now, int later)
{
    uint64_t hash = path_hash(r->path), again_lo = 0, again_hi = 0;
    const recent_file *last = r->kind == KIND_WRITE && !later
                                  ? handed_over_lately(r->dev, r->ino, hash,
                                                       now)
                                  : NULL;
    int passes = -1;
    request copy = *r;
    size_t i;

    if (later) {
        again_lo = r->lo;
        again_hi = r->hi;
        passes = r->passes_done;
    }
    else if (last != NULL && r->lo < last->hi && last->lo < r->hi) {
        /* Pages of the last hand-over asked for again: those rewritten
         * while under write-back are passed over now; later passes. */
        again_lo = r->lo > last->lo ? r->lo : last->lo;
        again_hi = r->hi < last->hi ? r->hi : last->hi;
        passes = 0;
    }
    for (i = 0; r->kind == KIND_WRITE && i < wo_queue.len; i++) {
        request *q = &wo_queue.items[i];
        if (q->kind == KIND_WRITE && q->dev == r->dev && q->ino == r->ino
            && strcmp(q->path, r->path) == 0) {
            /* One span per file: clean pages in a gap cost nothing to
             * write out, dirty ones would be written soon anyway. */
            widen(&q->lo, &q->hi, r->lo, r->hi);
            if (passes >= 0) {
                widen(&q->again_lo, &q->again_hi, again_lo, again_hi);
                if (q->passes_done < 0 || passes < q->passes_done)
                    q->passes_done = passes;  /* more passes left wins */
            }
            return 0;  /* the caller that queued it waits for it */
        }
    }
    if (wo_queue.len >= QUEUE_MAX)
        return 0;  /* left to the kernel's flusher */
    copy.again_lo = again_lo;
    copy.again_hi = again_hi;
    copy.passes_done = passes;
    copy.not_before = 0;
    if ((copy.path = strdup(r->path)) == NULL)
        return 0;
    if (list_push(&wo_queue, &copy) != 0) {
        free(copy.path);
        return 0;
    }
    if (last == NULL && !later)
        wo_urgent = 1;
    notify_locked();
    return last != NULL || later ? 0 : wo_taken + 1;
}

/* Move the later passes that are due into the queue (wo_lock held); the
 * time the next one falls due, or 0. */
static long long
due_later_locked(long long now)
{
    long long next = 0;
    size_t i = 0;

    while (i < wo_later.len) {
        request *r = &wo_later.items[i];
        if (r->not_before <= now) {
            enqueue_locked(r, now, 1);
            free(r->path);
            wo_later.items[i] = wo_later.items[--wo_later.len];
            continue;
        }
        if (next == 0 || r->not_before < next)
            next = r->not_before;
        i++;
    }
    return next;
}

/* Schedule a later pass over r's again range (wo_lock held), taking r's
 * path. One per file: a file handed over again meanwhile has its pass
 * moved after that hand-over (a writer that keeps rewriting gets its pass
 * once it stops). */
static void
defer_locked(request *r, long long when)
{
    size_t i;
    for (i = 0; i < wo_later.len; i++) {
        request *l = &wo_later.items[i];
        if (l->dev == r->dev && l->ino == r->ino
            && strcmp(l->path, r->path) == 0) {
            widen(&l->lo, &l->hi, r->again_lo, r->again_hi);
            if (when > l->not_before)
                l->not_before = when;
            if (r->passes_done + 1 < l->passes_done)
                l->passes_done = r->passes_done + 1;
            return;
        }
    }
    {
        request again = *r;
        again.lo = r->again_lo;
        again.hi = r->again_hi;
        again.not_before = when;
        again.passes_done = r->passes_done + 1;
        if (list_push(&wo_later, &again) == 0)
            r->path = NULL;  /* now wo_later's */
    }
}

static int
drop_first(const void *a, const void *b)
{
    const request *x = a, *y = b;
    return (y->kind == KIND_DROP) - (x->kind == KIND_DROP);
}

/* The mount table, read again only when poll() on a kept descriptor of
 * mountinfo (in this thread's own table) says the mounts changed. A table
 * gone stale in between costs nothing but a file passed over: each walk
 * checks that the mount it starts from is still the one in the table. */
typedef struct {
    int fd;
    int have;
    mount_table table;
} kept_mounts;

static void
refresh_mounts(kept_mounts *k)
{
    struct pollfd p;

    if (k->fd < 0)
        k->fd = mount_table_open();
    if (k->fd >= 0 && k->have) {
        p.fd = k->fd;
        p.events = POLLPRI;
        p.revents = 0;
        if (poll(&p, 1, 0) == 0)
            return;  /* unchanged */
    }
    if (k->have)
        mount_table_free(&k->table);
    k->have = k->fd >= 0 && mount_table_read_fd(k->fd, &k->table) == 0;
}

void
writeout_thread_main(void *unused)
{
    request_list batch = {NULL, 0, 0};
    kept_mounts mounts = {-1, 0, {NULL, 0}};
    size_t i;
    unsigned long long number;
    long long idle_since;

    (void)unused;
    {
        /* Signals are the interpreter's main thread's business. */
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, NULL);
    }
    prctl(PR_SET_NAME, THREAD_NAME, 0, 0, 0);
    {
        char why[160];
        int state = WO_RUNNING;
        if (!table_copy_is_inert(why, sizeof(why))) {
            state = WO_BLOCKED;  /* tried again by the next thread */
        }
        /* A table of its own, empty. The thread that started this one
         * waits for the answer, so the process's table is shared at this
         * moment: a table nobody else shares would have its descriptors
         * closed in place. */
        else if (syscall(SYS_close_range, 0U, ~0U, CLOSE_RANGE_UNSHARE)
                 != 0) {
            int err = errno;
            snprintf(why, sizeof(why),
                     "close_range(CLOSE_RANGE_UNSHARE) was refused: %s",
                     strerror(err));
            /* Refused (seccomp, a kernel before 5.9): for good. Out of
             * memory: the next request tries again. */
            state = err == ENOMEM ? WO_BLOCKED : WO_UNAVAILABLE;
        }
        if (state != WO_RUNNING) {
            pthread_mutex_lock(&wo_lock);
            wo_blocked_at = now_ns();
            snprintf(wo_why, sizeof(wo_why), "%s", why);
            set_state(state);
            notify_locked();
            pthread_mutex_unlock(&wo_lock);
            return;
        }
    }

    pthread_mutex_lock(&wo_lock);
    set_state(WO_RUNNING);
    notify_locked();
    idle_since = now_ns();
    for (;;) {
        batch_facts facts;
        long long now = now_ns(), next = due_later_locked(now);

        if (wo_queue.len == 0) {
            unsigned int seen = wo_seq;
            long long until = now + IDLE_NS;
            if (wo_users == 0 && next == 0 && now - idle_since >= IDLE_NS)
                break;
            if (next != 0 && next < until)
                until = next;
            sleep_unlocked(seen, until);
            continue;
        }
        /* Nobody waits for what is queued (files handed over moments ago:
         * a writer streaming through a file): let it gather for a moment
         * after the last hand-over. Ranges of a few MiB are written out
         * far better than a stream of 1 MiB ones. */
        if (!wo_urgent && now - idle_since < COALESCE_NS) {
            sleep_unlocked(wo_seq, idle_since + COALESCE_NS);
            continue;
        }
        wo_urgent = 0;
        /* Take the whole queue; callers queue anew meanwhile. */
        list_free(&batch);
        batch = wo_queue;
        wo_queue.items = NULL;
        wo_queue.len = wo_queue.cap = 0;
        number = ++wo_taken;
        wo_busy = 1;
        /* Being handed over counts as handed over lately, however long it
         * takes (a congested device): a caller asking for one of these
         * files meanwhile joins the next batch without waiting for it. */
        for (i = 0; i < batch.len; i++) {
            if (batch.items[i].kind == KIND_WRITE)
                remember_handed_over(&batch.items[i], IN_HAND);
        }
        pthread_mutex_unlock(&wo_lock);

        /* Evictions first: their callers wait for them. */
        qsort(batch.items, batch.len, sizeof(request), drop_first);
        refresh_mounts(&mounts);
        facts.mounts = mounts.table;
        facts.have_mounts = mounts.have;
        facts.have_leases
            = leases_read(&facts.leases, &facts.n_leases) == 0;
        for (i = 0; i < batch.len; i++)
            serve(&batch.items[i], &facts);
        free(facts.leases);

        pthread_mutex_lock(&wo_lock);
        idle_since = now_ns();
        for (i = 0; i < batch.len; i++) {
            request *r = &batch.items[i];
            if (r->kind != KIND_WRITE)
                continue;
            remember_handed_over(r, idle_since);
            /* Asked for again while in flight: pages still under write-back
             * of an older version were passed over; pass again later,
             * holding nothing meanwhile. */
            if (r->passes_done >= 0 && r->passes_done < PASSES
                && r->again_lo < r->again_hi)
                defer_locked(r, idle_since + later_ns[r->passes_done]);
        }
        wo_done_batch = number;
        wo_busy = 0;
        notify_locked();
    }
    /* Idle and unused: gone. The next request starts another thread. */
    set_state(WO_NONE);
    notify_locked();
    pthread_mutex_unlock(&wo_lock);
    list_free(&batch);
    if (mounts.have)
        mount_table_free(&mounts.table);
    if (mounts.fd >= 0)
        close(mounts.fd);
}

/* ------------------------------------------------------------------------
 * Callers
 */

int
writeout_enter(void)
{
    int state;
    pthread_mutex_lock(&wo_lock);
    state = wo_state;
    /* Refused for a reason that may have passed: tried again, but at most
     * once a second (each try starts a thread and reads /proc). */
    if (state == WO_BLOCKED)
        state = now_ns() - wo_blocked_at < IDLE_NS ? WO_UNAVAILABLE : WO_NONE;
    if (state != WO_UNAVAILABLE) {
        wo_users++;
        if (state == WO_NONE)
            set_state(WO_STARTING);  /* the caller starts it */
    }
    pthread_mutex_unlock(&wo_lock);
    return state;
}

void
writeout_leave(void)
{
    pthread_mutex_lock(&wo_lock);
    if (wo_users > 0 && --wo_users == 0)
        notify_locked();  /* it may go idle now */
    pthread_mutex_unlock(&wo_lock);
}

void
writeout_start_failed(void)
{
    pthread_mutex_lock(&wo_lock);
    if (wo_state == WO_STARTING)
        set_state(WO_NONE);
    notify_locked();
    pthread_mutex_unlock(&wo_lock);
}

int
writeout_wait_started(void)
{
    long long until = now_ns() + WAIT_NS;
    int state;

    pthread_mutex_lock(&wo_lock);
    while (wo_state == WO_STARTING) {
        if (sleep_unlocked(wo_seq, until) == ETIMEDOUT)
            break;
    }
    state = wo_state;
    pthread_mutex_unlock(&wo_lock);
    return state;
}

/* Call visit for each shared file mapping in [lo, hi), with the file's
 * range as a request (its path in this call's buffer) and ctx; stop at the
 * first non-zero answer and return it, or a lookup's errno. */
static int
each_file_range(uintptr_t lo, uintptr_t hi,
                int (*visit)(request *r, void *ctx), void *ctx)
{
    char *path = malloc(PATH_SIZE);
    uintptr_t at = lo;
    int rc = 0;

    if (path == NULL)
        return ENOMEM;
    while (at < hi) {
        mapping_info m;
        rc = mapping_at(at, &m, path, PATH_SIZE);
        if (rc != 0) {
            if (rc == ENOENT)
                rc = 0;
            break;
        }
        if (m.ino != 0 && m.shared && path[0] == '/') {
            uintptr_t to = hi < m.end ? hi : m.end;
            request r;
            memset(&r, 0, sizeof(r));
            r.dev = m.dev;
            r.ino = m.ino;
            r.lo = m.offset + (uint64_t)(at - m.start);
            r.hi = r.lo + (uint64_t)(to - at);
            r.path = path;
            if ((rc = visit(&r, ctx)) != 0)
                break;
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    free(path);
    return rc;
}

typedef struct {
    int kind;
    unsigned long long wait_for;
} queue_call;

static int
queue_range(request *r, void *ctx)
{
    queue_call *call = ctx;
    unsigned long long batch = 0;

    r->kind = call->kind;
    pthread_mutex_lock(&wo_lock);
    if (wo_state == WO_RUNNING)
        batch = enqueue_locked(r, now_ns(), 0);
    pthread_mutex_unlock(&wo_lock);
    if (batch > call->wait_for)
        call->wait_for = batch;
    return 0;
}

int
writeout_start(uintptr_t lo, uintptr_t hi, unsigned long long *wait_for)
{
    queue_call call = {KIND_WRITE, 0};
    int rc;

    if (__atomic_load_n(&wo_state, __ATOMIC_ACQUIRE) != WO_RUNNING)
        return 0;
    rc = each_file_range(lo, hi, queue_range, &call);
    if (call.wait_for > *wait_for)
        *wait_for = call.wait_for;
    return rc;
}

void
writeout_wait(unsigned long long batch)
{
    long long until;

    if (batch == 0)
        return;  /* nothing asked for, MS_SYNC's case: no cost */
    until = now_ns() + WAIT_NS;
    pthread_mutex_lock(&wo_lock);
    while (batch != 0 && wo_done_batch < batch && wo_state == WO_RUNNING) {
        if (sleep_unlocked(wo_seq, until) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&wo_lock);
}

int
writeout_drop_cached(uintptr_t lo, uintptr_t hi)
{
    queue_call call = {KIND_DROP, 0};
    int rc;

    if (__atomic_load_n(&wo_state, __ATOMIC_ACQUIRE) != WO_RUNNING)
        return 0;
    rc = each_file_range(lo, hi, queue_range, &call);
    writeout_wait(call.wait_for);
    return rc;
}

void
writeout_drain(double seconds)
{
    long long until = now_ns() + (long long)(seconds * 1e9);

    pthread_mutex_lock(&wo_lock);
    while (wo_state == WO_RUNNING && (wo_queue.len > 0 || wo_busy)) {
        if (sleep_unlocked(wo_seq, until) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&wo_lock);
}

int
writeout_pending(void)
{
    int n;
    pthread_mutex_lock(&wo_lock);
    n = (int)(wo_queue.len + wo_later.len) + wo_busy;
    pthread_mutex_unlock(&wo_lock);
    return n;
}

int
writeout_state(char *why, size_t why_size)
{
    int state;
    pthread_mutex_lock(&wo_lock);
    state = wo_state;
    snprintf(why, why_size, "%s", wo_why);
    pthread_mutex_unlock(&wo_lock);
    return state;
}

static void
wo_before_fork(void)
{
    pthread_mutex_lock(&wo_lock);
}

static void
wo_after_fork_parent(void)
{
    pthread_mutex_unlock(&wo_lock);
}

static void
wo_after_fork_child(void)
{
    /* The thread is not in the child, and its descriptors were in its own
     * table. What was queued is the parent's to write (the same files). A
     * refusal of the private table holds in the child too (the same
     * kernel and seccomp filter). */
    pthread_mutex_init(&wo_lock, NULL);
    list_free(&wo_queue);
    list_free(&wo_later);
    wo_taken = wo_done_batch = 0;
    wo_busy = 0;
    wo_users = 0;
    memset(wo_recent, 0, sizeof(wo_recent));
    if (wo_state != WO_UNAVAILABLE)
        set_state(WO_NONE);
}

static int wo_fork_handlers;

int
writeout_init(void)
{
    int expected = 0;
    if (__atomic_compare_exchange_n(&wo_fork_handlers, &expected, 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        int rc = pthread_atfork(wo_before_fork, wo_after_fork_parent,
                                wo_after_fork_child);
        if (rc != 0) {
            __atomic_store_n(&wo_fork_handlers, 0, __ATOMIC_RELEASE);
            return rc;
        }
    }
    return 0;
}

#else /* no sync_file_range: msync(MS_ASYNC) itself schedules the write */

int
writeout_enter(void)
{
    return WO_UNAVAILABLE;
}

void
writeout_leave(void)
{
}

void
writeout_start_failed(void)
{
}

int
writeout_wait_started(void)
{
    return WO_UNAVAILABLE;
}

int
writeout_start(uintptr_t lo, uintptr_t hi, unsigned long long *wait_for)
{
    (void)lo;
    (void)hi;
    (void)wait_for;
    return 0;
}

void
writeout_wait(unsigned long long batch)
{
    (void)batch;
}

int
writeout_drop_cached(uintptr_t lo, uintptr_t hi)
{
    (void)lo;
    (void)hi;
    return 0;
}

void
writeout_drain(double seconds)
{
    (void)seconds;
}

int
writeout_pending(void)
{
    return 0;
}

int
writeout_state(char *why, size_t why_size)
{
    snprintf(why, why_size, "%s",
             "this platform has no sync_file_range: its msync(MS_ASYNC) "
             "schedules the write itself");
    return WO_UNAVAILABLE;
}

void
writeout_thread_main(void *unused)
{
    (void)unused;
}

int
writeout_init(void)
{
    return 0;
}

#endif
