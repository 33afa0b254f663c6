"""Make the README's performance tables from saved runs of run.py --json.

    python benchmarks/report.py RUN.json [RUN.json ...]            # print
    python benchmarks/report.py RUN.json ... --update README.md    # rewrite
    python benchmarks/report.py --check README.md     # exit 1 if stale

The tables go between the README's bench-table markers, whose start names the
runs. Per-call, batch and volume figures come from the first run with the
GIL; the convoy, the log and the big writer (B2, B7, B9) are shown for every
run given, with B9's goal checks (issue 15) from its figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

START, END = "<!-- bench-table:start", "<!-- bench-table:end -->"
BLOCK = re.compile(re.escape(START) + "(.*?)-->.*?" + re.escape(END), re.S)
# Rows: cells split by " | ". <SPEC KEY> is a figure, <SPEC KEY / KEY> the ratio of
# two; SPEC is a format spec, or t (a time in ns, in the unit that reads best), us
# and ms (the same from us and ms), g. {p} and {l} are filled in first. A cell
# whose figure is missing reads "-"; a row with no figures at all is left out.
FIGURE = re.compile(r"<(\S+) ([^<>]+)>")
MAIN = {  # scenario: variants ({p}: key prefix, {l}: label), row
    "B1": (
        [("tmpfs: ", "no I/O: the call's own cost"), ("disk: ", "ext4")],
        "B1 flush one clean page, {l} | <t {p}msyncext.flush(m, 0, PAGE) [ns]> "
        "(unaligned `flush(m, 100, 200)`: <t {p}msyncext.flush(m, 100, 200), "
        "unaligned [ns]>) | <t {p}m.flush(0, PAGE) [ns]> | ctypes `msync` <t "
        "{p}ctypes msync(addr, PAGE, MS_SYNC) [ns]>; `os.fdatasync` <t "
        "{p}os.fdatasync(fd) [ns]> | "
        "<.2f {p}msyncext.flush(m, 0, PAGE) [ns] / {p}m.flush(0, PAGE) [ns]>x "
        "`mmap.flush`, <.2f {p}msyncext.flush(m, 0, PAGE) [ns] / {p}ctypes "
        "msync(addr, PAGE, MS_SYNC) [ns]>x ctypes",
    ),
    "B3": (
        [("8 threads, ", "")],
        "B3 8 threads, each dirtying and flushing a page of its own file | <,.0f "
        "{p}msyncext.flush [flushes/s]> flushes/s | <,.0f {p}mmap.flush [flushes/s]> "
        "flushes/s |  | <.2f {p}msyncext.flush [flushes/s] / {p}mmap.flush "
        "[flushes/s]>x the rate",
    ),
    "B4": (
        [("", ""), ("large folios: ", ", page cache as `write` left it")],
        "B4 256 scattered dirty pages of a 64 MiB file{l} | `flush_ranges` <.3g "
        "{p}flush_ranges(m, pairs) [ms]> ms (<d {p}flush_ranges(m, pairs) [msync "
        "calls]> msync calls) | loop: <.3g {p}loop of m.flush(off, n) [ms]> ms (256 "
        "calls) | whole-map `flush(m)` <.3g {p}msyncext.flush(m), whole map [ms]> ms; "
        "`pwrite`+`fdatasync` <.3g {p}reference: os.pwrite + os.fdatasync [ms]> ms | "
        "<.1f {p}loop of m.flush(off, n) [ms] / {p}flush_ranges(m, pairs) [ms]>x "
        "faster than the loop",
    ),
    "B5": (
        [("64 MiB: ", "64"), ("256 MiB: ", "256")],
        "B5 {l} MiB of dirty pages | <,.0f {p}msyncext.flush(m) [MB/s]> MB/s | <,.0f "
        "{p}m.flush() [MB/s]> MB/s | `os.fdatasync` <,.0f {p}os.fdatasync(fd) [MB/s]> "
        "MB/s | <.2f {p}os.fdatasync(fd) [MB/s] / {p}msyncext.flush(m) [MB/s]>x "
        "`fdatasync`'s",
    ),
}
B6 = "<g B4 random, {l} gaps, max_gap={p} [ms]> ms (<d B4 random, {l} gaps, "
B6 += "max_gap={p} [msync calls]>)"
B2 = (
    "build, switch interval | flusher alone | convoy model | msyncext: flusher "
    "beside CPU | msyncext: CPU thread keeps | `mmap.flush`: flusher beside CPU | "
    "`mmap.flush`: CPU thread keeps",
    "{l} | <,.0f flusher alone, msyncext.flush [flushes/s]>/s | <,.0f {p}convoy "
    "model 1/(interval + 1/alone) [flushes/s]>/s | <,.0f {p}flusher beside CPU, "
    "msyncext.flush [flushes/s]>/s | <.0f {p}CPU thread beside msyncext.flush [% of "
    "alone]> % | <,.0f {p}flusher beside CPU, mmap.flush [flushes/s]>/s | <.0f "
    "{p}CPU thread beside mmap.flush [% of alone]> %",
)
B7 = (
    "build, how each commit is flushed | alone: commits/s | median / p99 latency | "
    "beside a CPU thread: commits/s | median / p99 latency | CPU thread keeps",
    "{l}, {p} | <,.0f alone, {p} [commits/s]> | <us alone, {p}, latency median [us]>"
    " / <us alone, {p}, latency p99 [us]> | <,.0f beside CPU, {p} [commits/s]> | <us "
    "beside CPU, {p}, latency median [us]> / <us beside CPU, {p}, latency p99 [us]> "
    "| <.0f beside CPU, {p}, CPU thread [% of alone]> %",
)

B9 = (
    "build, writer, how it makes the file durable | total time | final sync's "
    "stall | longest stall (a write or a flush) | peak dirty + write-back | "
    "page cache after",
    "{l}, {p} | <.3g {p}: total [s]> s | <ms {p}: final sync stall [ms]> | <ms "
    "{p}: longest stall [ms]> | <,.0f {p}: peak dirty + writeback [MiB]> MiB | "
    "<,.0f {p}: cached after [MiB]> MiB",
)
# B9's contenders the goal names: as b9_big_writer.py names them
B9_FINAL, B9_NEW = "final MS_SYNC only", "MS_ASYNC per chunk, final MS_SYNC"


def b9_notes(b9: dict[str, Any], build: str) -> list[str]:
    """The run's set-up, and issue 15's goal for the write-out call, per writer:
    its final sync's stall at most a tenth of the final-sync-only one's, its
    total time within 5 % of the fastest contender's, its longest stall the
    shortest of all."""
    if "file size [MiB]" not in b9:
        return []
    bg = b9.get("kernel's background write-back threshold at start [MiB]")
    n = b9["rounds"]
    out = [
        f"- B9, {build}: a {b9['file size [MiB]']:,.0f} MiB file written in 1 MiB "
        + (f"chunks, medians of {n} rounds" if n > 1 else "chunks, one round")
        + (f"; kernel's background write-back threshold {bg:,.0f} MiB" if bg else "")
    ]
    ends = [k for k in b9 if k.endswith(": total [s]")]
    runs = [k.removesuffix(": total [s]").split(", ", 1) for k in ends]
    for w in dict.fromkeys(w for w, how in runs if how == B9_NEW):
        total, stall, final = {}, {}, {}
        for how in (how for v, how in runs if v == w):
            total[how] = b9[f"{w}, {how}: total [s]"]
            stall[how] = b9[f"{w}, {how}: longest stall [ms]"]
            if f"{w}, {how}: final sync stall [ms]" in b9:
                final[how] = b9[f"{w}, {how}: final sync stall [ms]"]
        goal = f"- B9 goal, {build}, {w}: "
        if B9_FINAL in final:
            a, b = final[B9_NEW], final[B9_FINAL]
            detail = f"{fmt('ms', a)} against {fmt('ms', b)}, {a / b:.0%}"
            out.append(
                f"{goal}its final sync's stall at most a tenth of the stall with "
                f"{B9_FINAL}: " + verdict(a <= b / 10, detail)
            )
        fast = min((h for h in total if h != B9_NEW), key=total.__getitem__)
        a, b = total[B9_NEW], total[fast]
        detail = f"{a:.3g} s against {b:.3g} s ({fast}), {a / b - 1:+.1%}"
        out.append(
            f"{goal}its total time within 5 % of the fastest contender's: "
            + verdict(a <= 1.05 * b, detail)
        )
        short = min((h for h in stall if h != B9_NEW), key=stall.__getitem__)
        a, b = stall[B9_NEW], stall[short]
        detail = f"{fmt('ms', a)} against {fmt('ms', b)} ({short})"
        out.append(
            f"{goal}its longest stall the shortest of all: " + verdict(a <= b, detail)
        )
    return [*out, ""]


def verdict(met: bool, detail: str) -> str:
    """As B8 words its targets."""
    return f"{'met' if met else 'MISSED'} ({detail})"


def fmt(spec: str, x: float) -> str:
    if spec in ("t", "us", "ms"):
        x *= {"t": 1, "us": 1e3, "ms": 1e6}[spec]
        for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
            if x >= scale:
                return f"{x / scale:.3g} {unit}"
        return f"{x:.0f} ns"
    return format(x, (".3g" if x < 1000 else ",.0f") if spec == "g" else spec)


def row(template: str, figures: dict[str, Any], p: str = "", label: str = "") -> str:
    """A table row; empty if none of its figures were measured."""
    found = []

    def figure(m: re.Match[str]) -> str:
        a, _, b = m[2].partition(" / ")
        found.append(a in figures and (not b or b in figures))
        x = figures[a] / figures[b] if b else figures[a]  # KeyError: "-"
        return fmt(m[1], x)

    def cell(text: str) -> str:
        try:
            return FIGURE.sub(figure, text.format(p=p, l=label))
        except KeyError:
            return "-"

    line = "| " + " | ".join(map(cell, template.split(" | "))) + " |"
    return line if any(found) else ""


def table(header: str, rows: list[str]) -> list[str]:
    rows = [r for r in rows if r]
    rule = "|" + " --- |" * (header.count(" | ") + 1)
    return [f"| {header} |", rule, *rows, ""] if rows else []


def render(docs: list[dict[str, Any]]) -> str:
    gil = next((d for d in docs if d["machine"]["gil_enabled"]), docs[0])["results"]
    out = ["Runs:"]
    for d in docs:
        m = d["machine"]
        out.append(
            f"- `{m['command']}` ({'quick' if d['quick'] else 'full'} run, "
            f"{m['date']}, {m['seconds']} s): {m['python']}, {m['kernel']}, "
            f"{m['cpu']}, disk {m['disk']}"
        )
    out.append("")
    header = "scenario | msyncext | `mmap.flush` | others | msyncext's time"
    rows = [row(r, gil.get(b, {}), *v) for b, (vs, r) in MAIN.items() for v in vs]
    out += table(header, rows)
    b6 = gil.get("B6", {})
    gaps = [k[31:-5] for k in b6 if re.match(r"B4 random, clean.*\[ms\]$", k)]
    header = " | ".join(["B6: the 256 pages of B4, `max_gap` =", *gaps])
    cells = " | ".join(
        ["{l} pages between them"] + [B6.replace("{p}", g) for g in gaps]
    )
    out += table(header, [row(cells, b6, "", s) for s in ("clean", "dirty")])
    convoy, log = [], []
    for d in docs:
        m, b2, b7 = d["machine"], d["results"].get("B2", {}), d["results"].get("B7", {})
        for ms in ("5", "1", "0.1") if m["gil_enabled"] else ("5",):
            label = f"{m['python']}, {ms} ms" if m["gil_enabled"] else m["python"]
            convoy.append(row(B2[1], b2, f"switch interval {ms} ms: ", label))
        names = [k[7:-12] for k in b7 if re.match(r"alone, .* \[commits/s\]$", k)]
        log += [row(B7[1], b7, name, m["python"]) for name in names]
    out += table(B2[0], convoy) + table(B7[0], log)
    writers, notes = [], []
    for d in docs:
        b9, build = d["results"].get("B9", {}), d["machine"]["python"]
        names = [k[:-11] for k in b9 if k.endswith(": total [s]")]
        writers += [row(B9[1], b9, name, build) for name in names]
        notes += b9_notes(b9, build)
    out += table(B9[0], writers) + notes
    targets = gil.get("B8", {}).items()
    out += [f"- {k[8:]}: {v}" for k, v in targets if k.startswith("target: ")]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="JSON files written by run.py --json")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--update", metavar="README", help="rewrite its tables")
    mode.add_argument("--check", metavar="README", help="exit 1 if they are stale")
    args = ap.parse_args()
    readme, text = args.update or args.check, ""
    if readme:
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        if not (found := BLOCK.search(text)):
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
