"""Make the README's performance tables from saved runs of run.py --json.

    python benchmarks/report.py RUN.json [RUN.json ...]            # print
    python benchmarks/report.py RUN.json ... --update README.md    # rewrite
    python benchmarks/report.py --check README.md     # CI: the runs it names

The tables go between the README's bench-table markers. Per-call, batch and
volume figures come from the first run with the GIL; the convoy and the log
(B2, B7) are shown for every run given, e.g. a GIL and a free-threaded one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

# The start marker names the runs the tables were made from, for --check.
START, END = "<!-- bench-table:start", "<!-- bench-table:end -->"
BLOCK = re.compile(re.escape(START) + "(.*?)-->.*?" + re.escape(END), re.S)


def t(ns: float) -> str:
    """A duration in ns, in the unit that reads best."""
    for unit, scale in (("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.0f} ns"


def g(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def n(x: float) -> str:
    return f"{x:,.0f}"


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main_table(r: dict[str, Any]) -> list[str]:
    b1, b3, b4, b5 = (r.get(k, {}) for k in ("B1", "B3", "B4", "B5"))
    out = [
        row("scenario", "msyncext", "`mmap.flush`", "others", "msyncext's time"),
        row(*["---"] * 5),
    ]
    for medium, what in (("tmpfs", "no I/O: the call's own cost"), ("disk", "ext4")):
        f = {k.split(": ", 1)[1]: v for k, v in b1.items() if k.startswith(medium)}
        if not f:
            continue
        ours, mm = f["msyncext.flush(m, 0, PAGE) [ns]"], f["m.flush(0, PAGE) [ns]"]
        ct, fds = (
            f["ctypes msync(addr, PAGE, MS_SYNC) [ns]"],
            f["os.fdatasync(fd) [ns]"],
        )
        unal = f["msyncext.flush(m, 100, 200), unaligned [ns]"]
        out.append(
            row(
                f"B1 flush one clean page, {what}",
                f"{t(ours)} (unaligned `flush(m, 100, 200)`: {t(unal)})",
                t(mm),
                f"ctypes `msync` {t(ct)}; `os.fdatasync` {t(fds)}",
                f"{ours / mm:.2f}x `mmap.flush`, {ours / ct:.2f}x ctypes",
            )
        )
    if b3:
        a, b = (
            b3["8 threads, msyncext.flush [flushes/s]"],
            b3["8 threads, mmap.flush [flushes/s]"],
        )
        out.append(
            row(
                "B3 8 threads, each dirtying and flushing a page of its own file",
                f"{n(a)} flushes/s",
                f"{n(b)} flushes/s",
                "",
                f"{a / b:.2f}x the rate",
            )
        )
    for p, label in (("", ""), ("large folios: ", ", page cache as `write` left it")):
        if f"{p}loop of m.flush(off, n) [ms]" not in b4:
            continue
        fr, loop = (
            b4[f"{p}flush_ranges(m, pairs) [ms]"],
            b4[f"{p}loop of m.flush(off, n) [ms]"],
        )
        whole = b4[f"{p}msyncext.flush(m), whole map [ms]"]
        ref = b4[f"{p}reference: os.pwrite + os.fdatasync [ms]"]
        out.append(
            row(
                f"B4 256 scattered dirty pages of a 64 MiB file{label}",
                f"`flush_ranges` {fr:.3g} ms "
                f"({b4[f'{p}flush_ranges(m, pairs) [msync calls]']} msync calls)",
                f"loop: {loop:.3g} ms (256 calls)",
                f"whole-map `flush(m)` {whole:.3g} ms; "
                f"`pwrite`+`fdatasync` {ref:.3g} ms",
                f"{loop / fr:.1f}x faster than the loop",
            )
        )
    for mib in (256, 64):
        if f"{mib} MiB: msyncext.flush(m) [MB/s]" in b5:
            a, b, c = (
                b5[f"{mib} MiB: {k} [MB/s]"]
                for k in ("msyncext.flush(m)", "m.flush()", "os.fdatasync(fd)")
            )
            out.append(
                row(
                    f"B5 {mib} MiB of dirty pages",
                    f"{n(a)} MB/s",
                    f"{n(b)} MB/s",
                    f"`os.fdatasync` {n(c)} MB/s",
                    f"{c / a:.2f}x `fdatasync`'s",
                )
            )
            break
    return out


def b6_table(b6: dict[str, Any]) -> list[str]:
    gaps = [
        k.split("max_gap=")[1][:-5]
        for k in b6
        if k.startswith("B4 random, clean") and k.endswith("[ms]")
    ]
    if not gaps:
        return []
    out = [
        row("B6: the 256 pages of B4, `max_gap` =", *gaps),
        row(*["---"] * (len(gaps) + 1)),
    ]
    for state in ("clean", "dirty"):
        cells = [
            f"{g(b6[f'B4 random, {state} gaps, max_gap={gap} [ms]'])} ms "
            f"({b6[f'B4 random, {state} gaps, max_gap={gap} [msync calls]']})"
            for gap in gaps
        ]
        out.append(row(f"{state} pages between them", *cells))
    return out


def build(doc: dict[str, Any]) -> str:
    return str(doc["machine"]["python"])


def convoy_table(docs: list[dict[str, Any]]) -> list[str]:
    out = [
        row(
            "build, switch interval",
            "flusher alone",
            "convoy model",
            "msyncext: flusher beside CPU",
            "msyncext: CPU thread keeps",
            "`mmap.flush`: flusher beside CPU",
            "`mmap.flush`: CPU thread keeps",
        ),
        row(*["---"] * 7),
    ]
    for doc in docs:
        b2 = doc["results"].get("B2")
        if not b2:
            continue
        alone = f"{n(b2['flusher alone, msyncext.flush [flushes/s]'])}/s"
        for ms in ("5", "1", "0.1") if doc["machine"]["gil_enabled"] else ("5",):
            at = f"switch interval {ms} ms: "
            model = b2.get(at + "convoy model 1/(interval + 1/alone) [flushes/s]")
            cells = [
                f"{n(b2[at + f'flusher beside CPU, {c} [flushes/s]'])}/s"
                f" | {b2[at + f'CPU thread beside {c} [% of alone]']:.0f} %"
                for c in ("msyncext.flush", "mmap.flush")
            ]
            label = (
                f"{build(doc)}, {ms} ms"
                if doc["machine"]["gil_enabled"]
                else build(doc)
            )
            out.append(row(label, alone, f"{n(model)}/s" if model else "-", *cells))
    return out


def log_table(docs: list[dict[str, Any]]) -> list[str]:
    out = [
        row(
            "build, how each commit is flushed",
            "alone: commits/s",
            "median / p99 latency",
            "beside a CPU thread: commits/s",
            "median / p99 latency",
            "CPU thread keeps",
        ),
        row(*["---"] * 6),
    ]
    for doc in docs:
        b7 = doc["results"].get("B7", {})
        names = [
            k[len("alone, ") : -len(" [commits/s]")]
            for k in b7
            if k.startswith("alone") and k.endswith("[commits/s]")
        ]
        for name in names:
            cells: list[str] = []
            for at in (f"alone, {name}", f"beside CPU, {name}"):
                p50, p99 = (
                    b7[f"{at}, latency {q} [us]"] * 1e3 for q in ("median", "p99")
                )
                cells += [n(b7[f"{at} [commits/s]"]), f"{t(p50)} / {t(p99)}"]
            share = b7[f"beside CPU, {name}, CPU thread [% of alone]"]
            out.append(row(f"{build(doc)}, {name}", *cells, f"{share:.0f} %"))
    return out


def render(docs: list[dict[str, Any]]) -> str:
    gil = next((d for d in docs if d["machine"]["gil_enabled"]), docs[0])
    lines = ["Runs:"]
    for d in docs:
        m = d["machine"]
        kind = "quick" if d["quick"] else "full"
        lines.append(
            f"- `{m['command']}` ({kind} run, {m['date']}, {m['seconds']} s): "
            f"{m['python']}, {m['kernel']}, {m['cpu']}, disk {m['disk']}"
        )
    lines.append("")
    for table in (
        main_table(gil["results"]),
        b6_table(gil["results"].get("B6", {})),
        convoy_table(docs),
        log_table(docs),
    ):
        if len(table) > 2:
            lines += [*table, ""]
    targets = [
        (k, v)
        for k, v in gil["results"].get("B8", {}).items()
        if k.startswith("target: ")
    ]
    lines += [f"- {k[len('target: ') :]}: {v}" for k, v in targets]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="JSON files written by run.py --json")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--update", metavar="README", help="rewrite its tables")
    mode.add_argument("--check", metavar="README", help="exit 1 if they are stale")
    args = ap.parse_args()
    readme = args.update or args.check
    text = ""
    if readme:
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        found = BLOCK.search(text)
        if not found:
            sys.exit(f"{readme} has no {START} ... {END} block")
        args.runs = args.runs or found[1].split()  # the runs it was made from
    if not args.runs:
        ap.error("name the JSON files of the runs")
    docs = []
    for path in args.runs:
        with open(path, encoding="utf-8") as f:
            docs.append(json.load(f))
    block = f"{START} {' '.join(args.runs)} -->\n{render(docs)}{END}"
    if not readme:
        print(block)
        return 0
    new = BLOCK.sub(lambda _: block, text)
    if args.check:
        if new != text:
            print(f"{readme} is stale: run report.py --update", file=sys.stderr)
        return int(new != text)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
