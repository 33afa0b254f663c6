"""What a healthy flush costs while a write-back failure is recorded.

    sudo python benchmarks/record_cost.py [--mappings 500,50000] [--calls 2000]

Needs root: it makes a failing device as the tests do (ext4 on a loop device
over a tmpfs far smaller than the filesystem, from tests/blockdev.py) and
records a real failure. Then, in a child process per mapping count, it times
``msyncext.flush`` of one page of an unrelated /dev/shm map: with nothing
recorded, with the failure recorded, and with the failure recorded while
another thread keeps flushing the failed map (the retry loop of an
application that catches the error). The process is given the number of
mappings first (anonymous one-page maps that cannot merge). Each figure is
the median of ``--calls`` flushes, in microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


def child(failing_dir: str, nmappings: int, calls: int) -> None:
    import ctypes
    import mmap
    import statistics
    import threading
    import time

    import msyncext

    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    size = 32 << 20
    fd = os.open(os.path.join(failing_dir, "big"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    failed = mmap.mmap(fd, size)
    for off in range(0, size, page):
        failed[off : off + 16] = os.urandom(16)
    # Many mappings, made after the failed map so that they are listed
    # before it in /proc/self/maps (lower addresses): one page each,
    # protections alternating so that neighbours never merge.
    for i in range(nmappings):
        prot = mmap.PROT_READ if i % 2 else mmap.PROT_READ | mmap.PROT_WRITE
        got = libc.mmap(None, page, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert got not in (None, ctypes.c_void_p(-1).value), "mmap failed"

    shm = f"/dev/shm/msyncext-record-cost-{os.getpid()}"
    hfd = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(hfd, 16 * page)
    healthy = mmap.mmap(hfd, 16 * page)
    os.unlink(shm)

    def median_us() -> float:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            msyncext.flush(healthy, 0, page)
            times.append(time.perf_counter_ns() - t0)
        return statistics.median(times) / 1000

    figures = {"nothing recorded": median_us()}

    try:
        msyncext.flush(failed)
    except OSError:
        pass
    else:
        raise SystemExit("the device did not fail: no failure to record")
    figures["a failure recorded"] = median_us()

    stop = False

    def retry() -> None:
        while not stop:
            with contextlib.suppress(OSError):
                msyncext.flush(failed)

    thread = threading.Thread(target=retry)
    thread.start()
    try:
        # The retrying thread holds the GIL between its flushes: give the
        # measuring one turns as an application would, by its own sleeps.
        times = []
        for _ in range(calls):
            time.sleep(0.0005)
            t0 = time.perf_counter_ns()
            msyncext.flush(healthy, 0, page)
            times.append(time.perf_counter_ns() - t0)
        figures["a failure recorded, its map retried"] = statistics.median(times) / 1000
    finally:
        stop = True
        thread.join()
    print(json.dumps(figures))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mappings", default="500,50000")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    import blockdev

    reason = blockdev.loop_unavailable()
    if reason is not None and "MSYNCEXT_TEST_MOUNTS" not in reason:
        sys.exit(f"record_cost.py: {reason}")
    import msyncext

    tracking = (
        msyncext._msync.writeback_tracking()
        if hasattr(msyncext._msync, "writeback_tracking")
        else "the address-range record (before 0.2)"
    )
    print(f"msyncext {msyncext.__version__} ({msyncext.__file__})")
    print(f"files told apart by: {tracking}")
    columns = ["nothing recorded", "a failure recorded", "... and its map retried"]
    print(f"| mappings | {' | '.join(columns)} |")
    print("| --- | --- | --- | --- |")
    for n in (int(x) for x in args.mappings.split(",")):
        with (
            blockdev.tmpfs("12m") as small,
            blockdev.loop_ext4(
                64, backing_dir=small, mount_options="errors=continue"
            ) as fs,
        ):
            code = (
                f"import sys; sys.path.insert(0, {str(HERE)!r}); "
                "import record_cost; record_cost.child(*sys.argv[1:2], "
                "int(sys.argv[2]), int(sys.argv[3]))"
            )
            done = subprocess.run(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    code,
                    fs.mountpoint,
                    str(n),
                    str(args.calls),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                sys.exit(f"child failed:\n{done.stdout}\n{done.stderr}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
        cells = " | ".join(f"{v:,.1f} µs" for v in figures.values())
        print(f"| {n:,} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
