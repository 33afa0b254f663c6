/*
 * Which file is mapped at an address: the mapping (VMA) that covers it,
 * with the file's device, inode and, on request, its path; and what can be
 * learnt of that file without opening it (its file handle, whether its file
 * system numbers inodes per subvolume).
 *
 * The write-back record and the write-out queue both need this, without
 * the GIL and without Python. Linux 6.11+ answers one address in about a
 * microsecond with the PROCMAP_QUERY ioctl on an open /proc/self/maps,
 * whatever the number of mappings; older kernels answer ENOTTY and the
 * file is parsed instead (O(mappings)), line by line through lines.c,
 * which never writes past its buffer whatever the kernel prints. Other
 * systems have neither.
 *
 * One descriptor of /proc/self/maps is opened when the module is first
 * loaded and kept: a failure may come when the process has no descriptor
 * left to open it (EMFILE). A descriptor of /proc/self/maps describes the
 * process that opened it, so a forked child opens its own (maps_atfork_child).
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/stat.h>

#if defined(__linux__)
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#endif

/* ------------------------------------------------------------------------
 * stat() and a close-on-exec dup(), as system calls where that is plain:
 * glibc 2.28+ (fcntl64) and 2.33+ (stat64, fstat64) version their wrappers
 * anew, and a wheel built against them would need that glibc, where the
 * wheel promises 2.17. On x86_64 and aarch64 the kernel's struct stat for
 * newfstatat is glibc's.
 */

#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__)) \
    && defined(SYS_newfstatat) && defined(SYS_fcntl)
#define RAW_STAT 1
#endif

int
stat_path(const char *path, struct stat *st)
{
#if defined(RAW_STAT)
    return syscall(SYS_newfstatat, AT_FDCWD, path, st, 0) == 0 ? 0 : errno;
#else
    return stat(path, st) == 0 ? 0 : errno;
#endif
}

int
stat_fd(int fd, struct stat *st)
{
#if defined(RAW_STAT)
    return syscall(SYS_newfstatat, fd, "", st, AT_EMPTY_PATH) == 0 ? 0 : errno;
#else
    return fstat(fd, st) == 0 ? 0 : errno;
#endif
}

int
dup_cloexec(int fd)
{
#if defined(RAW_STAT)
    return (int)syscall(SYS_fcntl, fd, F_DUPFD_CLOEXEC, 0);
#else
    return fcntl(fd, F_DUPFD_CLOEXEC, 0);
#endif
}

uint64_t
dev_key(dev_t dev)
{
#if defined(__linux__)
    return ((uint64_t)major(dev) << 32) | (uint64_t)minor(dev);
#else
    return (uint64_t)dev;
#endif
}

#if defined(__linux__)

/* Debian 12's headers predate PROCMAP_QUERY (Linux 6.11); the layout and
 * number are part of the kernel's ABI. */
struct msyncext_procmap_query {
    uint64_t size;
    uint64_t query_flags;
    uint64_t query_addr;
    uint64_t vma_start;
    uint64_t vma_end;
    uint64_t vma_flags;
    uint64_t vma_page_size;
    uint64_t vma_offset;
    uint64_t inode;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint32_t vma_name_size;
    uint32_t build_id_size;
    uint64_t vma_name_addr;
    uint64_t build_id_addr;
};
#define MSYNCEXT_PROCMAP_QUERY \
    _IOWR('f', 17, struct msyncext_procmap_query)
#define MSYNCEXT_PROCMAP_VMA_SHARED 0x08

/* memcheck cannot know that this ioctl writes the path through the pointer
 * it is given: tell it, where its header is there (a no-op outside it). */
#if defined(__has_include)
#if __has_include(<valgrind/memcheck.h>)
#include <valgrind/memcheck.h>
#define NAME_WRITTEN(buf, n) VALGRIND_MAKE_MEM_DEFINED((buf), (n))
#endif
#endif
#ifndef NAME_WRITTEN
#define NAME_WRITTEN(buf, n) ((void)(buf), (void)(n))
#endif

