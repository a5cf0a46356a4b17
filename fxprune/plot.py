"""Kept channels per layer (the bottleneck view) as PNG and SVG, with no plotting dependency.

The PNG is drawn on an RGB canvas in pure Python (a 3x5 bitmap font for labels) and encoded with ``zlib``
and ``struct``; the SVG carries the full layer names. Grey bars are the original widths, coloured bars the
kept widths, in graph order.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["layer_widths", "png_bytes", "svg_text", "write_plots"]

Layer = tuple[str, int, int]  # (module name, channels before, channels after)

# 3x5 glyphs, rows top to bottom, '1' = ink
_FONT: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    "A": ("010", "101", "111", "101", "101"), "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"), "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"), "F": ("111", "100", "110", "100", "100"),
    "G": ("011", "100", "101", "101", "011"), "H": ("101", "101", "111", "101", "101"),
    "I": ("111", "010", "010", "010", "111"), "J": ("001", "001", "001", "101", "010"),
    "K": ("101", "101", "110", "101", "101"), "L": ("100", "100", "100", "100", "111"),
    "M": ("101", "111", "111", "101", "101"), "N": ("110", "101", "101", "101", "101"),
    "O": ("010", "101", "101", "101", "010"), "P": ("110", "101", "110", "100", "100"),
    "Q": ("010", "101", "101", "110", "011"), "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"), "T": ("111", "010", "010", "010", "010"),
    "U": ("101", "101", "101", "101", "111"), "V": ("101", "101", "101", "101", "010"),
    "W": ("101", "101", "111", "111", "101"), "X": ("101", "101", "010", "101", "101"),
    "Y": ("101", "101", "010", "010", "010"), "Z": ("111", "001", "010", "100", "111"),
    " ": ("000",) * 5, ".": ("000", "000", "000", "000", "010"), "-": ("000", "000", "111", "000", "000"),
    "=": ("000", "111", "000", "111", "000"), "(": ("010", "100", "100", "100", "010"),
    ")": ("010", "001", "001", "001", "010"), "/": ("001", "001", "010", "100", "100"),
    ":": ("000", "010", "000", "010", "000"), "%": ("101", "001", "010", "100", "101"),
    ",": ("000", "000", "000", "010", "100"), "_": ("000", "000", "000", "000", "111"),
}  # fmt: skip

_GREY = (205, 205, 205)
_BAR = (52, 120, 196)
_INK = (40, 40, 40)
_WHITE = (255, 255, 255)


def layer_widths(original: torch.nn.Module, pruned: torch.nn.Module) -> list[Layer]:
    """Output channels of every conv/linear layer before and after, in the pruned model's module order."""
    before = dict(original.named_modules())
    out = []
    for name, m in pruned.named_modules():
        w = getattr(m, "out_channels", getattr(m, "out_features", None))
        o = before.get(name)
        w0 = getattr(o, "out_channels", getattr(o, "out_features", None)) if o is not None else None
        if isinstance(w, int) and isinstance(w0, int):
            out.append((name, w0, w))
    return out


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(_WHITE * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, c: tuple[int, int, int]) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h, max(y0, y1))
        row = bytes(c) * (x1 - x0)
        for y in range(y0, y1):
            i = 3 * (y * self.w + x0)
            self.px[i : i + len(row)] = row

    def text(self, x: int, y: int, s: str, scale: int = 2, c: tuple[int, int, int] = _INK) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for r, bits in enumerate(glyph):
                for k, b in enumerate(bits):
                    if b == "1":
                        self.rect(x + k * scale, y + r * scale, x + (k + 1) * scale, y + (r + 1) * scale, c)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w : 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def _geometry(n: int) -> tuple[int, int, int, int, int]:
    bar = max(4, min(28, 900 // max(n, 1)))
    left, top, plot_h = 60, 40, 260
    width = max(480, left + n * bar + 20)
    return bar, left, top, plot_h, width


def png_bytes(layers: Sequence[Layer], title: str = "kept channels per layer (grey: original)") -> bytes:
    """A bar chart: one column per layer, grey = original width, blue = kept width."""
    bar, left, top, plot_h, width = _geometry(len(layers))
    cv = _Canvas(width, top + plot_h + 40)
    top_val = max((b for _, b, _ in layers), default=1) or 1
    cv.text(left, 12, title)
    base = top + plot_h
    cv.rect(left - 2, top, left, base + 1, _INK)
    cv.rect(left - 2, base, left + len(layers) * bar, base + 2, _INK)
    for frac in (1.0, 0.5):
        y = base - int(plot_h * frac)
        cv.rect(left - 6, y, left - 2, y + 1, _INK)
        cv.text(4, y - 4, str(int(top_val * frac)))
    gap = 1 if bar > 4 else 0
    for i, (_, before, after) in enumerate(layers):
        x = left + i * bar
        cv.rect(x + gap, base - round(plot_h * before / top_val), x + bar - gap, base, _GREY)
        cv.rect(x + gap, base - round(plot_h * after / top_val), x + bar - gap, base, _BAR)
    step = max(1, (len(layers) * 20) // max(1, len(layers) * bar))
    for i in range(0, len(layers), step):
        cv.text(left + i * bar, base + 8, str(i), scale=1 if bar < 12 else 2)
    cv.text(left, base + 26, "layer index (see report for names)", scale=1)
    return cv.png()


def svg_text(layers: Sequence[Layer], title: str = "kept channels per layer (grey: original)") -> str:
    """The same chart as SVG, with layer names as hover titles."""
    bar, left, top, plot_h, width = _geometry(len(layers))
    height = top + plot_h + 40
    top_val = max((b for _, b, _ in layers), default=1) or 1
    base = top + plot_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><text x="{left}" y="20">{title}</text>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#333"/>',
        f'<line x1="{left}" y1="{base}" x2="{left + len(layers) * bar}" y2="{base}" stroke="#333"/>',
        f'<text x="4" y="{top + 4}">{top_val}</text>',
    ]
    for i, (name, before, after) in enumerate(layers):
        x = left + i * bar
        hb, ha = plot_h * before / top_val, plot_h * after / top_val
        parts.append(
            f"<g><title>{name}: {after}/{before}</title>"
            f'<rect x="{x + 1}" y="{base - hb:.1f}" width="{bar - 2}" height="{hb:.1f}" fill="#cdcdcd"/>'
            f'<rect x="{x + 1}" y="{base - ha:.1f}" width="{bar - 2}" height="{ha:.1f}" fill="#3478c4"/></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def write_plots(layers: Sequence[Layer], directory: str | Path, stem: str = "kept_channels") -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` into ``directory``; returns the paths."""
    d = Path(directory)
    png, svg = d / f"{stem}.png", d / f"{stem}.svg"
    png.write_bytes(png_bytes(layers))
    svg.write_text(svg_text(layers), encoding="utf-8")
    return [png, svg]
