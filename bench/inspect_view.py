"""Render ``fxprune.inspect``'s HTML view in headless Chromium and save a screenshot.

    python bench/inspect_view.py [--spec torchvision:resnet18] [--out bench/results/inspect_view]

Writes ``<out>.html`` (the self-contained page) and ``<out>.png`` (the screenshot), prints a markdown table
with the page size, group counts and the Chromium command used, and writes ``<out>.json``. Needs a Chromium
binary (``apt-get install -y chromium``); the page itself needs no network.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import fxprune
from fxprune.specs import load_spec

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


def screenshot(html: Path, png: Path, size: str = "1400,900", timeout: float = 120) -> list[str]:
    """Open ``html`` in headless Chromium (offline: no network needed) and write ``png``; returns the command."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary; apt-get install -y chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
           f"--screenshot={png.resolve()}", html.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="torchvision:resnet18")
    ap.add_argument("--out", default="bench/results/inspect_view")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    t = time.perf_counter()
    ins = fxprune.inspect(spec.model.eval(), spec.example_input)
    seconds = time.perf_counter() - t
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html, png = out.with_suffix(".html"), out.with_suffix(".png")
    ins.write(str(html), "html")
    cmd = screenshot(html, png)
    row = {"spec": args.spec, "nodes": len(ins.nodes), "groups": len(ins.groups), "prunable": len(ins.prunable),
           "inspect_s": round(seconds, 2), "html_bytes": html.stat().st_size, "png_bytes": png.stat().st_size,
           "screenshot": str(png), "command": " ".join(cmd)}  # fmt: skip
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    out.with_suffix(".json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
