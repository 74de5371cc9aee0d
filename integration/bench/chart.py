"""A bar chart of the benchmark's figures as a self-contained SVG (no plotting library).

One panel per group of figures (throughput, latency, start-up, ...); in a
panel, each figure is a row of horizontal bars, ours / C pasta / slirp4netns,
scaled to the largest of the three (figures have different units), with the
values printed, the target and the verdict.  `run.py` writes it next to its
JSON; the README shows a copy of the quiet run's chart.
"""

from __future__ import annotations

from html import escape

IMPLS = (("ours", "ours (Python)", "#3465a4"), ("c", "C pasta / passt", "#f57900"),
         ("slirp", "slirp4netns", "#888a85"))
WIDTH = 960
LABEL_W = 330
BAR_X = LABEL_W + 10
BAR_W = 400
BAR_H = 11
ROW_GAP = 10
VERDICT_X = BAR_X + BAR_W + 70


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def render(figures: list[dict], title: str, subtitle: str) -> str:
    """figures: dicts with group, label, unit, ours, c, slirp (float or None),
    target (text or ""), verdict ("met", "MISSED", "")."""
    groups: list[str] = []
    for f in figures:
        if f["group"] not in groups:
            groups.append(f["group"])
    out: list[str] = []
    y = 70
    for group in groups:
        rows = [f for f in figures if f["group"] == group
                and any(f.get(k) is not None for k, _, _ in IMPLS)]
        if not rows:
            continue
        out.append(f'<text x="10" y="{y}" class="group">{escape(group)}</text>')
        y += 10
        for f in rows:
            present = [(k, f[k]) for k, _, _ in IMPLS if f.get(k) is not None]
            top = max(v for _, v in present) or 1.0
            out.append(f'<text x="{LABEL_W}" y="{y + BAR_H + 4}" class="label" '
                       f'text-anchor="end">{escape(f["label"])}</text>')
            for i, (key, _name, colour) in enumerate(IMPLS):
                v = f.get(key)
                by = y + i * BAR_H
                if v is None:
                    continue
                w = max(1.0, BAR_W * v / top)
                out.append(f'<rect x="{BAR_X}" y="{by}" width="{w:.1f}" height="{BAR_H - 2}" '
                           f'fill="{colour}"/>')
                out.append(f'<text x="{BAR_X + w + 4:.1f}" y="{by + BAR_H - 3}" '
                           f'class="value">{_num(v)}</text>')
            if f.get("target"):
                mark = {"met": ("met", "met"), "MISSED": ("MISSED", "missed")}.get(
                    f.get("verdict", ""), ("", "na"))
                out.append(f'<text x="{VERDICT_X}" y="{y + BAR_H + 4}" class="{mark[1]}">'
                           f'{escape(mark[0])} ({escape(f["target"])})</text>')
            y += 3 * BAR_H + ROW_GAP
        y += 14
    legend = []
    for i, (_key, name, colour) in enumerate(IMPLS):
        x = 10 + i * 170
        legend.append(f'<rect x="{x}" y="40" width="12" height="10" fill="{colour}"/>'
                      f'<text x="{x + 16}" y="49" class="value">{escape(name)}</text>')
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">\n'
            '<style>.title{font-size:16px;font-weight:bold}.sub{font-size:11px;fill:#555}'
            '.group{font-size:13px;font-weight:bold}.label{font-size:11px}'
            '.value{font-size:10px}.met{font-size:11px;fill:#4e9a06}'
            '.missed{font-size:11px;fill:#cc0000;font-weight:bold}.na{font-size:11px}</style>\n'
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>\n'
            f'<text x="10" y="20" class="title">{escape(title)}</text>\n'
            f'<text x="{WIDTH - 10}" y="20" class="sub" text-anchor="end">'
            f'{escape(subtitle)}</text>\n' + "".join(legend) + "\n" + "\n".join(out)
            + "\n</svg>\n")
