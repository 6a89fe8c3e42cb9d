"""Host-side handling of what a sandbox leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

from bottles import _sandbox_output


def test_sandbox_output_is_read_only_from_regular_files(tmp_path: Path) -> None:
    secret = tmp_path / "forge-token"
    secret.write_text("a" * 40)
    regular = tmp_path / "head"
    regular.write_text("b" * 40 + "\n")
    link = tmp_path / "link"
    link.symlink_to(secret)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    empty = tmp_path / "empty"
    empty.touch()
    assert _sandbox_output(regular, limit=128) == b"b" * 40 + b"\n"
    assert _sandbox_output(regular, limit=4) == b"bbbb"
    assert _sandbox_output(link, limit=128) is None  # never followed to the secret
    assert _sandbox_output(fifo, limit=128) is None  # never blocks on a FIFO
    assert _sandbox_output(empty, limit=128) is None
    assert _sandbox_output(tmp_path / "missing", limit=128) is None
    assert _sandbox_output(tmp_path, limit=128) is None  # a directory
