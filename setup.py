"""Declares the C extension; metadata lives in pyproject.toml.

Environment:
  MSYNCEXT_DEBUG=1   build with -O0 -g3 for valgrind and gdb (release
                     builds, the wheels among them, get -g0: no debug
                     information);
  MSYNCEXT_WERROR=1  make compiler warnings errors (CI and development set
                     it; a user's newer compiler must not fail their build);
  MSYNCEXT_SANITIZE=1  build with AddressSanitizer and UndefinedBehavior-
                     Sanitizer (-O1 -g; any report aborts) for .ci/sanitize.sh.
                     The module then loads only into a process that has the
                     sanitizer runtime first (LD_PRELOAD).
The extension is always recompiled, so switching MSYNCEXT_DEBUG or
MSYNCEXT_SANITIZE never reuses an object file built in another mode from
build/.
"""

import os
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

if sys.platform == "win32":
    sys.exit(
        "msyncext needs POSIX msync(2) (Linux, macOS, the BSDs); "
        "Windows is not supported."
    )

# The limited API is not available on free-threaded builds: those get a
# version-specific wheel, every GIL build shares one cp311-abi3 wheel.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
DEBUG = os.environ.get("MSYNCEXT_DEBUG", "") == "1"
WERROR = os.environ.get("MSYNCEXT_WERROR", "") == "1"
SANITIZE = os.environ.get("MSYNCEXT_SANITIZE", "") == "1"

# -fvisibility=hidden: the C files share functions, and only PyInit__msync
# (PyMODINIT_FUNC marks it visible) may leave the .so.
compile_args = ["-Wall", "-Wextra", "-std=c11", "-fvisibility=hidden"]
if WERROR:
    compile_args.append("-Werror")
link_args: list[str] = []
if SANITIZE:
    # No recovery: a report is a crash, so a test run cannot pass over one.
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    compile_args += [*sanitizers, "-fno-omit-frame-pointer"]
    link_args += sanitizers
if DEBUG:
    compile_args += ["-O0", "-g3"]
elif SANITIZE:
    # -O1 keeps the reports' stacks readable and the run fast enough.
    compile_args += ["-O1", "-g"]
else:
    # Python's own CFLAGS usually carry -g, which would ship ~80 KB of debug
    # information in every wheel; -g0 comes later on the command line and
    # wins. The symbol table stays, so backtraces still name functions.
    compile_args.append("-g0")

build_mode = "debug" if DEBUG else "release"
if SANITIZE:
    build_mode = "debug+sanitize" if DEBUG else "sanitize"
define_macros = [("MSYNCEXT_BUILD_MODE", f'"{build_mode}"')]
if not FREE_THREADED:
    define_macros.append(("Py_LIMITED_API", "0x030B0000"))


class always_build_ext(build_ext):
    """build_ext that never trusts an object left in build/ by another mode."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.force = True


setup(
    ext_modules=[
        Extension(
            "msyncext._msync",
            sources=[
                "csrc/args.c",
                "csrc/batch.c",
                "csrc/lines.c",
                "csrc/maps.c",
                "csrc/mounts.c",
                "csrc/module.c",
                "csrc/pin.c",
                "csrc/writeback.c",
                "csrc/writeout.c",
            ],
            depends=["csrc/msyncext.h"],
            define_macros=define_macros,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            py_limited_api=not FREE_THREADED,
        )
    ],
    cmdclass={"build_ext": always_build_ext},
    options={} if FREE_THREADED else {"bdist_wheel": {"py_limited_api": "cp311"}},
)
