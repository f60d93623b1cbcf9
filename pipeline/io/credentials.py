"""Credentials inside URIs: taken out into storage options, refused when unclear, masked in text.

The rule: a URI that is stored (run.json, the tables, the report, exports) or logged never carries
user info or a signed query string. ``s3://KEY:SECRET@bucket/x`` and ``https://user:pw@host/x``
in a config key become a clean URI plus storage options (s3fs ``key``/``secret``, an HTTP
basic-auth header); a weights URL's query string (a signed URL) becomes the ``params`` aiohttp
adds to each request. Storage options travel to the workers as arguments and are never written
or logged (their values are ``***`` in run.json).

Users paste secrets unescaped, and about half of AWS secret keys hold a ``/``, so ``urlsplit``
(which ends the host at the first ``/``) cannot be trusted with them. ``parses`` lists every
reading of ``scheme://rest`` that is a plausible URI: no user info (the authority up to the first
``/`` is a host), or ``user[:password]@host`` ending at any ``@`` whose user part holds no
``/?#[]`` and whose host is a plausible host. One reading: use it. None or several (``:12/34@``
could be a port and a path): refuse, with a message that shows none of it.
"""
from __future__ import annotations

import base64
import re
from typing import Optional
from urllib.parse import parse_qsl, unquote

REDACTED = "***"

_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
S3_SCHEMES = ("s3", "s3a")
HTTP_SCHEMES = ("http", "https")
# A bucket name (lenient: old buckets and S3-compatible stores allow capitals and "_"); no port.
_BUCKET = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# A host name or IP (v4, or v6 in brackets), and an optional numeric port.
_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_NOT_IN_USER = set("/?#[]")
# Where a URI ends inside free text (log lines, error messages, JSON).
_URI_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s\"'<>`]*)")
_QUERY = re.compile(r"\?(?P<query>[^#]+)")


class CredentialError(ValueError):
    """A URI whose credentials cannot be taken out safely; the message shows none of them."""


def _end_of_host(text: str) -> int:
    found = [text.index(c) for c in "/?#" if c in text]
    return min(found) if found else len(text)


def _plausible_host(scheme: str, host: str) -> bool:
    pattern = _BUCKET if scheme in S3_SCHEMES else _HOST
    return bool(pattern.fullmatch(host))


def parses(scheme: str, rest: str) -> list[Optional[int]]:
    """Every plausible reading of ``scheme://rest``: None for "no user info", or the index in
    ``rest`` of the ``@`` that ends the user info."""
    found: list[Optional[int]] = []
    authority = rest[:_end_of_host(rest)]
    if "@" not in authority and _plausible_host(scheme, authority):
        found.append(None)
    for at, char in enumerate(rest):
        if char != "@":
            continue
        user = rest[:at].partition(":")[0]
        if _NOT_IN_USER & set(user):
            continue
        after = rest[at + 1:]
        if _plausible_host(scheme, after[:_end_of_host(after)]):
            found.append(at)
    return found


def _decoded(part: str, what: str) -> str:
    """A user name or password with its percent-escapes decoded (``%2F`` -> ``/``; a ``%`` not
    followed by two hex digits stays as it is); escapes that are not UTF-8 are refused."""
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise CredentialError(f"{what}: the user info holds percent-escapes that are not UTF-8 text (write % itself as %25)") from None


def _ambiguous(what: str, shown: str) -> CredentialError:
    return CredentialError(
        f"{what}: cannot tell where the user info of {shown} ends (a password with '/' or '@', or a path with '@'?). "
        "Give the credentials in storage options instead, or percent-encode '/' and '@' in the password "
        "(%2F, %40) and '@' in the path (%40)"
    )


def split_credentials(uri: str, what: str = "uri", query_to_params: bool = False) -> tuple[str, dict]:
    """``uri`` without its credentials, and the storage options that carry them instead.

    ``s3://KEY:SECRET@bucket/x`` -> (``s3://bucket/x``, {key, secret}); ``https://user:pw@host/x``
    -> (``https://host/x``, a basic-auth header). ``query_to_params`` (weights URLs): an http(s)
    query string moves to ``params``; otherwise an http(s) query string is refused, since the URI
    would be stored with it. User info in other schemes: a password is refused (give it in storage
    options); a bare name (``abfs://container@account``) is part of the address and stays.
    Raises CredentialError (the message names ``what``, never the credentials)."""
    match = _SCHEME.match(uri)
    if not match:
        return uri, {}
    scheme = match["scheme"].lower()
    head, rest = uri[:match.end()], uri[match.end():]
    options: dict = {}
    if "@" in rest:
        readings = parses(scheme, rest)
        masked = redact_uri(uri)
        if len(readings) != 1:
            if scheme in S3_SCHEMES + HTTP_SCHEMES or any(":" in rest[:at] for at in readings if at is not None):
                raise _ambiguous(what, masked)
            readings = [None]  # an address with '@' in it (abfs://container@account, a key with '@')
        at = readings[0]
        if at is not None:
            user, colon, password = rest[:at].partition(":")
            rest = rest[at + 1:]
            if scheme in S3_SCHEMES:
                if not (user and colon and password):
                    raise CredentialError(f"{what}: {masked} needs both a key id and a secret (s3://KEY:SECRET@bucket/...)")
                options = {"key": _decoded(user, what), "secret": _decoded(password, what)}
            elif scheme in HTTP_SCHEMES:
                token = base64.b64encode(f"{_decoded(user, what)}:{_decoded(password, what)}".encode()).decode()
                options = {"headers": {"Authorization": f"Basic {token}"}}
            elif colon:
                raise CredentialError(f"{what}: a password inside a {scheme}:// URI ({masked}) is not supported; "
                                      "give it in storage options")
            else:
                rest = uri[match.end():]  # a bare user name in another scheme: part of the address
    clean = head + rest
    if scheme in HTTP_SCHEMES and "?" in rest:
        path, _, query = rest.partition("?")
        query = query.split("#", 1)[0]
        if not query_to_params:
            raise CredentialError(
                f"{what}: {redact_uri(clean)} has a query string (a signed URL?), which would be stored with every "
                "URI read through it; signed URLs are taken only for weights (sam.checkpoint, detector.weights)"
            )
        options["params"] = [list(pair) for pair in parse_qsl(query, keep_blank_values=True)]
        clean = head + path
    return clean, options


