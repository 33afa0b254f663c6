"""Make the benchmark tables and the README's summary from runs of run.py --json.

    python benchmarks/report.py RUN.json [RUN.json ...]            # print the tables
    python benchmarks/report.py RUN.json ... --update benchmarks/README.md README.md
    python benchmarks/report.py --check benchmarks/README.md README.md  # 1 if stale

A file holds blocks between markers, whose start names the runs it was made
from: ``bench-table`` (every table: benchmarks/README.md) or
``bench-summary`` (a few lines of figures and ratios: the README). --update
rewrites every block of the files given from the runs given (or, with no
runs, from the runs each block names); --check fails if any block differs
from what its runs make. Per-call, batch and volume figures come from the
first run with the GIL; the convoy, the log and the big writer (B2, B7, B9)
are shown for every run given, with B9's goal checks (issue 15) from its
figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

# <!-- bench-KIND:start RUN.json ... --> generated text <!-- bench-KIND:end -->
BLOCK = re.compile(
    r"<!-- bench-(table|summary):start(.*?)-->.*?<!-- bench-\1:end -->", re.S
)
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

# The README's summary: (which run, scenario, line). "gil" is the first run
# with the GIL, "free" the first without; {python} names the run's build. A
# line whose run or figures are missing is left out.
B7_MINE, B7_MMAP = "beside CPU, msyncext.flush", "beside CPU, m.flush, aligned by hand"
B9_MMAP_NEW, B9_MMAP_FINAL = f"mmap, {B9_NEW}: ", f"mmap, {B9_FINAL}: "
SUMMARY = [
    (
        "gil",
        "B1",
        "- One call, no I/O (B1): `flush` <t tmpfs: msyncext.flush(m, 0, PAGE) [ns]>, "
        "`mmap.flush` <t tmpfs: m.flush(0, PAGE) [ns]>, a ctypes `msync` <t tmpfs: "
        "ctypes msync(addr, PAGE, MS_SYNC) [ns]>. On ext4 each call waits about <t "
        "disk: msyncext.flush(m, 0, PAGE) [ns]> for a device cache flush.",
    ),
    (
        "gil",
        "B4",
        "- 256 scattered dirty pages of a 64 MiB file (B4): one `flush_ranges` call "
        "<.3g flush_ranges(m, pairs) [ms]> ms, a loop of `mmap.flush` <.3g loop of "
        "m.flush(off, n) [ms]> ms (<.1f loop of m.flush(off, n) [ms] / flush_ranges(m, "
        "pairs) [ms]>x faster).",
    ),
    (
        "gil",
        "B3",
        "- 8 threads, each flushing a file of its own (B3): <.1f 8 threads, "
        "msyncext.flush [flushes/s] / 8 threads, mmap.flush [flushes/s]>x the rate "
        "of `mmap.flush`.",
    ),
    (
        "gil",
        "B7",
        "- A log committing beside a CPU-bound thread (B7, {python}): <,.0f "
        f"{B7_MINE} [commits/s]> commits/s with msyncext, and the CPU thread "
        f"keeps <.0f {B7_MINE}, CPU thread [% of alone]> % of its speed; with "
        f"`mmap.flush` <,.0f {B7_MMAP} [commits/s]> commits/s and <.0f {B7_MMAP}, "
        "CPU thread [% of alone]> %.",
    ),
    (
        "free",
        "B7",
        "  On {python}, no GIL to wait for: <,.0f "
        f"{B7_MINE} [commits/s]> commits/s with msyncext, the CPU thread <.0f "
        f"{B7_MINE}, CPU thread [% of alone]> %.",
    ),
    (
        "gil",
        "B9",
        "- 2 GiB written through an mmap (B9): with `MS_ASYNC` per chunk and one "
        f"final `MS_SYNC`, <.3g {B9_MMAP_NEW}total [s]> s in all and a final sync of "
        f"<ms {B9_MMAP_NEW}final sync stall [ms]>, against <.3g {B9_MMAP_FINAL}total "
        f"[s]> s and <ms {B9_MMAP_FINAL}final sync stall [ms]> with the final "
        "`MS_SYNC` alone.",
    ),
]


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


def fill(text: str, figures: dict[str, Any]) -> str:
    """``text`` with its figures filled in; KeyError if one was not measured."""

    def figure(m: re.Match[str]) -> str:
        a, _, b = m[2].partition(" / ")
        return fmt(m[1], figures[a] / figures[b] if b else figures[a])

    return FIGURE.sub(figure, text)


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


def summary(docs: list[dict[str, Any]]) -> str:
    """The README's few lines: figures and ratios, and where they come from."""
    runs = {
        "gil": next((d for d in docs if d["machine"]["gil_enabled"]), None),
        "free": next((d for d in docs if not d["machine"]["gil_enabled"]), None),
    }
    out = []
    for which, scenario, text in SUMMARY:
        if (doc := runs[which]) is None:
            continue
        text = text.replace("{python}", doc["machine"]["python"])
        try:
            out.append(fill(text, doc["results"].get(scenario, {})))
        except KeyError:
            continue
    m = docs[0]["machine"]
    dates = ", ".join(dict.fromkeys(d["machine"]["date"][:10] for d in docs))
    builds = " and ".join(d["machine"]["python"] for d in docs)
    out.append(
        f"\nMeasured with {builds} ({dates}; {m['kernel']}, {m['cpu']}, "
        f"disk {m['disk']})."
    )
    return "\n".join(out) + "\n"


RENDER = {"table": render, "summary": summary}


def load(paths: list[str]) -> list[dict[str, Any]]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            docs.append(json.load(f))
    return docs


def regenerate(text: str, runs: list[str]) -> str:
    """``text`` with every block made anew, from ``runs`` or the runs it names."""

    def block(m: re.Match[str]) -> str:
        kind, named = m[1], runs or m[2].split()
        made = RENDER[kind](load(named))
        start = f"<!-- bench-{kind}:start {' '.join(named)} -->"
        return f"{start}\n{made}<!-- bench-{kind}:end -->"

    return BLOCK.sub(block, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="JSON files written by run.py --json")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--update", metavar="FILE", nargs="+", help="rewrite its blocks")
    mode.add_argument("--check", metavar="FILE", nargs="+", help="1 if any is stale")
    args = ap.parse_args()
    files = args.update or args.check
    if not files:
        if not args.runs:
            ap.error("name the JSON files of the runs")
        print(render(load(args.runs)), end="")
        return 0
    if args.check and args.runs:
        ap.error("--check regenerates each block from the runs it names")
    stale = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not BLOCK.search(text):
            sys.exit(
                f"{path} has no <!-- bench-table:start ... --> or bench-summary block"
            )
        new = regenerate(text, args.runs)
        if args.check:
            if new != text:
                print(f"{path} is stale: run report.py --update", file=sys.stderr)
                stale = 1
            continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return stale


if __name__ == "__main__":
    sys.exit(main())
