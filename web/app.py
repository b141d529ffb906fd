"""Launcher for the Gradio chat page: `python web/app.py [--model DIR] [--port 7860] ...` from a fresh clone.

Works without `pip install -e .`: when the package is not importable, the repository root is put on
sys.path first. All flags are those of `dialogpt-zh-web --help` (dialogpt_zh/webapp.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import dialogpt_zh  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dialogpt_zh.webapp import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
