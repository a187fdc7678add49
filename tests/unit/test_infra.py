"""Stopping the local stack waits for its processes: the next `up` must not find a dying one's port."""

from __future__ import annotations

import subprocess
import sys
import time

from services.config import Settings
from services.local import infra

SLOW_TO_STOP = (
    "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), sys.exit(0)))\ntime.sleep(60)\n"
)
DEAF = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"


def spawn(s: Settings, name: str, code: str) -> subprocess.Popen:
    (s.state_dir / "run").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    (s.state_dir / "run" / f"{name}.pid").write_text(str(proc.pid))
    time.sleep(0.5)  # the handlers are installed
    return proc


def test_down_returns_once_every_component_has_exited(tmp_path):
    s = Settings(state_dir=tmp_path)
    slow, deaf = spawn(s, "kafka", SLOW_TO_STOP), spawn(s, "redis", DEAF)
    stopped = infra.down(s, timeout=3.0)
    assert slow.poll() is not None and deaf.poll() is not None  # the deaf one was killed after the timeout
    assert sorted(n.split()[0] for n in stopped) == ["kafka", "redis"]
    assert not list((tmp_path / "run").glob("*.pid"))
    assert infra.down(s) == []
