"""API keys: clients send `Authorization: Bearer <key>`; the server stores only sha256(key).

Keys file (JSON or YAML):

    keys:
      - sha256: 9f86d081...        # sha256 hex of the key
        customer: acme             # this key sees and calls only acme's adapters
      - sha256: 60303ae2...
        role: admin                # sees everything (no customer field: an entry is one or the other)

Refused, naming the file, entry and value: a hash given twice (file and FARM_SERVE_KEYS alike), a
customer name the catalog's ref rules refuse (it could never match an adapter), an entry with both
customer and role, a role other than admin, and unknown fields.

FARM_SERVE_KEYS adds keys from the environment: `<sha256>=customer:acme,<sha256>=admin`.
`python -m farm.serve.auth --customer acme` mints a key and prints the line to add (`--tinker`: a `tml-` key,
the form the tinker SDK insists on; the Tinker API also reads it from `X-API-Key`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from farm.errors import FarmError

ENV_VAR = "FARM_SERVE_KEYS"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a customer (scoped) or admin (customer None)."""

    customer: str | None
    admin: bool = False

    def may_use(self, customer: str) -> bool:
        return self.admin or self.customer == customer


ANONYMOUS_ADMIN = Principal(customer=None, admin=True)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ENTRY_FIELDS = ("sha256", "customer", "role")
ROLES = ("admin",)


def _customer(name: object, where: str) -> Principal:
    # a customer key only ever sees adapters under refs `<customer>/...`: a name the catalog's ref
    # rules refuse would be a key that authenticates and then matches nothing, silently
    from farm.manifest import check_name

    try:
        return Principal(customer=check_name(name))
    except ValueError as exc:
        raise FarmError(f"{where}: customer {name!r} can never match an adapter ref: it {exc}") from None


def _principal(spec: dict | str, where: str) -> Principal:
    """A keys-file entry or env spec as a Principal. An entry is a customer key (`customer: <name>`)
    or an admin key (`role: admin`), exactly one of the two: both at once is refused, not guessed."""
    if isinstance(spec, str):  # env form: "admin" | "customer:acme"
        if spec == "admin":
            return ANONYMOUS_ADMIN
        if spec.startswith("customer:") and spec[9:]:
            return _customer(spec[9:], where)
        raise FarmError(f"{where}: {spec!r} is neither 'admin' nor 'customer:<name>'")
    unknown = sorted(str(k) for k in spec if k not in ENTRY_FIELDS)
    if unknown:
        raise FarmError(f"{where}: unknown field(s) {unknown}; an entry has sha256 and either customer or role")
    has_customer, has_role = "customer" in spec, "role" in spec
    if has_customer and has_role:
        raise FarmError(f"{where}: has both customer {spec['customer']!r} and role {spec['role']!r}; a key is "
                        "either a customer key (customer: <name>) or an admin key (role: admin, no customer)")
    if has_role:
        if spec["role"] not in ROLES:
            raise FarmError(f"{where}: role {spec['role']!r} is not allowed; the only role is 'admin' "
                            "(for a customer key write customer: <name>)")
        return ANONYMOUS_ADMIN
    if has_customer:
        return _customer(spec["customer"], where)
    raise FarmError(f"{where}: each key needs 'customer: <name>' or 'role: admin'")


def _check_hash(h: str, where: str) -> str:
    h = h.strip().lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise FarmError(f"{where}: {h[:12]!r}... is not a sha256 hex digest (store hashes, never keys)")
    return h


def _add(entries: dict[str, Principal], seen: dict[str, str], h: str, principal: Principal, where: str) -> None:
    # a second entry with the same hash would silently decide which tenant one key belongs to
    if h in seen:
        raise FarmError(f"{where}: sha256 {h[:12]}... is already given by {seen[h]}; each key appears once")
    entries[h], seen[h] = principal, where


class KeyStore:
    """sha256(key) -> Principal. Empty means no authentication (allowed on loopback only)."""

    def __init__(self, entries: dict[str, Principal] | None = None):
        self._by_hash = dict(entries or {})

    def __len__(self) -> int:
        return len(self._by_hash)

    def entries(self) -> dict[str, dict]:
        """Plain data (hash -> principal fields) to hand to Serve replicas."""
        return {h: {"customer": p.customer, "admin": p.admin} for h, p in self._by_hash.items()}

    @classmethod
    def load(cls, path: str | Path | None = None, env: str | None = None) -> KeyStore:
        entries: dict[str, Principal] = {}
        seen: dict[str, str] = {}  # hash -> where it was given
        if path:
            p = Path(path)
            try:
                text = p.read_text(encoding="utf-8")
            except OSError as exc:
                raise FarmError(f"keys file {p}: cannot read: {exc.strerror}") from None
            try:
                data = json.loads(text)
            except ValueError:
                import yaml

                data = yaml.safe_load(text)
            items = (data or {}).get("keys") if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise FarmError(f"keys file {p}: expected a top-level 'keys:' list")
            for i, item in enumerate(items):
                where = f"keys file {p}: keys[{i}]"
                if not isinstance(item, dict) or "sha256" not in item:
                    raise FarmError(f"{where}: needs 'sha256'")
                _add(entries, seen, _check_hash(str(item["sha256"]), where), _principal(item, where), where)
        env = os.environ.get(ENV_VAR, "") if env is None else env
        for i, part in enumerate(x for x in env.split(",") if x.strip()):
            where = f"{ENV_VAR} entry {i}"
            h, sep, spec = part.strip().partition("=")
            if not sep:
                raise FarmError(f"{where}: expected <sha256>=admin or <sha256>=customer:<name>")
            _add(entries, seen, _check_hash(h, where), _principal(spec.strip(), where), where)
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller for an Authorization header, or None when the key is missing or unknown."""
        if not self._by_hash:
            return ANONYMOUS_ADMIN
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hash_key(authorization[7:].strip())
        for h, principal in self._by_hash.items():  # constant-time compare of every entry
            if hmac.compare_digest(h, digest):
                return principal
        return None


def main(argv: list[str] | None = None) -> None:
    """Mint a key: prints the key once (give it to the customer) and the keys-file entry."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m farm.serve.auth")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer")
    who.add_argument("--admin", action="store_true")
    ap.add_argument("--tinker", action="store_true",
                    help="a tml-... key: the tinker SDK refuses keys without that prefix before sending them")
    args = ap.parse_args(argv)
    if args.customer is not None:
        try:
            _customer(args.customer, "--customer")
        except FarmError as exc:
            ap.error(str(exc))
    key = ("tml-" if args.tinker else "farm-") + secrets.token_urlsafe(32)
    role = "role: admin" if args.admin else f"customer: {args.customer}"
    print(f"key (shown once): {key}", file=sys.stderr)
    print(f"  - sha256: {hash_key(key)}\n    {role}")


if __name__ == "__main__":
    main()
