"""Write the seed corpus of fuzz_lines.c into a directory.

    python3 tests/fuzz/make_corpus.py tests/fuzz/corpus

Each input is fuzz_lines.c's 8-byte header (buffer capacity, four read
steps, unescape buffer size, flags) and then the text. The real lines come
from this process's own /proc/self/maps, while it maps files whose names
hold a space, a newline and a backslash, and one deleted, and from its
/proc/self/mountinfo: rerunning this changes them (addresses, inodes), so
rerun it only to add seeds. The rest are written out below.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import sys
import tempfile

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

FULL = 200  # a read step of (200 - 127) * 256 bytes: all that is asked for


def header(
    cap: int,
    steps: tuple[int, int, int, int] = (127, 127, 127, 127),
    unescape: int = 199,
    flags: int = 0,
) -> bytes:
    return struct.pack("<H4BBB", cap, *steps, unescape, flags)


def write(name: str, data: bytes) -> None:
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


def maps_line(name: bytes, start: str = "1000-2000", dev: str = "08:01") -> bytes:
    return f"{start} rw-s 00000000 {dev} 42 ".encode() + name + b"\n"


held = []
with tempfile.TemporaryDirectory(prefix="corpus-") as d:
    for n in ("plain", "with space", "with\nnewline", "back\\slash", "gone"):
        path = os.path.join(d, n)
        with open(path, "wb") as page:
            page.write(b"x" * mmap.PAGESIZE)
        fd = os.open(path, os.O_RDWR)
        held.append(mmap.mmap(fd, mmap.PAGESIZE))
        os.close(fd)
    os.unlink(os.path.join(d, "gone"))
    with open("/proc/self/maps", "rb") as f:
        maps = f.read()
    with open("/proc/self/mountinfo", "rb") as f:
        mountinfo = f.read()

excerpt = b"".join(
    line
    for line in maps.splitlines(keepends=True)
    if b"corpus-" in line or b"[" in line
)
write("maps-real", header(4096, (128, FULL, 64, 253)) + maps)
write("maps-excerpt", header(300, (127, 5, 127, 1)) + excerpt)
write("mountinfo-real", header(512) + mountinfo)
write(
    "mountinfo-escapes",
    header(256, (17, 3, 100, 127), 64)
    + b"36 35 98:0 /mnt1 /mnt\\040with\\040space rw,noatime master:1 - ext3"
    + b" /dev/root rw,errors=continue\n"
    + b"37 36 0:42 / /tmp/a\\011tab\\012nl\\134bs rw shared:7 - tmpfs tmpfs rw\n"
    + b"38 36 0:43 / /x rw - fuse.errfs errfs rw,user_id=0\n",
)
write(
    "mountinfo-odd",
    header(300, unescape=0)
    + b"2147483648 1 8:1 / / rw - ext4 /dev/sda1 rw\n"  # id past INT32_MAX
    + b"25 1 8:1 / / rw shared:1 master:2\n"  # no separator
    + b"26 1 8:1 / / rw -\n"  # no fstype
    + b"27 1 8:1 / / rw - \n"
    + b"28 1 4294967296:1 / / rw - ext4 x rw\n"  # major past 32 bits
    + b"29 1 8:1\n"  # no root, no mount point
    + b"30 1 8:1 / / rw - ext4\n"  # no source, no super options
    + b"31 1 8:1 / / rw - ext4 /dev/x\n",  # no super options
)

with open("/proc/locks", "rb") as f:
    locks = f.read()
write(
    "locks",
    header(128, (20, 127, 127, 127))
    + locks
    + b"1: LEASE  ACTIVE    WRITE 1234 08:01:5678 0 EOF\n"
    + b"2: DELEG  ACTIVE    READ  1235 fd:00:17 0 EOF\n"
    + b"2: -> FLOCK  ADVISORY  WRITE 99 00:2a:3 0 EOF\n"
    + b"3: POSIX  ADVISORY  WRITE 7 100000000:01:5 0 EOF\n"  # major past 32 bits
    + b"4: POSIX  ADVISORY  WRITE 7 08:01 0 EOF\n"  # no file
    + b"5: ->\n"
    + b"6 LEASE\n"
    + b"7:\n",
)

# A name longer than any buffer the reader is given here, then a short line.
long_name = b"/" + b"/".join([b"d" * 250] * 80) + b"/file"
write(
    "maps-long-name",
    header(4300, (253, 253, 127, 253)) + maps_line(long_name) + maps_line(b"/after"),
)
write(
    "maps-long-name-small-cap",
    header(64, (10, FULL, 1, 127)) + maps_line(long_name) + maps_line(b"/short"),
)
# The kernel prints a newline in a name as four bytes.
write(
    "maps-escaped-newlines",
    header(8192, (FULL, FULL, FULL, FULL), 202)
    + maps_line(b"/tmp/" + b"\\012" * 3000 + b" (deleted)"),
)
write(
    "maps-odd-numbers",
    header(200)
    + b"ffffffffffffffff-ffffffffffffffff rw-s ffffffffffffffff"
    + b" ffffffff:ffffffff 18446744073709551615 /max\n"
    + b"10000000000000000-1 rw-p 0 0:0 0\n"
    + b"2000-1000 rw-p 0 0:0 0 /backwards\n"
    + b"1000-2000 rw-p 0 0:0 0\t\t/tabs\n"
    + b"1000-2000 rwxp 0 0:0 12x /glued\n"
    + b"\n\n1000-2000 rw-p 0 0:0 0 no newline at the end",
)
write(
    "unescape-edges",
    header(100, unescape=8)
    + maps_line(b"\\000")
    + maps_line(b"\\400\\8\\")
    + maps_line(b"\\0\\01\\012\\377ok")
    + maps_line(b"1234567"),
)

# The reader's limits and each way a read can go.
write("cap-0", header(0) + b"a\nb\n")
write("cap-1", header(1) + b"a\nb\n")
write("cap-2", header(2, (1, 2, 3, 1)) + b"a\n\nbc\nd")
lines = maps_line(b"/a") * 4
write("read-fails", header(50, (5, 5, 0, 5)) + lines)
write("read-fails-errno-0", header(50, (5, 0, 5, 5), 10, 1) + b"x\n" * 10)
write("read-claims-more", header(50, (30, 255, 5, 5)) + lines)
write("read-ends-early", header(50, (30, 254, 5, 5)) + lines)

rng = random.Random(19)
alphabet = b"0123456789abcdef-: \t\n\\\x00/\xff"
garbage = bytes(rng.choice(alphabet) for _ in range(3000))
write("garbage", header(333, (7, 129, 1, 60), 31) + garbage)
write("garbage-binary", header(1000, (128, 3, 99, 1), 250) + rng.randbytes(5000))
