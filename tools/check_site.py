"""Open every page of the built docs site in headless Chromium and fail on what a reader would hit.

    python tools/check_site.py [_site] [--out _site_check] [--chromium chromium]

The site is served on 127.0.0.1 by a local HTTP server; Chromium (Debian's `chromium`) opens each page through the
DevTools protocol. A page fails on: a console error or an uncaught exception, a request that fails or answers >= 400,
a request to any host but the local server (no fonts or scripts from the network), an image that did not load, and
an internal link to a missing page or a missing anchor. A screenshot of the index is written to OUT/index.png and a
summary to OUT/report.json. Exit 1 on any failure, naming page and problem.
"""
from __future__ import annotations

import argparse
import base64
import functools
import http.server
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1280,900"]

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass

def serve(root:Path)->tuple:
    "A threaded HTTP server on 127.0.0.1 for `root`: (server, base URL)."
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"

def start_chromium(exe:str, profile:Path)->tuple:
    "Chromium with a fresh profile: (process, DevTools HTTP base)."
    p = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 60:
        line = p.stderr.readline()
        m = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()   # keep draining stderr
            return p, f"http://{m.group(1)}"
        if not line and p.poll() is not None: break
    p.kill()
    raise SystemExit(f"check_site: {exe} did not start (no DevTools line on stderr)")

class Page:
    "One Chromium tab driven over the DevTools protocol, recording what went wrong."
    def __init__(self, devtools:str):
        req = urllib.request.Request(f"{devtools}/json/new?about:blank", method="PUT")
        self._conn = connect(json.load(urllib.request.urlopen(req, timeout=30))["webSocketDebuggerUrl"], max_size=None)
        self.ws = self._conn.__enter__()
        self.ids = itertools.count(1); self.events = []
        for d in ("Page", "Runtime", "Log", "Network"): self.call(f"{d}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method:str, timeout:float=60, **params)->dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        end = time.time() + timeout
        while True:
            m = json.loads(self.ws.recv(timeout=max(0.1, end - time.time())))
            if m.get("id") == i:
                if "error" in m: raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def pump(self, seconds:float):
        end = time.time() + seconds
        while time.time() < end:
            try: self.events.append(json.loads(self.ws.recv(timeout=max(0.05, end - time.time()))))
            except TimeoutError: return

    def open(self, url:str, settle:float=1.0):
        self.events = []
        self.call("Page.navigate", url=url)
        end = time.time() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events) and time.time() < end:
            self.pump(0.2)
        self.pump(settle)                       # let scripts run (search index, worker) and report

    def js(self, expr:str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r.get("result", {}).get("value")

def problems(page:Page, base:str)->list:
    "What went wrong while the current page loaded, as one line each."
    out, urls = [], {}
    for e in page.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Network.requestWillBeSent":
            u = p["request"]["url"]; urls[p["requestId"]] = u
            if not u.startswith((base, "data:", "blob:", "about:", "chrome-extension:")): out.append(f"fetches from the network: {u}")
        elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
            out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"request failed ({p.get('errorText')}): {urls.get(p['requestId'], '?')}")
        elif m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            out.append("console error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]; out.append(f"uncaught exception: {d.get('exception', {}).get('description', d.get('text'))}")
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"console error: {p['entry']['text']} {p['entry'].get('url', '')}".strip())
    return list(dict.fromkeys(out))

def _target(site:Path, base:str, href:str):
    "(file, fragment) of an internal link, or None for an external one."
    if not href.startswith(base): return None
    u = urllib.parse.urlsplit(href)
    path = urllib.parse.unquote(u.path.lstrip("/"))
    f = site/path
    if path == "" or f.is_dir(): f = f/"index.html"
    return f, u.fragment

def _ids(f:Path, cache:dict)->set:
    if f not in cache: cache[f] = set(re.findall(r'\sid="([^"]+)"', f.read_text(encoding="utf-8", errors="replace")))
    return cache[f]

def check(site:Path, out:Path, exe:str)->int:
    site = site.resolve(); out.mkdir(parents=True, exist_ok=True)
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")
    if not (site/"index.html").is_file(): raise SystemExit(f"check_site: {site}/index.html not found; build the site first")
    srv, base = serve(site)
    profile = Path(tempfile.mkdtemp(prefix="chromium_profile_"))
    proc, devtools = start_chromium(exe, profile)
    report, ids, t0 = {}, {}, time.time()
    try:
        page = Page(devtools)
        for f in pages:
            rel = f.relative_to(site).as_posix()
            page.open(base + rel)
            bad = problems(page, base)
            for src in page.js("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)") or []:
                bad.append(f"image did not load: {src}")
            for href in dict.fromkeys(page.js("[...document.querySelectorAll('a[href]')].map(a => a.href)") or []):
                t = _target(site, base, href)
                if t is None: continue
                tf, frag = t
                if not tf.is_file(): bad.append(f"broken link: {href}")
                elif frag and tf.suffix == ".html" and urllib.parse.unquote(frag) not in _ids(tf, ids):
                    bad.append(f"link to a missing anchor: {href}")
            if rel == "index.html":
                shot = page.call("Page.captureScreenshot", format="png")
                (out/"index.png").write_bytes(base64.b64decode(shot["data"]))
            report[rel] = bad
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()
        srv.shutdown(); shutil.rmtree(profile, ignore_errors=True)
    (out/"report.json").write_text(json.dumps(report, indent=1) + "\n")
    n_bad = sum(1 for v in report.values() if v)
    for rel, bad in report.items():
        for b in bad: print(f"{rel}: {b}", file=sys.stderr)
    print(f"check_site: {len(report)} pages opened in Chromium in {time.time() - t0:.0f} s, {n_bad} with problems; "
          f"screenshot {out/'index.png'}")
    return 1 if n_bad else 0

def main(argv=None)->int:
    ap = argparse.ArgumentParser(prog="tools/check_site.py", description=__doc__.splitlines()[0])
    ap.add_argument("site", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent/"_site")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent/"_site_check")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    a = ap.parse_args(argv)
    return check(a.site, a.out, a.chromium)

if __name__ == "__main__": sys.exit(main())
