"""An fsspec filesystem that fails on demand, for tests of failed shard writes.

`flaky://` is this machine's disk, except that writing a shard to staging raises OSError
while the file named by FLAKY_SWITCH exists; with FLAKY_ONCE set, the first write to fail
removes the switch (one failure, then writes succeed). Worker processes learn the protocol
through the `sitecustomize` that `install` writes onto their PYTHONPATH.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "flaky"


class FlakyFileSystem(LocalFileSystem):
    protocol = (PROTOCOL,)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"auto_mkdir": True, **kwargs})  # folders appear as on a store

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode and "/_hetbatch/staging/" in str(path) and _fail_now():
            raise OSError(errno.EIO, "the store refused the write", str(path))
        return super()._open(path, mode, **kwargs)


def _fail_now() -> bool:
    switch = os.environ.get("FLAKY_SWITCH")
    if not switch:
        return False
    if not os.environ.get("FLAKY_ONCE"):
        return os.path.exists(switch)
    try:
        os.remove(switch)  # only one writer wins the removal: one failure in all
    except FileNotFoundError:
        return False
    return True


def install(folder: Path) -> str:
    """Write a sitecustomize that registers `flaky://` in every Python started with `folder`
    on its PYTHONPATH; returns that PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import fsspec\n"
        f"fsspec.register_implementation({PROTOCOL!r}, 'tests.flakyfs.FlakyFileSystem')\n"
    )
    repo = str(Path(__file__).resolve().parents[1])  # where `tests` is importable from
    return os.pathsep.join([str(folder), repo, os.environ.get("PYTHONPATH", "")])
