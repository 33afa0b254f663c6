"""Benchmarks: msyncext against what Python users call today.

    python benchmarks/run.py [--quick] [--only B1,B7] [--disk-dir DIR]
                             [--json FILE]

Runs the scenarios (one module each, b*.py beside this file) and prints every
figure; --json saves them with the machine's description for report.py.
Per-call figures (B1, the one-pair part of B8) come from pyperf, which runs
them in worker processes it spawns by running this script again; threaded
and disk scenarios time themselves in this process. Disk scenarios use
temporary files in --disk-dir (default: the current directory), the rest
/dev/shm. Run it from the repository root with the package installed: only
the installed msyncext is measured, never the source folder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

import pyperf
from common import Context, Figures

import msyncext

SCENARIOS = {
    "B1": "b1_per_call",
    "B8": "b8_ranges_overhead",
    "B2": "b2_convoy",
    "B3": "b3_threads",
    "B4": "b4_scattered",
    "B5": "b5_volume",
    "B6": "b6_max_gap",
    "B7": "b7_log",
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.abspath(msyncext.__file__).startswith(os.path.join(ROOT, "msyncext")):
    sys.exit("msyncext was imported from the source folder; pip install it first")


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="e.g. B1,B7")
    parser.add_argument("--disk-dir", default=os.curdir, help="for disk files")
    parser.add_argument("--json", help="save every figure to this file")


def worker_args(cmd: list[str], args: argparse.Namespace) -> None:
    """pyperf's workers run this script again: give them our options."""
    cmd += ["--only", args.only, "--disk-dir", args.disk_dir]
    if args.quick:
        cmd.append("--quick")


def machine(disk_dir: str) -> dict[str, Any]:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1] for ln in f if ln.startswith("model name")]
        cpu = names[0].strip() if names else cpu
    findmnt = ["findmnt", "-no", "FSTYPE,SOURCE", "--target", disk_dir]
    try:
        fs = " ".join(
            subprocess.run(findmnt, capture_output=True, text=True).stdout.split()
        )
    except OSError:
        fs = "?"
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return {
        "command": shlex.join(sys.orig_argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}"
        + ("" if gil else " free-threaded"),
        "gil_enabled": gil,
        "kernel": f"{platform.system()} {platform.release()}",
        "cpu": f"{cpu}, {os.cpu_count()} CPUs",
        "disk": f"{os.path.realpath(disk_dir)} ({fs})",
        "msyncext": msyncext.__version__,
    }


def show(name: str, figures: Figures) -> None:
    print(f"\n== {name}")
    width = max(map(len, figures), default=0)
    for label, value in figures.items():
        if isinstance(value, float):
            value = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        print(f"  {label:<{width}}  {value}")


def main() -> int:
    ours = argparse.ArgumentParser(add_help=False)
    options(ours)
    pre, _ = ours.parse_known_args()
    runner = pyperf.Runner(
        processes=2 if pre.quick else 12,
        min_time=0.05 if pre.quick else 0.1,
        add_cmdline_args=worker_args,
    )
    options(runner.argparser)
    args = runner.parse_args()
    args.quiet = args.quiet or args.quick  # no stability advice on short runs
    chosen = [s.strip().upper() for s in args.only.split(",")]
    if unknown := set(chosen) - set(SCENARIOS):
        runner.argparser.error(f"unknown scenarios {sorted(unknown)}")
    ctx = Context(args.quick, args.disk_dir, runner)
    results: dict[str, Figures] = {}
    started = time.monotonic()
    info = machine(args.disk_dir)
    for key, module_name in SCENARIOS.items():
        if key not in chosen:
            continue
        module = importlib.import_module(module_name)
        if args.worker and not getattr(module, "PYPERF", False):
            continue
        if not args.worker:
            print(f"{key} ...", file=sys.stderr, flush=True)
        results[key] = module.run(ctx)
    if args.worker:
        return 0
    info["seconds"] = round(time.monotonic() - started)
    for key, figures in results.items():
        show(sys.modules[SCENARIOS[key]].__doc__.splitlines()[0], figures)
    print(f"\n{json.dumps(info, indent=1)}")
    if args.json:
        doc = {"machine": info, "quick": args.quick, "results": results}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
