"""A small SVG line chart, drawn by hand so that `compare --plot`, the HTML report and the review app show
curves with the runtime's own dependencies (no matplotlib). Every text is XML-escaped: class names and
titles come from files a user did not necessarily write."""

from __future__ import annotations

import math
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr


@dataclass
class Series:
    label: str
    colour: str
    xs: list[float]
    ys: list[float]
    width: float = 1.5


def nice_step(span: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks over `span`."""
    if not span > 0:
        return 1.0
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:g}"


def line_chart(series: list[Series], xlabel: str, ylabel: str, title: str = "", y_max: float | None = None,
               width: int = 720, height: int = 380) -> str:
    """An SVG document: axes from 0, ticks at round numbers, one polyline per series, a legend on the right."""
    left, right, top, bottom = 58, 170, 34 if title else 14, 46
    pw, ph = width - left - right, height - top - bottom
    x_hi = max([max(s.xs) for s in series if s.xs] + [1.0])
    y_hi = y_max if y_max is not None else max([max(s.ys) for s in series if s.ys] + [1.0])
    xs_step, ys_step = nice_step(x_hi), nice_step(y_hi)
    x_hi = math.ceil(x_hi / xs_step - 1e-9) * xs_step
    y_hi = math.ceil(y_hi / ys_step - 1e-9) * ys_step

    def px(x: float) -> float:
        return left + pw * x / x_hi

    def py(y: float) -> float:
        return top + ph * (1 - y / y_hi)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>']
    if title:
        out.append(f'<text x="{left}" y="20" font-size="13" font-weight="bold">{escape(title)}</text>')
    k = 0
    while k * ys_step <= y_hi + 1e-9:
        y = k * ys_step
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_num(y)}</text>')
        k += 1
    k = 0
    while k * xs_step <= x_hi + 1e-9:
        x = k * xs_step
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>'
                   f'<text x="{px(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{_num(x)}</text>')
        k += 1
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888888"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    for i, s in enumerate(series):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys, strict=True))
        out.append(f'<polyline class="series" data-label={quoteattr(s.label)} points="{pts}" fill="none" '
                   f'stroke={quoteattr(s.colour)} stroke-width="{s.width}" stroke-linejoin="round"/>')
        ly = top + 8 + 16 * i
        out.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 32}" y1="{ly}" y2="{ly}" '
                   f'stroke={quoteattr(s.colour)} stroke-width="{s.width + 0.5}"/>'
                   f'<text x="{left + pw + 38}" y="{ly + 4}">{escape(s.label)}</text>')
    out.append("</svg>")
    return "\n".join(out)
