"""Files written so that a crash never leaves a half-written one under the final name."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomic(path: str, text: str) -> str:
    """Writes `text` to path via a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=indent))
