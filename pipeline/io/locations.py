"""Where a URI points: one spelling per place (``normalise_uri``), manifest paths resolved against
the manifest's folder, and whether a URI lies under a root (``is_within``: the confinement of
manifests and their mask paths), compared as the storage would open it."""
from __future__ import annotations

import os
import posixpath
from typing import Iterable, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

import fsspec


def _normalised(path: str) -> str:
    return posixpath.normpath(path) if path else path


def normalise_uri(uri: str) -> str:
    """``a/./b/../c.jpg`` -> ``a/c.jpg``, also inside URLs (``s3://b/x/../y``): one image, one URI
    (and one image_id) however a manifest spells its path, and ``..`` cannot hide where it leads."""
    parts = urlsplit(uri)
    if len(parts.scheme) > 1:  # a URL (a one-letter scheme would be a Windows drive)
        return urlunsplit(parts._replace(path=_normalised(parts.path))) if parts.path else uri
    return _normalised(uri)


def is_within(uri: str, roots: Iterable[str], storage_options: dict | None = None) -> bool:
    """True when ``uri`` lies under one of ``roots`` on the same storage, however it is spelled.

    What is compared is what the storage would open: ``..`` resolved; for URLs also after decoding
    percent-escapes (yarl and many servers read ``%2E%2E`` as ``..``; some decode twice), every
    decoding checked, with ``\\`` as ``/`` too; for local paths after resolving symlinks (a link in
    the manifest's folder that points elsewhere is outside). ``storage_options``: unused (nothing
    is opened)."""
    where, spellings = _locations(uri)
    for root in roots:
        root_where, root_spellings = _locations(root)
        if where == root_where and all(
            _under(path, root_spellings[min(level, len(root_spellings) - 1)][variant])
            for level, paths in enumerate(spellings) for variant, path in enumerate(paths)
        ):
            return True
    return False


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return not root or path == root or path.startswith(root + "/")


def _locations(uri: str) -> tuple[tuple, list[tuple[str, ...]]]:
    """For ``is_within``: (the storage: family of protocols, and the host for http), and the path
    at each level of percent-decoding (as written first), each normalised as is and with ``\\``
    read as ``/``; one level for local paths: the real path, symlinks resolved."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""  # one letter: a Windows drive
    if scheme in ("", "file", "local"):
        path = os.path.realpath(os.path.abspath(uri.split("://", 1)[1] if scheme else uri))
        return ("file",), [(path,)]
    if "::" in uri:  # a chained URL (simplecache::s3://...): compared as written, normalised
        return ("chained",), [(normalise_uri(uri),) * 2]
    family = _protocols(scheme)
    http = scheme in ("http", "https")
    where = (family, parts.netloc.lower()) if http else (family,)
    path = parts.path if http else f"{parts.netloc}{parts.path}"  # object stores: the bucket leads
    levels = []
    for _ in range(4):  # as written, then decoded again while that changes it (%252E -> %2E -> .)
        levels.append((posixpath.normpath("/" + path), posixpath.normpath("/" + path.replace("\\", "/"))))
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return where, levels


def resolve_relative(ref: str, base_uri: Optional[str]) -> str:
    """A manifest's ``uri`` or mask path: absolute (``/x``, ``s3://b/x``) as is, else under ``base_uri``."""
    if "://" in ref or ref.startswith("/") or base_uri is None:
        return normalise_uri(ref)
    return normalise_uri(f"{base_uri.rstrip('/')}/{ref}")


def _protocols(scheme: str) -> tuple[str, ...]:
    """Every name of the filesystem behind ``scheme`` (``s3`` and ``s3a`` are one storage)."""
    try:
        protocol = fsspec.get_filesystem_class(scheme).protocol
    except (ImportError, ValueError):
        return (scheme,)
    return tuple(sorted(protocol)) if isinstance(protocol, (tuple, list)) else (protocol,)
