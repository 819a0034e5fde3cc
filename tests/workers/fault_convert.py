"""A converter child with one injected fault: `python -m tests.workers.fault_convert MODE`.

`exit` dies (status 3) on the first Convert, `hang` never answers, `garbage` writes bytes that
are not safetensors and reports success, `symlink` makes the target a link to /etc/passwd,
`fifo` makes it a named pipe, `huge_header` writes a header that claims more than the file,
`escape PATH PORT` acts as a pickle that got code execution: it tries to write PATH, connect
to 127.0.0.1:PORT and fork, and reports what happened as its error detail.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

from workers.runner import convert_child
from workers.runner.protocol import Convert, Converted

MODE = sys.argv[1] if len(sys.argv) > 1 else "exit"


def _attempt(action: object) -> str:
    try:
        result = action()  # type: ignore[operator]
    except OSError as exc:
        return f"denied:{exc.errno}"
    if result == 0:  # the forked child
        os._exit(0)
    return "allowed"


def escape() -> dict[str, str]:
    path, port = sys.argv[2], int(sys.argv[3])
    return {
        "write": _attempt(lambda: Path(path).write_text("escaped")),
        "connect": _attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2)),
        "fork": _attempt(os.fork),
    }


def faulty_answer(event: Convert) -> Converted:
    target = Path(event.target)
    if MODE == "escape":
        return Converted(tag=event.tag, error=True, detail="PROBE " + json.dumps(escape()))
    if MODE == "exit":
        os._exit(3)
    if MODE == "hang":
        while True:
            time.sleep(1)
    if MODE == "garbage":
        target.write_bytes(b"\x80\x02}q\x00." * 100)
    elif MODE == "symlink":
        target.symlink_to("/etc/passwd")
    elif MODE == "fifo":
        os.mkfifo(target)
    elif MODE == "huge_header":
        target.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return Converted(tag=event.tag, tensors=1)


if __name__ == "__main__":
    convert_child.answer = faulty_answer
    code = convert_child.main()
    sys.stderr.flush()
    os._exit(code)
