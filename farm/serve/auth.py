"""API keys: clients send `Authorization: Bearer <key>`; the server stores only sha256(key).

Keys file (JSON or YAML):

    keys:
      - sha256: 9f86d081...        # sha256 hex of the key
        customer: acme             # this key sees and calls only acme's adapters
      - sha256: 60303ae2...
        role: admin                # sees everything

FARM_SERVE_KEYS adds keys from the environment: `<sha256>=customer:acme,<sha256>=admin`.
`python -m farm.serve.auth --customer acme` mints a key and prints the line to add.
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


def _principal(spec: dict | str, where: str) -> Principal:
    if isinstance(spec, str):  # env form: "admin" | "customer:acme"
        if spec == "admin":
            return ANONYMOUS_ADMIN
        if spec.startswith("customer:") and spec[9:]:
            return Principal(customer=spec[9:])
        raise FarmError(f"{where}: {spec!r} is neither 'admin' nor 'customer:<name>'")
    if spec.get("role") == "admin":
        return ANONYMOUS_ADMIN
    if isinstance(spec.get("customer"), str) and spec["customer"]:
        return Principal(customer=spec["customer"])
    raise FarmError(f"{where}: each key needs 'customer: <name>' or 'role: admin'")


def _check_hash(h: str, where: str) -> str:
    h = h.strip().lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise FarmError(f"{where}: {h[:12]!r}... is not a sha256 hex digest (store hashes, never keys)")
    return h


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
                entries[_check_hash(str(item["sha256"]), where)] = _principal(item, where)
        env = os.environ.get(ENV_VAR, "") if env is None else env
        for i, part in enumerate(x for x in env.split(",") if x.strip()):
            where = f"{ENV_VAR} entry {i}"
            h, sep, spec = part.strip().partition("=")
            if not sep:
                raise FarmError(f"{where}: expected <sha256>=admin or <sha256>=customer:<name>")
            entries[_check_hash(h, where)] = _principal(spec.strip(), where)
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
    args = ap.parse_args(argv)
    key = "farm-" + secrets.token_urlsafe(32)
    role = "role: admin" if args.admin else f"customer: {args.customer}"
    print(f"key (shown once): {key}", file=sys.stderr)
    print(f"  - sha256: {hash_key(key)}\n    {role}")


if __name__ == "__main__":
    main()
