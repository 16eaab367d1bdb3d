"""A data pipeline worker: ``python -m farm.data.render_worker`` (started by farm.data.parallel).

Reads ``("init", tokenizer, train_on, max_seq_len)`` then ``("prepare", items, format)`` frames on
stdin and writes ``("ok", PreparedBatch)`` or ``("error", message)`` frames to the pipe its
parent passed; exits when stdin closes.
"""

from __future__ import annotations

import os
import sys

from farm.data.parallel import RESULT_FD, read_frame, frame
from farm.data.prepare import prepare_batch
from farm.data.render import Renderer


def _serve() -> None:
    """A worker's loop: read (init | prepare) frames from stdin, write results to the result pipe."""
    results = os.fdopen(int(os.environ[RESULT_FD]), "wb")
    stdin = sys.stdin.buffer
    renderer: Renderer | None = None
    while True:
        try:
            message = read_frame(stdin)
        except EOFError:
            return
        if message[0] == "init":
            renderer = Renderer(*message[1:])
            continue
        try:
            reply: tuple = ("ok", prepare_batch(message[1], message[2], renderer))
        except Exception as exc:  # reported by the parent, which stops the tenant's read
            reply = ("error", f"{type(exc).__name__}: {exc}")
        results.write(frame(reply))
        results.flush()


if __name__ == "__main__":
    _serve()
