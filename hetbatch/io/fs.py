"""Filesystems from URLs: one place that turns a URL and its storage options into an fsspec
filesystem, and turns a missing driver or a bad option into one line for the user.

Credentials and endpoints come the usual way: the environment (`AWS_ENDPOINT_URL`,
`AWS_PROFILE`, `GOOGLE_APPLICATION_CREDENTIALS`, ...), the SDKs' profile files, and the job's
`storage_options`, passed to the fsspec driver as they are.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations

from hetbatch.errors import UserError


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `url` and the path inside it."""
    try:
        return url_to_fs(url, **(storage_options or {}))
    except ImportError:
        raise UserError(f"{url}: {missing_driver(url)}") from None
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise UserError(f"{url}: unknown URL scheme {_scheme(url)!r}") from None
        raise
    except TypeError as exc:
        raise UserError(f"{url}: storage_options not accepted by the driver: {exc}") from None


def filesystem_of(protocol: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A filesystem by protocol name (for workers, which receive paths without a scheme)."""
    try:
        return fsspec.filesystem(protocol, **(storage_options or {}))
    except ImportError:
        raise UserError(f"{protocol}://: {missing_driver(protocol + '://')}") from None


def missing_driver(url: str) -> str:
    """What to install for a URL whose fsspec driver is not importable."""
    scheme = _scheme(url)
    known = known_implementations.get(scheme, {})
    package = str(known.get("class", "")).split(".", 1)[0]
    if package and package != "fsspec":
        return f"{scheme}:// needs the package {package!r}: pip install {package}"
    return str(known.get("err") or f"no fsspec driver for {scheme}:// is installed")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def list_input_files(
    fs: fsspec.AbstractFileSystem, path: str, original: str, suffixes: tuple[str, ...], kind: str
) -> dict[str, int]:
    """Input files and their sizes from one listing (sizes come with it: no request per file).

    A glob takes every file it matches; a folder, its files ending in `suffixes` outside
    hidden or `_` folders; a file, itself. `kind` names the files in the error for none.
    """
    try:
        if any(ch in path for ch in "*?["):
            found = fs.glob(path, detail=True)
            files = {p: i for p, i in found.items() if i.get("type") != "directory"}
        else:
            found = fs.find(path, detail=True)
            files = {
                p: i
                for p, i in found.items()
                if p.rstrip("/") == path.rstrip("/")
                or (
                    p.endswith(suffixes)
                    and not any(part.startswith(("_", ".")) for part in p[len(path) :].split("/"))
                )
            }
    except FileNotFoundError:
        files = {}
    except Exception as exc:  # credentials, network, permissions: the driver's own words
        raise UserError(f"{original}: cannot list the input: {one_line(exc)}") from None
    if not files:
        if not fs.exists(path):
            raise UserError(f"{original}: input path does not exist")
        raise UserError(f"{original}: no {kind} files found")
    sizes = {p: files[p].get("size") for p in sorted(files)}
    return {p: int(size if size is not None else fs.size(p)) for p, size in sizes.items()}


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's protocol name (the first, where a driver has several)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def shown_path(protocol: str, path: str) -> str:
    """An input file as the user would write it: a bare path on this machine's disk."""
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocols or "s3a" in protocols


def one_line(exc: BaseException) -> str:
    """A driver's error message on one line (botocore's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class FileSequence:
    """What an input dataset of `files` (each with `path`, `first_row`, `num_rows`, `size`, in
    global row order) answers alike whatever the file format."""

    files: tuple[Any, ...]

    @property
    def num_rows(self) -> int:
        return self.files[-1].first_row + self.files[-1].num_rows if self.files else 0

    def fingerprint(self) -> list[dict]:
        """What identifies this input, so that a resume can refuse a changed dataset."""
        return [{"path": f.path, "rows": f.num_rows, "size": f.size} for f in self.files]
