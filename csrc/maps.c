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

/* This thread's view of the mounts (/proc/self is the main thread's, gone
 * once it exits; thread-self is Linux 3.17+). */
static int
open_mountinfo(void)
{
    int fd = open("/proc/thread-self/mountinfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
    return fd;
}

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
    if (!__atomic_compare_exchange_n(&maps_fd, &expected, fd, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        close(fd);  /* another thread was first */
}

void
maps_atfork_child(void)
{
    int old = __atomic_load_n(&maps_fd, __ATOMIC_RELAXED);
    if (old < 0)
        return;
    /* Closing first frees a slot, so the open cannot fail for EMFILE. */
    close(old);
    __atomic_store_n(&maps_fd, open_maps(), __ATOMIC_RELEASE);
}

/* Bytes of a /proc file for lines.c, from a descriptor and a position. */
typedef struct {
    int fd;
    off_t pos;
} proc_source;

static ssize_t
read_proc(void *ctx, char *dst, size_t n)
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

/* Lines longer than this are handed out cut: their fields all fit, and a
 * name that does not is reported as cut (never a prefix taken for it). */
enum { PARSE_BUFFER = 8192, PATH_SIZE = 4096 + 64 };

/* The parse, for kernels without PROCMAP_QUERY. A fresh descriptor, so
 * that no lock is shared between threads; if none is free, the kept one
 * under a lock (preads of it need no shared position, the lock only
 * keeps a reopen from closing it meanwhile). */
static pthread_mutex_t parse_lock = PTHREAD_MUTEX_INITIALIZER;

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
    buf = malloc(PARSE_BUFFER);
    if (buf == NULL) {
        err = ENOMEM;
        goto done;
    }
    line_reader_init(&reader, buf, PARSE_BUFFER, read_proc, &src);
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
        if (name != NULL && name_size > 0
            && (cut || unescape_name(m.name, m.name_len, name, name_size)
                           == (size_t)-1)) {
            name[0] = '\0';
            out->name_cut = 1;
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
            return err;
        }
        if ((err == ENOTTY || err == EINVAL) && works < 0) {
            /* This kernel has no PROCMAP_QUERY (before 6.11). */
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
            if (!__atomic_compare_exchange_n(&maps_fd, &expected, fresh, 0,
                                             __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE))
                close(fresh);
        }
    }
    return err;
}

/* ------------------------------------------------------------------------
 * What can be learnt of a mapped file without opening it
 */

/* Where the mounts say which device each file system is: the superblock's
 * device of a mount, and the type of the file system on a device. */
typedef struct {
    uint64_t dev_of_mount;   /* 0: that mount was not found */
    char fstype[32];         /* "": no mount of that device was found */
} mount_facts;

static int
read_mounts(int mount_id, uint64_t dev, mount_facts *out)
{
    proc_source src = {open_mountinfo(), 0};
    line_reader reader;
    char *buf, *line;
    size_t len;
    int cut, rc;

    out->dev_of_mount = 0;
    out->fstype[0] = '\0';
    if (src.fd < 0)
        return errno;
    buf = malloc(PARSE_BUFFER);
    if (buf == NULL) {
        close(src.fd);
        return ENOMEM;
    }
    line_reader_init(&reader, buf, PARSE_BUFFER, read_proc, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        mountinfo_line m;
        if (!parse_mountinfo_line(line, len, &m))
            continue;
        if (mount_id >= 0 && m.mount_id == mount_id)
            out->dev_of_mount = m.dev;
        if (m.dev == dev && out->fstype[0] == '\0'
            && m.fstype_len < sizeof(out->fstype)) {
            memcpy(out->fstype, m.fstype, m.fstype_len);
            out->fstype[m.fstype_len] = '\0';
        }
    }
    free(buf);
    close(src.fd);
    return rc < 0 ? reader.err : 0;
}

/* File systems whose files do work when ANY descriptor of them is closed
 * (their f_op->flush): FUSE writes the file back, waits and sends its
 * server a FLUSH (and clears the errors a later close() would report);
 * NFS, SMB, Ceph, 9p, OrangeFS, AFS and Coda write back or talk to their
 * server; eCryptfs passes the close on to the file below. */
static int
closing_does_work(const char *fstype, size_t len)
{
    static const char *const types[] = {
        "fuse", "fuseblk", "virtiofs", "nfs", "nfs4", "cifs", "smb3",
        "smbfs", "ceph", "9p", "orangefs", "afs", "coda", "ecryptfs", NULL,
    };
    size_t i;
    if (len >= 5 && memcmp(fstype, "fuse.", 5) == 0)
        return 1;  /* fuse.sshfs, fuse.errfs, ... */
    for (i = 0; types[i] != NULL; i++) {
        if (strlen(types[i]) == len && memcmp(types[i], fstype, len) == 0)
            return 1;
    }
    return 0;
}

