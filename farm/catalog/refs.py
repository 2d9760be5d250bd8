"""Adapter references (`customer/adapter[@vN|@alias]`), parsed strictly before storage is touched.

A ref names storage keys, so anything that could escape a tenant's prefix (`..`, `/` inside a name,
absolute paths, URL schemes, percent-encoding, backslashes, control characters) is rejected here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from farm.errors import RefError
from farm.manifest import NAME_RULE, check_name

MAX_REF_LEN = 200
REF_FORM = "customer/adapter, customer/adapter@vN (N >= 1) or customer/adapter@alias"
ALIAS_RULE = f"{NAME_RULE}; not 'latest' and not of the form vN"
# fullmatch everywhere: `$` would also match before a trailing newline.
_VERSION_RE = re.compile(r"v([1-9][0-9]{0,8})")
# Characters a well-formed ref can contain at all; everything else is named in the error.
_REF_CHARS = re.compile(r"[a-z0-9._/@-]*")
_NAME_CHARS = re.compile(r"[a-z0-9._-]+")


def _check_name(value: str) -> str:
    if not isinstance(value, str) or not _NAME_CHARS.fullmatch(value):
        raise ValueError(f"must be {NAME_RULE}")
    return check_name(value)


@dataclass(frozen=True)
class AdapterRef:
    """A parsed ref. Exactly one of `version`/`alias` is set, or neither (= latest)."""

    customer: str
    adapter: str
    version: int | None = None
    alias: str | None = None

    @property
    def name(self) -> str:
        """`customer/adapter`, without a selector."""
        return f"{self.customer}/{self.adapter}"

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@v{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def _bad(ref: object, why: str) -> RefError:
    return RefError(f"bad adapter ref {ref!r}: {why}; expected {REF_FORM}, names being {NAME_RULE}")


def parse_ref(ref: str | AdapterRef) -> AdapterRef:
    """Parse and validate a ref string; raise RefError naming the problem. AdapterRefs pass through."""
    if isinstance(ref, AdapterRef):
        return ref
    if not isinstance(ref, str):
        raise _bad(ref, f"must be a string, not {type(ref).__name__}")
    if not ref:
        raise _bad(ref, "empty")
    if len(ref) > MAX_REF_LEN:
        raise _bad(ref[:40] + "...", f"{len(ref)} characters, at most {MAX_REF_LEN} allowed")
    if "://" in ref or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", ref):
        raise _bad(ref, "URL schemes are not allowed")
    if ref.startswith(("/", "~", "\\")):
        raise _bad(ref, "absolute paths are not allowed")
    if "%" in ref:
        raise _bad(ref, "percent-encoding is not allowed")
    if not _REF_CHARS.fullmatch(ref):
        bad = sorted({c for c in ref if not _REF_CHARS.fullmatch(c)})
        raise _bad(ref, f"character(s) {''.join(bad)!r} not allowed (uppercase, spaces, '\\' included)")
    body, sep, selector = ref.partition("@")
    if sep and ("@" in selector or not selector):
        raise _bad(ref, "at most one '@' followed by vN or an alias")
    parts = body.split("/")
    if len(parts) != 2:
        raise _bad(ref, f"needs exactly one '/' between customer and adapter, found {len(parts) - 1}")
    customer, adapter = parts
    for what, value in (("customer", customer), ("adapter", adapter)):
        try:
            _check_name(value)
        except ValueError:
            raise _bad(ref, f"{what} name {value!r} is invalid") from None
    if not sep:
        return AdapterRef(customer, adapter)
    m = _VERSION_RE.fullmatch(selector)
    if m:
        return AdapterRef(customer, adapter, version=int(m.group(1)))
    if selector == "latest":
        return AdapterRef(customer, adapter)
    try:
        check_alias(selector)
    except RefError:
        raise _bad(ref, f"selector {selector!r} is neither vN nor a valid alias ({ALIAS_RULE})") from None
    return AdapterRef(customer, adapter, alias=selector)


def check_alias(alias: str) -> str:
    """Validate an alias name (e.g. `prod`); aliases can't shadow `latest` or version pins."""
    ok = isinstance(alias, str) and alias != "latest" and not re.fullmatch(r"v[0-9]+", alias)
    if ok:
        try:
            _check_name(alias)
        except ValueError:
            ok = False
    if not ok:
        raise RefError(f"bad alias {alias!r}: must be {ALIAS_RULE}")
    return alias


def check_part(what: str, value: str) -> str:
    """Validate a bare customer or adapter name (CLI options, publish arguments)."""
    try:
        return _check_name(value)
    except ValueError:
        raise RefError(f"bad {what} name {value!r}: must be {NAME_RULE}") from None


_SAFE_FILE = re.compile(r"[A-Za-z0-9._-]+")
MAX_FILE_DEPTH = 3


def check_file_name(name: str) -> str:
    """Validate a file path inside a version folder (relative, '/'-separated, no dot-dirs or tricks).

    Applied when publishing and again to names read back from farm.json, so a tampered farm.json
    can't make fetch write outside its destination.
    """
    parts = name.split("/") if isinstance(name, str) else []
    ok = 0 < len(parts) <= MAX_FILE_DEPTH and all(
        _SAFE_FILE.fullmatch(p) and not p.startswith(".") for p in parts
    )
    if not ok:
        raise RefError(
            f"bad file name {name!r} in adapter folder: allowed are relative paths of at most "
            f"{MAX_FILE_DEPTH} parts of letters, digits, '.', '_', '-', not starting with '.'"
        )
    return name
