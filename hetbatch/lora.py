"""LoRA adapters per row: a row's adapter name to what vLLM needs (name, id, local folder).

Adapters on object stores are copied to a local folder once per process (vLLM loads adapters
from local folders). Every adapter of a job stays loaded in the engine (`max_cpu_loras`) and up
to `max_loras` of them run in one batch, so rows of different adapters mixed in a unit do not
make an instance load and unload adapters in turn.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

from hetbatch.io.fs import filesystem
from hetbatch.io.parquet import is_local
from hetbatch.spec import LoraSpec

_LOCAL: dict[str, str] = {}
_LOCK = threading.Lock()


def adapter_request(lora: LoraSpec, name: Any) -> tuple[str, int, str] | None:
    """(name, vLLM id, local folder) of a row's adapter; None for the base model. Raises
    KeyError for a name the job does not know."""
    if name is None:
        return None
    if name not in lora.adapters:
        raise KeyError(name)
    return name, lora.adapter_id(name), local_folder(lora.adapters[name])


def local_folder(url: str) -> str:
    """An adapter folder on this machine's disk, copied there once if it is elsewhere."""
    with _LOCK:
        if url not in _LOCAL:
            fs, path = filesystem(url)
            if is_local(fs):
                _LOCAL[url] = os.path.abspath(path)
            else:
                target = tempfile.mkdtemp(prefix="hetbatch-lora-")
                fs.get(path.rstrip("/") + "/", target + "/", recursive=True)
                _LOCAL[url] = target
        return _LOCAL[url]