def stored_uri_problem(uri: str) -> Optional[str]:
    """Why ``uri`` (a manifest line, read as RFC 3986 reads it: the host ends at the first ``/``)
    may not be stored, or None: user info, or an http(s) query string."""
    match = _SCHEME.match(uri)
    if not match:
        return None
    scheme, rest = match["scheme"].lower(), uri[match.end():]
    authority = rest[:_end_of_host(rest)]
    if "@" in authority and (scheme in S3_SCHEMES + HTTP_SCHEMES or ":" in authority.rsplit("@", 1)[0]):
        return "carries user info (user:password@)"
    if scheme in S3_SCHEMES + HTTP_SCHEMES and not _plausible_host(scheme, authority):
        return "does not start with a valid host"
    if scheme in HTTP_SCHEMES and "?" in rest:
        return "has a query string (a signed URL?)"
    return None


def merge_options(moved: dict, given: dict) -> dict:
    """Options taken out of a URI, under those given explicitly (which win, key by key; HTTP
    headers are merged header by header)."""
    merged = {**moved, **given}
    if isinstance(moved.get("headers"), dict) and isinstance(given.get("headers"), dict):
        merged["headers"] = {**moved["headers"], **given["headers"]}
    return merged


# ------------------------------------------------------------------ masking text


def _mask_user_info(rest: str) -> str:
    """``rest`` with everything up to the last ``@`` that may end user info replaced by ``***``
    (over-masking an address with '@' in its path is the safe side)."""
    last = None
    for at, char in enumerate(rest):
        if char == "@" and not (_NOT_IN_USER & set(rest[:at].partition(":")[0])):
            last = at
    return rest if last is None else f"{REDACTED}{rest[last:]}"


def redact_text(text: str) -> str:
    """Every URI inside ``text`` with its user info replaced by ``***`` and each query value by
    ``***`` (for run.json, log lines and error messages)."""
    def one(m: re.Match) -> str:
        rest = _mask_user_info(m["rest"])

        def query(q: re.Match) -> str:
            pairs = [part.split("=", 1)[0] + ("=" + REDACTED if "=" in part else "") for part in q["query"].split("&")]
            return "?" + "&".join(pairs)

        return m["scheme"] + _QUERY.sub(query, rest, count=1)

    return _URI_IN_TEXT.sub(one, text)


def redact_uri(uri: Optional[str]) -> Optional[str]:
    """A URI fit for run.json, logs and reports (see ``redact_text``)."""
    return redact_text(uri) if isinstance(uri, str) else uri


# Option keys whose values may be shown in messages (they locate storage, they do not unlock it).
NOT_SECRET = frozenset({"endpoint_url", "region_name", "anon", "use_ssl", "requester_pays", "default_block_size"})


def _secret_values(options, key: str = "") -> list[str]:
    if key == "params" and isinstance(options, (list, tuple)):  # a signed URL's query: [name, value] pairs
        return [v for pair in options if isinstance(pair, (list, tuple)) and len(pair) == 2 for v in _secret_values(pair[1], "value")]
    if isinstance(options, dict):
        return [v for k, sub in options.items() for v in _secret_values(sub, str(k))]
    if isinstance(options, (list, tuple)):
        return [v for item in options for v in _secret_values(item, key)]
    if key in NOT_SECRET or isinstance(options, bool) or options is None:
        return []
    text = str(options)
    values = [text] if len(text) >= 4 else []
    if text.startswith("Basic "):  # the base64 token alone, and the password it encodes
        token = text[len("Basic "):]
        values.append(token)
        try:
            password = base64.b64decode(token).decode().partition(":")[2]
        except ValueError:
            password = ""
        values += [password] if len(password) >= 4 else []
    return values


def redact(text: str, *option_sets: Optional[dict]) -> str:
    """``text`` with every storage-option value that may be a credential replaced by ``***``."""
    values = sorted({v for opts in option_sets if opts for v in _secret_values(opts)}, key=len, reverse=True)
    for value in values:
        text = text.replace(value, REDACTED)
    return text
