"""The release workflow builds what pyproject.toml's [tool.cibuildwheel] selects.

Read from the repository beside this directory; skipped where the files are
absent (an unpacked sdist ships neither .github/ nor .ci/). The wheel matrix
is read from the workflow's text, so that the test needs no YAML library:
each entry of the wheels job's ``matrix.include`` is a one-line flow mapping.
Where PyYAML is installed (the ``checks`` dependency group), the text reading
is compared with a real parse, and the publish job's security is checked.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
WHEELS_SH = ROOT / ".ci" / "wheels.sh"

pytestmark = pytest.mark.skipif(
    not WORKFLOW.is_file(), reason=f"{WORKFLOW} is not beside the tests"
)

# The runners GitHub offers per architecture: each builds and tests its own
# architecture natively (no emulation). Add a runner here to use it.
NATIVE = {
    "ubuntu-24.04": ("linux", "x86_64"),
    "ubuntu-latest": ("linux", "x86_64"),
    "ubuntu-24.04-arm": ("linux", "aarch64"),
    "macos-15-intel": ("macos", "x86_64"),
    "macos-15": ("macos", "arm64"),
    "macos-14": ("macos", "arm64"),
    "macos-latest": ("macos", "arm64"),
}


def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _cibuildwheel() -> dict[str, Any]:
    config: dict[str, Any] = _pyproject()["tool"]["cibuildwheel"]
    return config


def _matrix_from_text(text: str) -> list[dict[str, str]]:
    """The wheels job's matrix.include entries, one flow mapping a line."""
    jobs = text.split("\njobs:\n", 1)[1]
    # The job is the block from "  wheels:" to the next job at that indent.
    found = re.search(r"^  wheels:\n(.*?)(?=^  \S|\Z)", jobs, re.M | re.S)
    assert found, "no wheels job in the release workflow"
    job = found[1]
    include = re.search(r"^( +)include:\n((?:\1  .*\n|\s*#.*\n)+)", job, re.M)
    assert include, "the wheels job has no matrix.include"
    entries = []
    for line in include[2].splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        flow = re.fullmatch(r"- \{(.*)\}", line)
        assert flow, f"not a one-line flow mapping: {line!r}"
        pairs = (item.split(":", 1) for item in flow[1].split(","))
        entries.append({k.strip(): v.strip() for k, v in pairs})
    return entries


def _workflow_text() -> str:
    return WORKFLOW.read_text()


def test_wheel_matrix_is_the_cibuildwheel_configuration() -> None:
    config = _cibuildwheel()
    wanted = {("linux", arch) for arch in config["linux"]["archs"]} | {
        ("macos", arch) for arch in config["macos"]["archs"]
    }
    entries = _matrix_from_text(_workflow_text())
    built = [(e["platform"], e["archs"]) for e in entries]
    assert len(built) == len(set(built)), f"a platform/arch built twice: {built}"
    assert set(built) == wanted, "the workflow's matrix is not [tool.cibuildwheel]'s"
    # Windows is skipped by the configuration, so no runner for it.
    assert any(s.startswith("*-win") for s in config["skip"])


def test_every_wheel_is_built_and_tested_natively() -> None:
    for entry in _matrix_from_text(_workflow_text()):
        runner = entry["runs-on"]
        assert runner in NATIVE, f"unknown runner {runner}: add it to NATIVE"
        assert NATIVE[runner] == (entry["platform"], entry["archs"]), entry


def test_the_workflow_leaves_the_selection_to_pyproject() -> None:
    # build, skip and the test command live in [tool.cibuildwheel] only.
    text = _workflow_text()
    for variable in ("CIBW_BUILD", "CIBW_SKIP", "CIBW_TEST", "CIBW_ENABLE"):
        assert variable not in text, f"{variable} overrides [tool.cibuildwheel]"


@pytest.mark.skipif(not WHEELS_SH.is_file(), reason=f"no {WHEELS_SH}")
def test_cibuildwheel_version_is_the_one_wheels_sh_checks() -> None:
    # .ci/wheels.sh asserts the build identifiers with this version.
    pinned = re.search(r"^CIBW_VERSION=(\S+)$", WHEELS_SH.read_text(), re.M)
    assert pinned
    used = set(re.findall(r"cibuildwheel==(\S+)", _workflow_text()))
    assert used == {pinned[1]}


def test_every_action_is_pinned_by_commit() -> None:
    uses = re.findall(r"^\s*(?:- )?uses:\s*(\S+)(.*)$", _workflow_text(), re.M)
    assert uses
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), action
        assert re.search(r"# v\d", comment), f"{action}: say which version"


def test_dependency_groups_hold_their_extras() -> None:
    # PEP 735 groups mirror the extras (tools that read one or the other).
    project = _pyproject()
    extras: dict[str, list[str]] = project["project"]["optional-dependencies"]
    groups: dict[str, list[Any]] = project["dependency-groups"]

    def expand_extra(name: str) -> set[str]:
        out = set()
        for req in extras[name]:
            self_ref = re.fullmatch(r"msyncext\[(\w+)\]", req)
            out |= expand_extra(self_ref[1]) if self_ref else {req}
        return out

    def expand_group(name: str) -> set[str]:
        out = set()
        for item in groups[name]:
            if isinstance(item, dict):
                out |= expand_group(item["include-group"])
            else:
                out.add(item)
        return out

    for name in extras:
        assert name in groups, f"no dependency group for the extra {name!r}"
        missing = expand_extra(name) - expand_group(name)
        assert not missing, f"group {name!r} lacks {sorted(missing)}"


# --- with PyYAML: the same, from a real parse --------------------------------


def _workflow_yaml() -> dict[Any, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML (the checks group) reads it")
    loaded: dict[Any, Any] = yaml.safe_load(_workflow_text())
    return loaded


def test_text_reading_agrees_with_yaml() -> None:
    workflow = _workflow_yaml()
    include = workflow["jobs"]["wheels"]["strategy"]["matrix"]["include"]
    as_text = [{k: str(v) for k, v in e.items()} for e in include]
    assert _matrix_from_text(_workflow_text()) == as_text


def test_only_the_publish_job_may_mint_tokens() -> None:
    workflow = _workflow_yaml()
    assert workflow.get("permissions") == {}, "top-level permissions must be {}"
    jobs = workflow["jobs"]
    for name, job in jobs.items():
        permissions = job.get("permissions", {})
        if name == "publish":
            assert permissions == {"id-token": "write"}
        else:
            assert "id-token" not in permissions, name
            assert set(permissions.values()) <= {"read"}, name
    publish = jobs["publish"]
    assert publish["environment"]["name"] == "pypi"
    assert "tag" in publish["if"]
    assert set(publish["needs"]) == set(jobs) - {"publish"}
    (step,) = (s for s in publish["steps"] if "gh-action-pypi-publish" in s["uses"])
    # Trusted publishing: no password or token handed to the action.
    assert not {"password", "user"} & set(step.get("with", {}))
    # The version tag triggers it: PyYAML reads the key "on" as True.
    assert workflow[True]["push"]["tags"] == ["v*"]
