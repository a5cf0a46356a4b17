"""Render ``fxprune.inspect``'s HTML view in headless Chromium and save a screenshot.

    python bench/inspect_view.py [--spec torchvision:resnet18] [--node layer1_0_conv1] [--out bench/results/inspect_view]

Writes ``<out>.html`` (the self-contained page) and ``<out>.png`` (the screenshot, with ``--node`` clicked by
the page's own script through ``#node=NAME``), reads back the clicked node's side panel from Chromium's DOM, prints a markdown table
with the page size, group counts and the Chromium command used, and writes ``<out>.json``. Needs a Chromium
binary (``apt-get install -y chromium``); the page itself needs no network.
"""

from __future__ import annotations

import argparse
import html as html_lib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import fxprune
from fxprune.specs import load_spec

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


def _headless(*args: str, timeout: float) -> tuple[list[str], str]:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary; apt-get install -y chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    return cmd, done.stdout


def _url(html: Path, node: str | None) -> str:
    return html.resolve().as_uri() + (f"#node={quote(node)}" if node else "")


def screenshot(
    html: Path, png: Path, size: str = "1400,900", timeout: float = 120, node: str | None = None
) -> list[str]:
    """Open ``html`` in headless Chromium (offline: no network needed) and write ``png``; returns the command.

    With ``node``, the page opens with that graph node clicked (``#node=NAME``), so the side panel shows its
    group, channels, FLOPs and explanation.
    """
    return _headless(
        f"--window-size={size}", f"--screenshot={png.resolve()}", _url(html, node), timeout=timeout
    )[0]


def clicked_panel(html: Path, node: str, timeout: float = 120) -> str:
    """The text of the side panel after the page's own script clicked ``node`` (Chromium's rendered DOM)."""
    dom = _headless("--virtual-time-budget=2000", "--dump-dom", _url(html, node), timeout=timeout)[1]
    m = re.search(r'<div id="info">(.*?)</div>', dom, re.S)
    return html_lib.unescape(m.group(1)) if m else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="torchvision:resnet18")
    ap.add_argument("--out", default="bench/results/inspect_view")
    ap.add_argument("--node", default="layer1_0_conv1", help="graph node shown clicked in the screenshot")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    t = time.perf_counter()
    ins = fxprune.inspect(spec.model.eval(), spec.example_input)
    seconds = time.perf_counter() - t
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html, png = out.with_suffix(".html"), out.with_suffix(".png")
    ins.write(str(html), "html")
    cmd = screenshot(html, png, node=args.node)
    panel = clicked_panel(html, args.node)
    row = {"spec": args.spec, "nodes": len(ins.nodes), "groups": len(ins.groups), "prunable": len(ins.prunable),
           "inspect_s": round(seconds, 2), "html_bytes": html.stat().st_size, "png_bytes": png.stat().st_size,
           "screenshot": str(png), "command": " ".join(cmd),
           "clicked_panel_first_line": panel.split("\n")[0]}  # fmt: skip
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    out.with_suffix(".json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
