"""Compile a small CNN, render its report as HTML and screenshot the page in headless Chromium.

Prints the paths and sizes of the page and the screenshot, so the rendering can be
looked at by a person (the tests only check it is not blank).
    python bench/html_screenshot.py [-o /tmp/dlopt-html] [--precision auto] [--runs 50]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 2000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="dlopt-chromium-") as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size={width},{height}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, default=None, help="folder for model, artefacts, page, screenshot")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    import models

    import dlopt
    from dlopt.report.html import render_html

    out = args.out or Path(tempfile.mkdtemp(prefix="dlopt-html-"))
    out.mkdir(parents=True, exist_ok=True)
    model = out / "cnn.onnx"
    models.save(models.conv_bn_relu(channels=32, size=64), model)
    report = dlopt.compile(model, target="cpu", out=out / "build", precision=args.precision, runs=args.runs)
    page = out / "report.html"
    page.write_text(render_html(report.to_dict()), encoding="utf-8")
    png = out / "report.png"
    screenshot(page, png)
    print(f"chosen: {report.chosen}; {len(report.candidates)} candidates")
    print(f"page:       {page} ({page.stat().st_size / 1e3:.1f} KB)")
    print(f"screenshot: {png} ({png.stat().st_size / 1e3:.1f} KB, 1280x2000)")


if __name__ == "__main__":
    main()
