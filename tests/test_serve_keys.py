"""The keys file (farm/serve/auth.py): every ambiguous or dead entry is refused with an error that
names the file, the entry and the value; none is silently resolved."""

from __future__ import annotations

import pytest

from farm.errors import FarmError
from farm.serve.auth import KeyStore, hash_key


def _file(tmp_path, body: str):
    f = tmp_path / "keys.yaml"
    f.write_text("keys:\n" + body)
    return f


def test_a_hash_given_twice_is_refused_naming_both_entries(tmp_path):
    h = hash_key("k1")
    f = _file(tmp_path, f"  - sha256: {h}\n    customer: acme\n  - sha256: {h.upper()}\n    customer: globex\n")
    with pytest.raises(FarmError) as e:
        KeyStore.load(f, env="")
    msg = str(e.value)
    assert str(f) in msg and "keys[1]" in msg and "keys[0]" in msg and h[:12] in msg
    one = _file(tmp_path, f"  - sha256: {h}\n    customer: acme\n")
    with pytest.raises(FarmError, match=r"FARM_SERVE_KEYS entry 0: sha256 .* already given by keys file .*keys\[0\]"):
        KeyStore.load(one, env=f"{h}=admin")


@pytest.mark.parametrize("name", ["Acme", "acme corp", "acme/x", "..", "-acme", "a" * 64, ""])
def test_a_customer_name_no_ref_can_match_is_refused(tmp_path, name):
    f = _file(tmp_path, f"  - sha256: {hash_key('k1')}\n    customer: {name!r}\n")
    with pytest.raises(FarmError) as e:
        KeyStore.load(f, env="")
    assert str(f) in str(e.value) and "keys[0]" in str(e.value) and "can never match" in str(e.value)
    assert repr(name) in str(e.value) and "lowercase" in str(e.value)
    if name:
        with pytest.raises(FarmError, match="FARM_SERVE_KEYS entry 0: customer .* can never match"):
            KeyStore.load(None, env=f"{hash_key('k2')}=customer:{name}")


def test_an_entry_with_both_customer_and_admin_role_is_refused_not_guessed(tmp_path):
    f = _file(tmp_path, f"  - sha256: {hash_key('k1')}\n    customer: acme\n    role: admin\n")
    with pytest.raises(FarmError) as e:
        KeyStore.load(f, env="")
    msg = str(e.value)
    assert str(f) in msg and "keys[0]" in msg and "'acme'" in msg and "'admin'" in msg and "either" in msg


@pytest.mark.parametrize("extra, says", [("role: root", "role 'root' is not allowed"),
                                         ("role: Admin", "role 'Admin' is not allowed"),
                                         ("customer: acme\n    admin: true", "unknown field(s) ['admin']")])
def test_unknown_roles_and_fields_are_refused(tmp_path, extra, says):
    f = _file(tmp_path, f"  - sha256: {hash_key('k1')}\n    {extra}\n")
    with pytest.raises(FarmError, match=r"keys\[0\]") as e:
        KeyStore.load(f, env="")
    assert says in str(e.value)


def test_customer_and_admin_keys_written_the_documented_way_still_load(tmp_path):
    f = _file(tmp_path, f"  - sha256: {hash_key('k1')}\n    customer: acme-2.eu\n"
                        f"  - sha256: {hash_key('k2')}\n    role: admin\n")
    store = KeyStore.load(f, env=f"{hash_key('k3')}=customer:globex,{hash_key('k4')}=admin")
    assert store.authenticate("Bearer k1").customer == "acme-2.eu" and not store.authenticate("Bearer k1").admin
    assert store.authenticate("Bearer k2").admin and store.authenticate("Bearer k2").customer is None
    assert store.authenticate("Bearer k3").customer == "globex" and store.authenticate("Bearer k4").admin