int
mounts_closing_does_work(int *ids, size_t max, size_t *n)
{
    proc_source src = {open_mountinfo(), 0};
    line_reader reader;
    char *buf, *line;
    size_t len;
    int cut, rc;

    *n = 0;
    if (src.fd < 0)
        return errno;
    buf = malloc(PARSE_BUFFER);
    if (buf == NULL) {
        close(src.fd);
        return ENOMEM;
    }
    line_reader_init(&reader, buf, PARSE_BUFFER, read_proc, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        mountinfo_line m;
        if (parse_mountinfo_line(line, len, &m)
            && closing_does_work(m.fstype, m.fstype_len)) {
            if (*n == max) {
                rc = E2BIG;
                break;
            }
            ids[(*n)++] = m.mount_id;
        }
    }
    free(buf);
    close(src.fd);
    return rc == E2BIG ? E2BIG : rc < 0 ? reader.err : 0;
}

int
inodes_ambiguous(uint64_t dev)
{
    mount_facts facts;

    /* btrfs and bcachefs number inodes per subvolume, and every subvolume
     * shows the superblock's device in the maps. An overlay's inode
     * numbers are unique only in some configurations (one file system
     * below it, or xino). A device no mount shows (a file system mounted
     * in another namespace, an overlay's upper layer seen from a
     * container) could be any of those. */
    if (read_mounts(-1, dev, &facts) != 0 || facts.fstype[0] == '\0')
        return 1;
    return strcmp(facts.fstype, "btrfs") == 0
           || strcmp(facts.fstype, "bcachefs") == 0
           || strcmp(facts.fstype, "overlay") == 0;
}

static int
lstat_path(const char *path, struct stat *st)
{
#if defined(RAW_STAT)
    return syscall(SYS_newfstatat, AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW)
                   == 0
               ? 0
               : errno;
#else
    return lstat(path, st) == 0 ? 0 : errno;
#endif
}

typedef struct {
    struct file_handle fh;
    unsigned char bytes[ID_HANDLE_MAX];
} handle_buffer;

static int
take_handle(const char *path, handle_buffer *h, int *mount_id)
{
    h->fh.handle_bytes = ID_HANDLE_MAX;
    return name_to_handle_at(AT_FDCWD, path, &h->fh, mount_id, 0) == 0;
}

int
handle_by_path(const char *path, file_id *id)
{
    handle_buffer first, again;
    int mount_first, mount_again;
    struct stat st;

    id->handle_type = -1;
    if (path == NULL || path[0] != '/')
        return 0;
    /* Handle, stat, handle: if the path named another file in between,
     * the two handles differ. Nothing is opened (no FIFO can block, no lock
     * can be released) and a final symlink is not followed. */
    if (!take_handle(path, &first, &mount_first)
        || lstat_path(path, &st) != 0 || !take_handle(path, &again, &mount_again)
        || mount_first != mount_again
        || first.fh.handle_type != again.fh.handle_type
        || first.fh.handle_bytes != again.fh.handle_bytes
        || first.fh.handle_bytes > ID_HANDLE_MAX
        || memcmp(first.bytes, again.bytes, first.fh.handle_bytes) != 0)
        return 0;
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_ino != id->ino)
        return 0;
    /* The path must reach the mapping's inode on the mapping's superblock,
     * not a view of it (an overlay's path names the overlay's inode; its
     * handle would not be the mapped file's). stat() shows the
     * superblock's device, except on btrfs subvolumes: there the mount
     * says which superblock the path is on. */
    if (dev_key(st.st_dev) != id->dev) {
        mount_facts facts;
        if (read_mounts(mount_first, 0, &facts) != 0
            || facts.dev_of_mount != id->dev)
            return 0;
    }
    id->handle_type = first.fh.handle_type;
    id->handle_len = first.fh.handle_bytes;
    memcpy(id->handle, first.bytes, first.fh.handle_bytes);
    return 1;
}

/* ------------------------------------------------------------------------
 * overlayfs views
 *
 * A file mapped through an overlay mount shows the overlay's device and
 * path (and, with all layers on one file system, the real inode's number),
 * while the pages and their write-back belong to the real file in the
 * upper layer, which the same process may map through the upper directory
 * too. The real file is found where the overlay's mount says its upper
 * layer is: upperdir, plus the path below the mount point.
 */

typedef struct {
    uint64_t dev;
    const char *path;
    size_t best;             /* length of the longest mount point matched */
    char upper[PATH_SIZE];   /* upperdir + the mount's root, unescaped */
} view_search;

/* The value of name= among comma-separated, escaped options, unescaped into
 * dst: 1 found, 0 not. */
