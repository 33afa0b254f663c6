/*
 * libFuzzer target for csrc/lines.c: the line reader and the parsers of
 * /proc/self/maps, mountinfo (whole, and the head of a cut one) and
 * /proc/locks lines, over arbitrary bytes.
 *
 * An input is a header of HEADER bytes, then the text:
 *
 *   0-1  the reader's buffer capacity, little-endian, modulo MAX_CAP + 1
 *        (0 and 1 included: the reader must refuse them);
 *   2-5  how the source answers its successive reads, cyclically, one
 *        byte each: 0 fails (-1, errno EIO, or errno 0 if byte 7 says so),
 *        255 claims one byte more than asked, 254 ends the text early
 *        (0), 1-127 gives that many bytes at most, 128-253 gives
 *        (v - 127) * 256 bytes at most;
 *   6    the unescape buffer's size (0-199 as is, 200-255: (v - 199) KiB);
 *   7    bit 0: a failing read leaves errno 0.
 *
 * Every buffer is a heap block of exactly its size, so AddressSanitizer
 * sees a byte written or read past it; the parsers get a copy of each line
 * without its NUL, so a read past the line's length is seen too. Beyond
 * memory safety the target checks what msyncext.h promises: each line lies
 * in the buffer, is NUL-terminated there, is at most cap - 1 bytes, and the
 * lines are exactly those of the bytes the source gave (the start of a
 * longer line, flagged cut); parsed fields lie within their line, in
 * order; an unescaped name fits its buffer and holds no NUL.
 *
 * Build and run: .ci/fuzz.sh (clang -fsanitize=fuzzer,address,undefined).
 */
#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { HEADER = 8, MAX_CAP = 20000 };

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "fuzz_lines.c:%d: check failed: %s\n",        \
                    __LINE__, #cond);                                      \
            abort();                                                       \
        }                                                                  \
    } while (0)

typedef struct {
    const uint8_t *text;
    size_t text_len, pos;       /* pos: bytes of text given so far */
    uint8_t plan[4];
    size_t reads;
    int errno_zero;
    int cut_short;              /* the source said "end" before the text's */
    const char *buf;            /* the reader's buffer, to check dst */
    size_t cap;
} source;

static ssize_t
fuzz_source(void *ctx, char *dst, size_t n)
{
    source *s = ctx;
    uint8_t step = s->plan[s->reads++ % 4];
    size_t most, give;

    /* The reader asks only for room in its buffer, leaving one byte for
     * the NUL; writing all of it lets ASan see a request past the end. It
     * never asks for nothing: 0 would read as the end of the text. */
    CHECK(dst >= s->buf && n > 0 && n <= s->cap - 1
          && (size_t)(dst - s->buf) <= s->cap - 1 - n);
    memset(dst, 0xA5, n);
    if (step == 0) {
        errno = s->errno_zero ? 0 : EIO;
        return -1;
    }
    if (step == 254 || step == 255)
        s->cut_short = s->pos < s->text_len;
    if (step == 254)
        return 0;
    if (step == 255)
        return (ssize_t)n + 1;
    most = step < 128 ? step : (size_t)(step - 127) * 256;
    give = s->text_len - s->pos;
    if (give > n)
        give = n;
    if (give > most)
        give = most;
    memcpy(dst, s->text + s->pos, give);
    s->pos += give;
    return (ssize_t)give;
}

static void
check_unescape(const char *name, size_t len, size_t dst_size)
{
    char *dst = malloc(dst_size);  /* not NULL for 0, in glibc and ASan */
    size_t n;

    CHECK(dst != NULL);
    n = unescape_name(name, len, dst, dst_size);
    if (n != (size_t)-1) {
        CHECK(dst_size > 0 && n < dst_size && n <= len);
        CHECK(dst[n] == '\0' && memchr(dst, '\0', n) == NULL);
        /* Without a backslash nothing is escaped: the name comes back. */
        if (memchr(name, '\\', len) == NULL)
            CHECK(n == len && memcmp(dst, name, len) == 0);
    }
    else if (dst_size > len && memchr(name, '\\', len) == NULL
             && memchr(name, '\0', len) == NULL) {
        CHECK(!"a plain name that fits was refused");
    }
    free(dst);
}

/* [at, at + n) lies within the line's len bytes. */
static int
within(const char *line, size_t len, const char *at, size_t n)
{
    return at >= line && at <= line + len && n <= (size_t)(line + len - at);
}

