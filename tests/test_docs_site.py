"tools/check_site.py finds what a reader of the docs site would hit (needs Debian's chromium; CI installs it)."
import importlib.util, shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("icrt_check_site", REPO/"tools"/"check_site.py")
check_site = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(check_site)
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
ICON = '<link rel="icon" href="data:,">'   # else the browser asks for /favicon.ico
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cfc0f01f0005000201"
                    "a5a0d2c40000000049454e44ae426082")

def test_a_clean_site_passes_and_leaves_a_screenshot(tmp_path):
    site = tmp_path/"site"; site.mkdir(); (site/"dot.png").write_bytes(PNG)
    (site/"index.html").write_text(ICON + '<h1 id="top">Home</h1><img src="dot.png"><a href="page.html#a">page</a><a href="#top">top</a>')
    (site/"page.html").write_text(ICON + '<h2 id="a">A</h2><a href="index.html">home</a>')
    assert check_site.check(site, tmp_path/"out", shutil.which("chromium")) == 0
    assert (tmp_path/"out"/"index.png").read_bytes()[:4] == b"\x89PNG"

def test_each_fault_fails_the_run(tmp_path, capsys):
    site = tmp_path/"site"; site.mkdir()
    (site/"index.html").write_text(ICON + '<a href="gone.html">x</a><a href="page.html#nowhere">y</a><img src="missing.png">'
                                   '<script>console.error("boom")</script><script src="https://cdn.example.com/x.js"></script>')
    (site/"page.html").write_text(ICON + "<p>ok</p>")
    assert check_site.check(site, tmp_path/"out", shutil.which("chromium")) == 1
    err = capsys.readouterr().err
    for what in ["broken link: http://127.0.0.1", "gone.html", "missing anchor", "page.html#nowhere", "image did not load",
                 "missing.png", "console error: boom", "fetches from the network: https://cdn.example.com/x.js"]:
        assert what in err, what
