"""A skipped browser test must not pass for a run: its reason (how to run it) stands just above pytest's last line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_skipped_browser_tests_say_how_to_run_them_above_the_last_line(tmp_path):
    env = {**os.environ, "DIALOGPT_ZH_CHROMIUM": str(tmp_path / "no-chromium-here")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_web_browser.py",
                        "tests/test_web_judging_browser.py"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("4 skipped")
    assert "browser tests skipped" in lines[-3]                         # the section just above the last line
    assert lines[-2].startswith("4 skipped: ") and "apt-get install chromium" in lines[-2]
    assert str(tmp_path / "no-chromium-here") in lines[-2]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_web_browser.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 2 and all("apt-get install chromium" in line for line in skips)   # and in -rs