static void
check_parsers(const char *line, size_t len, size_t dst_size)
{
    /* Exactly len bytes, no NUL after them. */
    char *copy = malloc(len);
    maps_line m;
    mountinfo_line mi;
    locks_line lk;

    CHECK(copy != NULL);
    memcpy(copy, line, len);
    if (parse_maps_line(copy, len, &m)) {
        CHECK(m.start <= m.end);
        /* The name runs to the line's end. */
        CHECK(within(copy, len, m.name, m.name_len)
              && m.name + m.name_len == copy + len);
        check_unescape(m.name, m.name_len, dst_size);
    }
    else {
        check_unescape(copy, len, dst_size);
    }
    if (parse_mountinfo_line(copy, len, &mi)) {
        CHECK(mi.mount_id >= 0);
        /* In the line and in its order; only the super options may be
         * empty. Paths as printed go through unescape_name too. */
        CHECK(within(copy, len, mi.root, mi.root_len) && mi.root_len > 0);
        CHECK(within(copy, len, mi.mount_point, mi.mount_point_len)
              && mi.mount_point_len > 0
              && mi.mount_point >= mi.root + mi.root_len);
        CHECK(within(copy, len, mi.fstype, mi.fstype_len)
              && mi.fstype_len > 0
              && mi.fstype >= mi.mount_point + mi.mount_point_len);
        CHECK(within(copy, len, mi.super_options, mi.super_options_len)
              && mi.super_options >= mi.fstype + mi.fstype_len);
        check_unescape(mi.root, mi.root_len, dst_size);
        check_unescape(mi.mount_point, mi.mount_point_len, dst_size);
    }
    if (parse_locks_line(copy, len, &lk))
        CHECK(lk.lease == 0 || lk.lease == 1);
    {
        /* The head of a mountinfo line agrees with the whole line's. */
        int id, parent;
        uint64_t dev;
        int head = parse_mountinfo_head(copy, len, &id, &parent, &dev);
        if (parse_mountinfo_line(copy, len, &mi))
            CHECK(head && id == mi.mount_id && parent == mi.parent_id
                  && dev == mi.dev);
        if (head)
            CHECK(id >= 0 && parent >= 0);
    }
    free(copy);
}

/* The lines of the text the source gave so far, as the reader must hand
 * them out: from `at`, past the rest of a line handed out cut if
 * `skipping`. */
typedef struct {
    size_t at;
    int skipping;
} oracle;

static void
oracle_skip(oracle *o, const source *s)
{
    const uint8_t *nl;

    if (!o->skipping)
        return;
    nl = memchr(s->text + o->at, '\n', s->pos - o->at);
    o->at = nl != NULL ? (size_t)(nl + 1 - s->text) : s->pos;
    o->skipping = 0;
}

/* Check a line handed out against the text. */
static void
oracle_line(oracle *o, const source *s, const char *line, size_t len,
            int cut, size_t cap)
{
    const uint8_t *start, *nl;
    size_t have;

    if (o->skipping) {
        /* The reader found the end of the cut line before this one. */
        CHECK(memchr(s->text + o->at, '\n', s->pos - o->at) != NULL);
        oracle_skip(o, s);
    }
    CHECK(o->at < s->pos);
    start = s->text + o->at;
    nl = memchr(start, '\n', s->pos - o->at);
    have = nl != NULL ? (size_t)(nl - start) : s->pos - o->at;
    if (have > cap - 1)
        CHECK(cut);
    if (cut) {
        /* Only a line of cap - 1 bytes or more is cut. */
        CHECK(len == cap - 1 && have >= len);
        o->at += len;
        o->skipping = 1;
    }
    else {
        CHECK(len == have);
        o->at += have + (nl != NULL);
    }
    CHECK(memcmp(line, start, len) == 0);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    source s;
    line_reader r;
    char *buf;
    oracle o = {0, 0};
    size_t cap, dst_size;
    int got;

    if (size < HEADER)
        return 0;
    cap = (size_t)(data[0] | data[1] << 8) % (MAX_CAP + 1);
    dst_size = data[6] < 200 ? data[6] : (size_t)(data[6] - 199) * 1024;
    memset(&s, 0, sizeof(s));
    memcpy(s.plan, data + 2, 4);
    s.errno_zero = data[7] & 1;
    s.text = data + HEADER;
    s.text_len = size - HEADER;

    buf = malloc(cap);
    CHECK(buf != NULL);
    s.buf = buf;
    s.cap = cap;
    line_reader_init(&r, buf, cap, fuzz_source, &s);

    for (;;) {
        char *line;
        size_t len;
        int cut;

        errno = 0;
        got = line_next(&r, &line, &len, &cut);
        if (got != 1)
            break;
        CHECK(cap >= 2);
        CHECK(line >= buf && len <= cap - 1
              && (size_t)(line - buf) <= cap - 1 - len);
        CHECK(line[len] == '\0');
        CHECK(cut == 0 || cut == 1);

        oracle_line(&o, &s, line, len, cut, cap);
        check_parsers(line, len, dst_size);
    }
    if (got == 0) {
        /* Every line given was handed out (none for cap < 2). */
        if (cap >= 2) {
            /* ... and the reader read to the end of the text. */
            CHECK(s.cut_short || s.pos == s.text_len);
            oracle_skip(&o, &s);
            CHECK(o.at == s.pos);
        }
    }
    else {
        CHECK(got == -1 && cap >= 2);
        CHECK(r.err == EIO);
    }
    free(buf);
    return 0;
}
