"""How a report page lays out in headless Chromium at a given window width, measured in the page with JavaScript.

`measure(chromium, page, width)` returns what the report test asserts on: elements wider than the page, tables cut off
behind a horizontal scroll, CSS that may split a word, words the layout did split across lines, the smallest body text
size, and for every image its rendered width, so that the size of the text inside a figure on screen can be computed
from the PNG (its pixel width, its dpi and the smallest text size `figures.save` recorded in it)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from cxrdist.evaluation.figures import MIN_FONT_KEY

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
# Injected into a copy of the page: records script errors, failed resource loads and console.error; after the load event
# writes the measurements into <pre id="probe">, which --dump-dom then shows.
PROBE = """<script>
window.__problems = [];
window.addEventListener('error', e => window.__problems.push(e.message || ('failed to load ' + (e.target.src || e.target.href))), true);
const __consoleError = console.error;
console.error = (...args) => { window.__problems.push('console.error: ' + args.join(' ')); __consoleError(...args); };
window.addEventListener('load', () => {
  const page = document.documentElement.clientWidth;
  const describe = e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '') + ' "' + (e.textContent || '').trim().slice(0, 40) + '"';
  const shown = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const all = Array.from(document.body.querySelectorAll('*')).filter(e => !e.closest('pre#probe'));
  const images = Array.from(document.images);
  const wider = all.filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && (r.right > page + 1 || r.left < -1); })
                   .map(e => describe(e) + ' ' + Math.round(e.getBoundingClientRect().right) + 'px');
  const cut = Array.from(document.querySelectorAll('.table-wrap')).filter(w => w.scrollWidth > w.clientWidth + 1)
                   .map(w => describe(w.querySelector('table') || w) + ' ' + w.scrollWidth + ' > ' + w.clientWidth + 'px');
  const splitting = all.filter(e => { const s = getComputedStyle(e);
      return ['break-all', 'break-word'].includes(s.wordBreak) || ['anywhere', 'break-word'].includes(s.overflowWrap) || s.hyphens === 'auto'; })
    .map(describe);
  const split = [];
  let smallest = Infinity;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest('script, style, pre#probe') || !node.data.trim() || !shown(parent)) continue;
    smallest = Math.min(smallest, parseFloat(getComputedStyle(parent).fontSize));
    const word = /[^\\s\\-\\u2010-\\u2015\\/]+/g;  // a word: what lies between spaces, hyphens, dashes and slashes
    for (let m = word.exec(node.data); m; m = word.exec(node.data)) {
      if (m[0].length < 2) continue;
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const tops = new Set(Array.from(range.getClientRects()).filter(r => r.width > 0).map(r => Math.round(r.top)));
      if (tops.size > 1) split.push(m[0]);
    }
  }
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    page: page, problems: window.__problems, images: images.length,
    broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
    figures: images.map(i => ({file: decodeURIComponent(new URL(i.currentSrc).pathname), width: i.getBoundingClientRect().width})),
    wider: wider, cut: cut, splitting: splitting, split: split, smallest_text_px: smallest,
  });
  document.body.appendChild(out);
});
</script>"""


def run_chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


def measure(chromium: str, page: Path, width: int) -> dict:
    """The page's measurements at a `width` px window (see the module docstring); raises AssertionError without a result."""
    probe = page.with_name(f"probe-{width}.html")
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    try:
        result = run_chromium(chromium, f"--window-size={width},1000", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no probe result in the DOM (exit {result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def figure_text_px(figure: dict) -> float:
    """The smallest text of a figure as shown on the page, in CSS px: its size in points at the PNG's dpi, scaled by how
    much the page shrinks or stretches the PNG's pixels."""
    with Image.open(figure["file"]) as image:
        points, dpi, pixels = float(image.info[MIN_FONT_KEY]), float(image.info["dpi"][0]), image.width
    return points * dpi / 72 * figure["width"] / pixels


def screenshot(chromium: str, page: Path, width: int, height: int, out: Path) -> subprocess.CompletedProcess:
    return run_chromium(chromium, f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri())
