"""Declares the C extension; metadata lives in pyproject.toml.

MSYNCEXT_DEBUG=1 builds with -O0 -g3 for valgrind and gdb.
"""

import os
import sys
import sysconfig

from setuptools import Extension, setup

if sys.platform == "win32":
    sys.exit(
        "msyncext needs POSIX msync(2) (Linux, macOS, the BSDs); "
        "Windows is not supported."
    )

# The limited API is not available on free-threaded builds: those get a
# version-specific wheel, every GIL build shares one cp311-abi3 wheel.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
DEBUG = os.environ.get("MSYNCEXT_DEBUG", "") == "1"

compile_args = ["-Wall", "-Wextra", "-Werror", "-std=c11"]
if DEBUG:
    compile_args += ["-O0", "-g3"]

define_macros = [] if FREE_THREADED else [("Py_LIMITED_API", "0x030B0000")]

setup(
    ext_modules=[
        Extension(
            "msyncext._msync",
            sources=["csrc/msyncmodule.c"],
            define_macros=define_macros,
            extra_compile_args=compile_args,
            py_limited_api=not FREE_THREADED,
        )
    ],
    options={} if FREE_THREADED else {"bdist_wheel": {"py_limited_api": "cp311"}},
)
