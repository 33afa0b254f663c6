"""Flush parts of a numpy.memmap dataset, counting in elements, not bytes.

msyncext.flush(arr[i:j]) writes back the pages that hold elements i..j-1:
a slice of a memmap is a buffer of exactly those bytes, so there is no
offset arithmetic to get wrong. msyncext.flush(arr) covers the array's own
bytes only; arr.flush() syncs the whole mapping (for a .npy file, the
header too), and so does msyncext.flush(arr.base) with the GIL released:
for a memmap opened from a path, arr.base is its mmap.mmap.
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import numpy as np

import msyncext


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npy"
        # A .npy file: a header, then 100,000 rows of 3 float64 columns.
        arr = np.lib.format.open_memmap(
            path, mode="w+", dtype="<f8", shape=(100_000, 3)
        )

        # Fill rows 5,000..5,999 and make exactly them durable.
        arr[5_000:6_000] = np.arange(3_000, dtype="<f8").reshape(1_000, 3)
        msyncext.flush(arr[5_000:6_000])

        # A column is not contiguous: flush(arr[:, 2]) raises BufferError
        # rather than widening the range; flush the rows that hold it.
        arr[:, 2] = 1.0
        msyncext.flush(arr)  # every row: the array's bytes, not the header

        # The whole mapping, header included (what arr.flush() syncs).
        whole = arr.base
        assert isinstance(whole, mmap.mmap)  # for a memmap opened from a path
        msyncext.flush(whole)

        header = arr.offset
        print(
            f"flushed rows 5000..5999 ({arr[5_000:6_000].nbytes} bytes), "
            f"the array ({arr.nbytes} bytes), then the whole map "
            f"({len(whole)} bytes, {header}-byte header included)"
        )
        del arr, whole  # unmaps the file before the directory goes


if __name__ == "__main__":
    main()
