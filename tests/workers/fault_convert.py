"""A converter child with one injected fault: `python -m tests.workers.fault_convert MODE`.

`exit` dies (status 3) on the first Convert, `hang` never answers, `garbage` writes bytes that
are not safetensors and reports success, `symlink` makes the target a link to /etc/passwd,
`fifo` makes it a named pipe, `huge_header` writes a header that claims more than the file.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path

from workers.runner import convert_child
from workers.runner.protocol import Convert, Converted

MODE = sys.argv[1] if len(sys.argv) > 1 else "exit"


def faulty_answer(event: Convert) -> Converted:
    target = Path(event.target)
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
