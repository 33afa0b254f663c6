"""Benchmarks: msyncext against what Python users call today.

    python benchmarks/run.py [--quick] [--only B1,B7] [--disk-dir DIR] [--json FILE]

Runs the scenarios (b*.py beside this file), prints every figure and the README's
tables; --json saves the figures, with the machine's description, for report.py.
pyperf times per-call figures in worker processes that run this script again.
Disk files go to --disk-dir (default: the current directory). Only an installed
msyncext is measured, never the source folder.
"""

import contextlib
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyperf  # type: ignore[import-untyped]
import report
from common import GIL, Context

import msyncext

HERE = Path(__file__).resolve().parent
SCENARIOS = {p.stem[:2].upper(): p.stem for p in sorted(HERE.glob("b[0-9]_*.py"))}
PYPERF = {"B1", "B8"}  # the scenarios that pyperf's worker processes run
if Path(msyncext.__file__).resolve().is_relative_to(HERE.parent / "msyncext"):
    sys.exit("msyncext was imported from the source folder; pip install it first")


def machine(disk_dir: str) -> dict[str, Any]:
    cpu, fs = platform.processor(), "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((ln.split(":")[1].strip() for ln in f if "model name" in ln), cpu)
    with contextlib.suppress(OSError):
        findmnt = ["findmnt", "-no", "FSTYPE,SOURCE", "--target", disk_dir]
        fs = " ".join(
            subprocess.run(findmnt, capture_output=True, text=True).stdout.split()
        )
    return {
        "command": shlex.join(sys.orig_argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": f"{platform.python_implementation()} {platform.python_version()}"
        + ("" if GIL else " free-threaded"),
        "gil_enabled": GIL,
        "kernel": f"{platform.system()} {platform.release()}",
        "cpu": f"{cpu}, {os.cpu_count()} CPUs",
        "disk": f"{os.path.realpath(disk_dir)} ({fs})",
        "msyncext": msyncext.__version__,
    }


def main() -> int:
    quick = "--quick" in sys.argv
    runner = pyperf.Runner(
        processes=2 if quick else 12,
        min_time=0.05 if quick else 0.1,
        add_cmdline_args=lambda cmd, args: cmd.extend(
            ["--only", args.only, "--disk-dir", args.disk_dir] + ["--quick"] * quick
        ),
    )
    cli = runner.argparser
    cli.add_argument("--quick", action="store_true", help="about a minute")
    cli.add_argument("--only", default=",".join(SCENARIOS), help="e.g. B1,B7")
    cli.add_argument("--disk-dir", default=os.curdir, help="for disk files")
    cli.add_argument("--json", help="save every figure to this file")
    args = runner.parse_args()
    args.quiet |= quick  # no stability advice on short runs
    chosen = [s.strip().upper() for s in args.only.split(",")]
    if unknown := set(chosen) - set(SCENARIOS):
        cli.error(f"unknown scenarios {sorted(unknown)}")
    ctx, started = Context(quick, args.disk_dir, runner), time.monotonic()
    doc: dict[str, Any] = {"machine": machine(args.disk_dir), "quick": quick}
    doc["results"] = results = {}
    for key, module in SCENARIOS.items():
        if key in chosen and (key in PYPERF or not args.worker):
            if not args.worker:
                print(f"{key} ...", file=sys.stderr, flush=True)
            results[key] = importlib.import_module(module).run(ctx)
    if args.worker:
        return 0
    doc["machine"]["seconds"] = round(time.monotonic() - started)
    for key, figures in results.items():
        print(f"\n== {(sys.modules[SCENARIOS[key]].__doc__ or '').splitlines()[0]}")
        for label, value in figures.items():
            if isinstance(value, float):
                value = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
            print(f"  {label:<{max(map(len, figures))}}  {value}")
    print(f"\n{json.dumps(doc['machine'], indent=1)}\n\n{report.render([doc])}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