static int
option_value(const char *opts, size_t len, const char *name, char *dst,
             size_t dst_size)
{
    size_t name_len = strlen(name), at = 0;

    while (at < len) {
        const char *comma = memchr(opts + at, ',', len - at);
        size_t end = comma != NULL ? (size_t)(comma - opts) : len;
        if (end - at > name_len && memcmp(opts + at, name, name_len) == 0
            && opts[at + name_len] == '=')
            return unescape_name(opts + at + name_len + 1,
                                 end - at - name_len - 1, dst, dst_size)
                   != (size_t)-1;
        at = end + 1;
    }
    return 0;
}

static void
consider_overlay(view_search *v, const mountinfo_line *m)
{
    char point[PATH_SIZE], root[PATH_SIZE], upper[PATH_SIZE];
    size_t n, path_len = strlen(v->path);

    if (m->dev != v->dev || m->fstype_len != 7
        || memcmp(m->fstype, "overlay", 7) != 0)
        return;
    n = unescape_name(m->mount_point, m->mount_point_len, point, sizeof(point));
    if (n == (size_t)-1 || n > path_len || memcmp(point, v->path, n) != 0
        || (n > 1 && v->path[n] != '/' && v->path[n] != '\0'))
        return;
    if (n == 1)
        n = 0;  /* mounted at "/": the whole path is below it */
    if (n < v->best && v->best != (size_t)-1)
        return;
    if (unescape_name(m->root, m->root_len, root, sizeof(root)) == (size_t)-1
        || !option_value(m->super_options, m->super_options_len, "upperdir",
                         upper, sizeof(upper)))
        return;
    if (snprintf(v->upper, sizeof(v->upper), "%s%s", upper,
                 strcmp(root, "/") == 0 ? "" : root)
        >= (int)sizeof(v->upper))
        return;
    v->best = n;
}

int
resolve_view(const char *path, file_id *id)
{
    proc_source src = {-1, 0};
    view_search v;
    line_reader reader;
    char *buf, *line, *real;
    size_t len;
    int cut, rc, found = 0;
    struct stat st;

    if (path == NULL || path[0] != '/')
        return 0;
    v.dev = id->dev;
    v.path = path;
    v.best = (size_t)-1;
    v.upper[0] = '\0';
    src.fd = open_mountinfo();
    if (src.fd < 0)
        return 0;
    buf = malloc(PARSE_BUFFER + PATH_SIZE);
    if (buf == NULL) {
        close(src.fd);
        return 0;
    }
    real = buf + PARSE_BUFFER;
    line_reader_init(&reader, buf, PARSE_BUFFER, read_proc, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        mountinfo_line m;
        if (!cut && parse_mountinfo_line(line, len, &m))
            consider_overlay(&v, &m);
    }
    close(src.fd);
    if (rc == 0 && v.best != (size_t)-1
        && snprintf(real, PATH_SIZE, "%s%s", v.upper, path + v.best)
               < PATH_SIZE
        && lstat_path(real, &st) == 0 && S_ISREG(st.st_mode)
        && (uint64_t)st.st_ino == id->ino) {
        /* The upper file, on its own file system: its device is the one
         * its mount shows (btrfs: not stat's), its handle its own. */
        file_id upper_id;
        upper_id.dev = dev_key(st.st_dev);
        upper_id.ino = (uint64_t)st.st_ino;
        upper_id.handle_type = -1;
        upper_id.view = 0;
        found = 1;
        if (!handle_by_path(real, &upper_id)) {
            handle_buffer h;
            int mount_id;
            mount_facts facts;
            if (take_handle(real, &h, &mount_id)
                && read_mounts(mount_id, 0, &facts) == 0
                && facts.dev_of_mount != 0) {
                upper_id.dev = facts.dev_of_mount;
                handle_by_path(real, &upper_id);
            }
        }
        *id = upper_id;
    }
    free(buf);
    return found;
}

int
is_overlay(uint64_t dev)
{
    mount_facts facts;
    return read_mounts(-1, dev, &facts) == 0
           && strcmp(facts.fstype, "overlay") == 0;
}

/* ------------------------------------------------------------------------
 * The mount table and the leases, for the write-out's way to a file
 */

static int
mount_kind(const char *fstype, size_t len)
{
    if (closing_does_work(fstype, len))
        return MOUNT_CLOSE_WORKS;
    if (len == 7 && memcmp(fstype, "overlay", 7) == 0)
        return MOUNT_OVERLAY;
    if ((len == 5 && memcmp(fstype, "btrfs", 5) == 0)
        || (len == 8 && memcmp(fstype, "bcachefs", 8) == 0))
        return MOUNT_SUBVOLUMES;
    return MOUNT_PLAIN;
}

void
mount_table_free(mount_table *t)
{
    size_t i;
    for (i = 0; i < t->len; i++)
        free(t->items[i].point);
    free(t->items);
    t->items = NULL;
    t->len = 0;
}

