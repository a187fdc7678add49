"""The browser snippet, run by a real browser on another origin: CORS lets it through and the event lands."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from services.config import ServingSettings, Settings
from services.serve.app import create_app
from services.serve.worker import Worker
from services.storage.memory import MemoryPublisher, memory_caches
from tests.conftest import free_port
from training.registry import MemoryRegistry

PAGE = """<!doctype html><html><body><pre id="out">waiting</pre>
<script src="{api}/sdk/rankloop.js"></script>
<script>
rankloop("{api}", null).click("req-1", "d1")
  .then(function (answer) {{ document.getElementById("out").textContent = JSON.stringify(answer); }})
  .catch(function (e) {{ document.getElementById("out").textContent = "failed: " + e; }});
</script></body></html>"""


def test_the_browser_snippet_sends_an_event_from_an_allowed_origin(tiny_first_stage, tmp_path):
    import uvicorn

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.fail("no headless browser: `make test` installs Debian's chromium (or: apt-get install chromium)")
    api_port, page_port = free_port(), free_port()
    api, origin = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{page_port}"
    s = Settings(state_dir=tmp_path, serving=ServingSettings(port=api_port, explore_rate=0.0, cors_origins=[origin]))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    server = uvicorn.Server(uvicorn.Config(create_app(s, worker, watch_events=False), port=api_port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "index.html").write_text(PAGE.format(api=api))
    pages = ThreadingHTTPServer(("127.0.0.1", page_port), partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "page")))
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{api}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
        run = subprocess.run(
            [*flags, "--virtual-time-budget=10000", "--dump-dom", f"{origin}/index.html"], capture_output=True, timeout=120
        )
        out = run.stdout.decode()
        answer = json.loads(out.split('<pre id="out">')[1].split("</pre>")[0])
    finally:
        server.should_exit = True
        pages.shutdown()
    assert len(answer["accepted"]) == 1 and answer["rejected"] == []
    (sent,) = [json.loads(m) for m in worker.publisher.on(worker.keys.interactions)]
    assert sent["type"] == "click" and sent["request_id"] == "req-1" and sent["timestamp"] < 1e11  # seconds, not ms
