"""Run tamper-test actions in this one process and print each one's exit code and output as JSON.

Used by ``tests/unit/test_tamper.py`` inside a private mount namespace (``unshare -rm``), where
a run directory is mounted read-only or on a tiny file system; nothing leaves that namespace.

Usage: ``python tests/tamper_driver.py '[["fill", PATH, FREE_BYTES], ["train", ARG...], ["ckpt", ARG...]]'``
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def call(kind: str, args: list[str]) -> dict:
    if kind == "fill":  # leave only FREE_BYTES free on the file system holding PATH
        path, free = Path(args[0]), int(args[1])
        st = os.statvfs(path.parent)
        with open(path, "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free))
        return {"code": 0, "text": ""}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if kind == "train":
                from launcher.run import main
            else:
                from launcher.ckpt import main
            code = main(args)
        except SystemExit as e:
            code = e.code
        except BaseException:  # what a user would see as a traceback
            traceback.print_exc()
            code = 1
    return {"code": code, "text": buf.getvalue()}


if __name__ == "__main__":
    for kind, *args in json.loads(sys.argv[1]):
        print(json.dumps(call(kind, args)), flush=True)