int
mount_table_read(mount_table *t)
{
    proc_source src = {open_mountinfo(), 0};
    line_reader reader;
    char *buf, *line;
    size_t len, cap = 0;
    int cut, rc, err = 0;

    t->items = NULL;
    t->len = 0;
    if (src.fd < 0)
        return errno;
    buf = malloc(PARSE_BUFFER + PATH_SIZE);
    if (buf == NULL) {
        close(src.fd);
        return ENOMEM;
    }
    line_reader_init(&reader, buf, PARSE_BUFFER, read_proc, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        mountinfo_line m;
        mount_entry *e;
        char *point = buf + PARSE_BUFFER;
        size_t n;

        if (!parse_mountinfo_line(line, len, &m))
            continue;
        n = unescape_name(m.mount_point, m.mount_point_len, point, PATH_SIZE);
        if (t->len == cap) {
            size_t grown_cap = cap ? 2 * cap : 64;
            mount_entry *grown = realloc(t->items, grown_cap * sizeof(*grown));
            if (grown == NULL) {
                err = ENOMEM;
                break;
            }
            t->items = grown;
            cap = grown_cap;
        }
        e = &t->items[t->len];
        e->id = m.mount_id;
        e->parent = m.parent_id;
        e->dev = m.dev;
        e->kind = mount_kind(m.fstype, m.fstype_len);
        /* A line cut short or a point that cannot be a C string names no
         * place: kept (for its id and parent), never matched. */
        e->point = !cut && n != (size_t)-1 ? strdup(point) : NULL;
        if (!cut && n != (size_t)-1 && e->point == NULL) {
            err = ENOMEM;
            break;
        }
        t->len++;
    }
    if (err == 0 && rc < 0)
        err = reader.err;
    free(buf);
    close(src.fd);
    if (err != 0)
        mount_table_free(t);
    return err;
}

int
leases_read(uint64_t **pairs, size_t *n)
{
    proc_source src = {open("/proc/locks", O_RDONLY | O_CLOEXEC), 0};
    line_reader reader;
    char *buf, *line;
    size_t len, cap = 0;
    int cut, rc, err = 0;

    *pairs = NULL;
    *n = 0;
    if (src.fd < 0)
        return errno;
    buf = malloc(PARSE_BUFFER);
    if (buf == NULL) {
        close(src.fd);
        return ENOMEM;
    }
    line_reader_init(&reader, buf, PARSE_BUFFER, read_proc, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        locks_line l;
        if (!parse_locks_line(line, len, &l) || !l.lease)
            continue;
        if (*n == cap) {
            size_t grown_cap = cap ? 2 * cap : 16;
            uint64_t *grown = realloc(*pairs, grown_cap * 2 * sizeof(*grown));
            if (grown == NULL) {
                err = ENOMEM;
                break;
            }
            *pairs = grown;
            cap = grown_cap;
        }
        (*pairs)[2 * *n] = l.dev;
        (*pairs)[2 * *n + 1] = l.ino;
        (*n)++;
    }
    if (err == 0 && rc < 0)
        err = reader.err;
    free(buf);
    close(src.fd);
    if (err != 0) {
        free(*pairs);
        *pairs = NULL;
        *n = 0;
    }
    return err;
}

int
mount_id_of(int fd)
{
    char path[64], text[1024], *at;
    int info, id;
    ssize_t got;

    snprintf(path, sizeof(path), "/proc/thread-self/fdinfo/%d", fd);
    info = open(path, O_RDONLY | O_CLOEXEC);
    if (info < 0)
        return -1;
    got = read(info, text, sizeof(text) - 1);
    close(info);
    if (got <= 0)
        return -1;
    text[got] = '\0';
    at = strstr(text, "mnt_id:");
    if (at == NULL || sscanf(at + 7, "%d", &id) != 1)
        return -1;
    return id;
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

int
inodes_ambiguous(uint64_t dev)
{
    (void)dev;
    return 1;
}

int
mounts_closing_does_work(int *ids, size_t max, size_t *n)
{
    (void)ids;
    (void)max;
    *n = 0;
    return ENOSYS;
}

int
mount_table_read(mount_table *t)
{
    t->items = NULL;
    t->len = 0;
    return ENOSYS;
}

void
mount_table_free(mount_table *t)
{
    (void)t;
}

int
leases_read(uint64_t **pairs, size_t *n)
{
    *pairs = NULL;
    *n = 0;
    return ENOSYS;
}

int
mount_id_of(int fd)
{
    (void)fd;
    return -1;
}

int
handle_by_path(const char *path, file_id *id)
{
    (void)path;
    id->handle_type = -1;
    return 0;
}

int
resolve_view(const char *path, file_id *id)
{
    (void)path;
    (void)id;
    return 0;
}

int
is_overlay(uint64_t dev)
{
    (void)dev;
    return 0;
}

#endif
