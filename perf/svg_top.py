#!/usr/bin/env python3
"""perf/svg_top.py SVG [PATTERN...] — the widest frames of an inferno flamegraph (either kind
perf/README.md describes), as a share of all samples: a frame's own width summed over every
place it appears (nested repeats of one function counted once per stack would need the raw
stacks; this is the SVG's view). With patterns, only frames whose name contains one."""
import html
import re
import sys


def frames(path):
    text = open(path, encoding="utf-8").read()
    for t in re.findall(r"<title>(.*?)</title>", text, re.S):
        t = html.unescape(t)
        m = re.match(r"(.*) \(([\d,]+) (?:\w+), ([\d.]+)%\)$", t)
        if m:
            yield m.group(1), float(m.group(3))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    pats = sys.argv[2:]
    total = {}
    for name, pct in frames(sys.argv[1]):
        if pats and not any(p in name for p in pats):
            continue
        total[name] = total.get(name, 0.0) + pct
    for name, pct in sorted(total.items(), key=lambda kv: -kv[1])[:40]:
        print(f"{pct:6.2f}%  {name[:160]}")


if __name__ == "__main__":
    main()