/* -1: not opened yet (or lost); kept across calls, reopened after fork. */
static int maps_fd = -1;
/* 1: PROCMAP_QUERY works; 0: parse; -1: not probed yet. */
static int query_works = -1;

static int
open_maps(void)
{
    return open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
}

/* What maps_fd was when opened, to tell it from a descriptor the
 * application closed and opened anew at the same number (a daemon that
 * closes every descriptor). */
static dev_t maps_fd_dev;
static ino_t maps_fd_ino;

static void
note_maps_fd(int fd)
{
    struct stat st;
    if (fd >= 0 && stat_fd(fd, &st) == 0) {
        maps_fd_dev = st.st_dev;
        maps_fd_ino = st.st_ino;
    }
}

static int
still_ours(int fd)
{
    struct stat st;
    return fd >= 0 && stat_fd(fd, &st) == 0 && st.st_dev == maps_fd_dev
           && st.st_ino == maps_fd_ino;
}

int
maps_fd_is_ours(int fd)
{
    return fd >= 0 && fd == __atomic_load_n(&maps_fd, __ATOMIC_ACQUIRE)
           && still_ours(fd);
}

static pthread_mutex_t parse_lock = PTHREAD_MUTEX_INITIALIZER;

void
maps_init(void)
{
    int fd, expected = -1;

    /* The parse is the path older kernels take; this lets the tests (and a
     * user who suspects the ioctl) take it here too. */
    if (__atomic_load_n(&query_works, __ATOMIC_RELAXED) < 0) {
        const char *no_query = getenv("MSYNCEXT_NO_PROCMAP_QUERY");
        if (no_query != NULL && strcmp(no_query, "1") == 0)
            __atomic_store_n(&query_works, 0, __ATOMIC_RELAXED);
    }

    if (__atomic_load_n(&maps_fd, __ATOMIC_ACQUIRE) >= 0)
        return;
    fd = open_maps();
    if (fd < 0)
        return;
    note_maps_fd(fd);
    if (!__atomic_compare_exchange_n(&maps_fd, &expected, fd, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        close(fd);  /* another thread was first */
}

void
maps_before_fork(void)
{
    pthread_mutex_lock(&parse_lock);
}

void
maps_after_fork_parent(void)
{
    pthread_mutex_unlock(&parse_lock);
}

void
maps_atfork_child(void)
{
    int old = __atomic_load_n(&maps_fd, __ATOMIC_RELAXED), fresh;

    pthread_mutex_init(&parse_lock, NULL);
    if (old < 0)
        return;
    /* The parent's maps, open at the same number: this child's own is
     * needed. Closed first (that frees a slot: the open cannot fail for
     * EMFILE), but only if it is still ours: a number the application
     * closed and reused is its file now, left alone. */
    if (still_ours(old))
        close(old);
    fresh = open_maps();
    note_maps_fd(fresh);
    __atomic_store_n(&maps_fd, fresh, __ATOMIC_RELEASE);
}

/* Bytes of a /proc file for lines.c, from a descriptor and a position. */
ssize_t
proc_read(void *ctx, char *dst, size_t n)
{
    proc_source *src = ctx;
    for (;;) {
        ssize_t got = pread(src->fd, dst, n, src->pos);
        if (got >= 0) {
            src->pos += got;
            return got;
        }
        if (errno != EINTR)
            return -1;
    }
}

/* Lines longer than the buffer are handed out cut: their fields all fit,
 * and a name that does not is reported as cut (never a prefix taken for
 * it). The buffer is this much more than the room the caller has for the
 * name. */
enum { PARSE_BUFFER = 8192 };

/* The parse, for kernels without PROCMAP_QUERY. A fresh descriptor, so
 * that no lock is shared between threads; if none is free, the kept one
 * under parse_lock (preads of it need no shared position, the lock only
 * keeps a reopen from closing it meanwhile). */

static int
parse_mapping_at(uintptr_t addr, mapping_info *out, char *name,
                 size_t name_size)
{
    proc_source src = {open_maps(), 0};
    int shared_fd = 0, found = 0, err = 0, rc, cut;
    line_reader reader;
    char *buf, *line;
    size_t len;

    if (src.fd < 0) {
        /* Never ENOENT, which callers take for "nothing mapped there". */
        int why = errno == ENOENT || errno == 0 ? ENOSYS : errno;
        src.fd = __atomic_load_n(&maps_fd, __ATOMIC_ACQUIRE);
        if (src.fd < 0)
            return why;
        shared_fd = 1;
        pthread_mutex_lock(&parse_lock);
    }
    buf = malloc(PARSE_BUFFER + name_size);
    if (buf == NULL) {
        err = ENOMEM;
        goto done;
    }
    line_reader_init(&reader, buf, PARSE_BUFFER + name_size, proc_read, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        maps_line m;
        if (!parse_maps_line(line, len, &m))
            continue;  /* a cut line whose fields did not fit, or garbage */
        if (addr < m.start)
            break;  /* the lines come in address order: it is not mapped */
        if (addr >= m.end)
            continue;
        out->start = m.start;
        out->end = m.end;
        out->offset = m.offset;
        out->ino = m.ino;
        out->dev = m.dev;
        out->shared = m.shared;
        out->name_cut = 0;
        /* The kernel escapes a newline in a name as "\012" and nothing
         * else, not even a backslash: a name with a backslash in it cannot
         * be read back for certain, and is not taken for a path. */
        if (name != NULL && name_size > 0
            && (cut || memchr(m.name, '\\', m.name_len) != NULL
                || m.name_len >= name_size)) {
            name[0] = '\0';
            out->name_cut = 1;
        }
        else if (name != NULL && name_size > 0) {
            memcpy(name, m.name, m.name_len);
            name[m.name_len] = '\0';
        }
        found = 1;
        break;
    }
    if (rc < 0)
        err = reader.err == ENOENT ? EIO : reader.err;
    free(buf);
done:
    if (shared_fd)
        pthread_mutex_unlock(&parse_lock);
    else
        close(src.fd);
    if (err != 0)
        return err;
    return found ? 0 : ENOENT;
}

static int
query_mapping_at(int fd, uintptr_t addr, mapping_info *out, char *name,
                 size_t name_size)
{
    struct msyncext_procmap_query q;
    int named = name != NULL && name_size > 0;

    memset(&q, 0, sizeof(q));
    q.size = sizeof(q);
    q.query_addr = (uint64_t)addr;
    if (named) {
        q.vma_name_addr = (uint64_t)(uintptr_t)name;
        q.vma_name_size = (uint32_t)(name_size > UINT32_MAX ? UINT32_MAX
                                                            : name_size);
        name[0] = '\0';
    }
    out->name_cut = 0;
    if (ioctl(fd, MSYNCEXT_PROCMAP_QUERY, &q) != 0) {
        /* The kernel writes a path into at most PATH_MAX bytes: a longer
         * one fails the whole query. The file is still the mapping's, and
         * its device and inode are had without the name. */
        if (!named || errno != ENAMETOOLONG)
            return errno;
        memset(&q, 0, sizeof(q));
        q.size = sizeof(q);
        q.query_addr = (uint64_t)addr;
        if (ioctl(fd, MSYNCEXT_PROCMAP_QUERY, &q) != 0)
            return errno;
        name[0] = '\0';
        out->name_cut = 1;
    }
    else if (named) {
        NAME_WRITTEN(name, q.vma_name_size);
        name[name_size - 1] = '\0';
    }
    out->start = (uintptr_t)q.vma_start;
    out->end = (uintptr_t)q.vma_end;
    out->offset = q.vma_offset;
    out->ino = q.inode;
    out->dev = ((uint64_t)q.dev_major << 32) | q.dev_minor;
    out->shared = (q.vma_flags & MSYNCEXT_PROCMAP_VMA_SHARED) != 0;
    return 0;
}

/* A path longer than PATH_MAX, which PROCMAP_QUERY cannot give: from the
 * parse, if the caller has room for it (a rare lookup). */
static void
long_name(uintptr_t addr, mapping_info *out, char *name, size_t name_size)
{
    mapping_info parsed;
    if (parse_mapping_at(addr, &parsed, name, name_size) == 0
        && parsed.start == out->start && parsed.dev == out->dev
        && parsed.ino == out->ino) {
        out->name_cut = parsed.name_cut;
        return;
    }
    name[0] = '\0';
    out->name_cut = 1;
}

int
mapping_at(uintptr_t addr, mapping_info *out, char *name, size_t name_size)
{
    int works = __atomic_load_n(&query_works, __ATOMIC_RELAXED);
    int fd, err, attempt;

    if (name != NULL && name_size > 0)
        name[0] = '\0';
    if (works == 0)
        return parse_mapping_at(addr, out, name, name_size);
    for (attempt = 0; attempt < 2; attempt++) {
        fd = __atomic_load_n(&maps_fd, __ATOMIC_ACQUIRE);
        if (fd < 0) {
            maps_init();
            fd = __atomic_load_n(&maps_fd, __ATOMIC_ACQUIRE);
            if (fd < 0)  /* no descriptor to be had: the parse may find one */
                return parse_mapping_at(addr, out, name, name_size);
        }
        err = query_mapping_at(fd, addr, out, name, name_size);
        if (err == 0 || err == ENOENT) {
            if (works < 0)
                __atomic_store_n(&query_works, 1, __ATOMIC_RELAXED);
            if (err == 0 && out->name_cut && name_size > 4096)
                long_name(addr, out, name, name_size);
            return err;
        }
        if ((err == ENOTTY || err == EINVAL || err == ENOSYS) && works < 0) {
            /* This kernel has no PROCMAP_QUERY (before 6.11); QEMU's user
             * mode answers ENOSYS for an ioctl it does not know. */
            __atomic_store_n(&query_works, 0, __ATOMIC_RELAXED);
            return parse_mapping_at(addr, out, name, name_size);
        }
        if (err != EBADF && err != ENOTTY)
            return err;
        /* The descriptor was closed behind our back (a child that closed
         * every descriptor, say): open another one and ask again. */
        {
            int expected = fd;
            int fresh = open_maps();
            if (fresh < 0)
                return errno == ENOENT ? ENOSYS : errno;
            note_maps_fd(fresh);
            if (!__atomic_compare_exchange_n(&maps_fd, &expected, fresh, 0,
                                             __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE))
                close(fresh);
        }
    }
    return err;
}

int
maps_can_identify(void)
{
    return 1;
}

const char *
maps_method(void)
{
    int works = __atomic_load_n(&query_works, __ATOMIC_RELAXED);
    if (works < 0) {
        mapping_info m;
        static const int probe = 0;  /* any address this module maps */
        mapping_at((uintptr_t)&probe, &m, NULL, 0);
        works = __atomic_load_n(&query_works, __ATOMIC_RELAXED);
    }
    return works == 1 ? "PROCMAP_QUERY" : "/proc/self/maps";
}

#else /* not Linux */

void
maps_init(void)
{
}

void
maps_atfork_child(void)
{
}

int
maps_fd_is_ours(int fd)
{
    (void)fd;
    return 0;
}

int
mapping_at(uintptr_t addr, mapping_info *out, char *name, size_t name_size)
{
    (void)addr;
    (void)out;
    (void)name;
    (void)name_size;
    return ENOSYS;
}

int
maps_can_identify(void)
{
    return 0;
}

const char *
maps_method(void)
{
    return "none";
}










#endif
