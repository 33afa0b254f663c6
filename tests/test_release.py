"""The release workflow builds what pyproject.toml's [tool.cibuildwheel] selects.

Read from the repository beside this directory; skipped where the files are
absent (an unpacked sdist ships neither .github/ nor .ci/). The wheel matrix
is read from the workflow's text, so that the test needs no YAML library:
each entry of the wheels job's ``matrix.include`` is a one-line flow mapping.
Where PyYAML is installed (the ``checks`` dependency group), the text reading
is compared with a real parse, and the publish job's security is checked.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import tempfile
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


# --- what is published is what was tested -------------------------------------


def _jobs() -> dict[str, Any]:
    jobs: dict[str, Any] = _workflow_yaml()["jobs"]
    return jobs


def _uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if s.get("uses", "").startswith(action + "@")]


def _run_text(job: dict[str, Any]) -> str:
    return "\n".join(s.get("run", "") for s in job["steps"])


def _downloads_the_sdist(job: dict[str, Any]) -> bool:
    downloads = _uses(job, "actions/download-artifact")
    return any(d.get("with", {}).get("name") == "dist-sdist" for d in downloads)


def test_wheels_are_built_from_the_sdist() -> None:
    wheels = _jobs()["wheels"]
    assert "sdist" in wheels.get("needs", [])
    # No checkout to build from: only the sdist artifact is there.
    assert not _uses(wheels, "actions/checkout")
    assert _downloads_the_sdist(wheels)
    assert re.search(r"cibuildwheel==\S+ dist/\*\.tar\.gz$", _run_text(wheels), re.M)


def test_the_sdist_itself_is_installed_and_tested() -> None:
    jobs = _jobs()
    testers = [
        name
        for name, job in jobs.items()
        if name not in ("sdist", "wheels", "publish")
        and "sdist" in job.get("needs", [])
        and _downloads_the_sdist(job)
        and not _uses(job, "actions/checkout")
    ]
    assert testers, "no job installs and tests the sdist artifact"
    for name in testers:
        run = _run_text(jobs[name])
        assert 'pip install "${sdist[0]}[test]"' in run, name
        assert 'tar -xzf "${sdist[0]}"' in run, name  # its own tests
        assert re.search(r"python -Im pytest \"\$\{tests\[0\]\}\"", run), name
    # ... and the publish job waits for it.
    assert set(testers) <= set(jobs["publish"]["needs"])


def _sdist_files() -> list[str]:
    """The files the sdist is made of, as setuptools lists them (egg_info's
    SOURCES.txt, from pyproject.toml, setup.py and MANIFEST.in)."""
    pytest.importorskip("setuptools", reason="setuptools lists the sdist's files")
    with tempfile.TemporaryDirectory() as base:
        done = subprocess.run(
            [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", base],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        (sources,) = Path(base).glob("*.egg-info/SOURCES.txt")
        listed = sources.read_text().splitlines()
    # Less what egg_info writes itself (listed under its --egg-base).
    return [f for f in listed if not f.startswith(base)]


def _github_glob(pattern: str) -> re.Pattern[str]:
    """A paths filter pattern as GitHub reads it: * within a directory, **
    across them, ? one character or none."""
    assert not pattern.startswith("!"), "negated patterns are not handled here"
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]?"}
    return re.compile("".join(wild.get(p, re.escape(p)) for p in parts))


def test_pull_requests_build_whatever_changes_what_is_built_or_tested() -> None:
    paths = _workflow_yaml()[True]["pull_request"]["paths"]
    patterns = [_github_glob(p) for p in paths]
    files = _sdist_files()
    assert "msyncext/__init__.py" in files
    assert "tests/test_release.py" in files
    missed = [f for f in files if not any(p.fullmatch(f) for p in patterns)]
    assert not missed, f"a pull request changing these builds no release: {missed}"
    assert any(p.fullmatch(".github/workflows/release.yml") for p in patterns)


def _tag_check_script() -> str:
    (step,) = (s for s in _jobs()["sdist"]["steps"] if "TAG" in s.get("env", {}))
    assert step["if"] == "github.ref_type == 'tag'"
    assert step["env"]["TAG"] == "${{ github.ref_name }}"
    script: str = step["run"]
    return script


@pytest.mark.parametrize(
    ("tag", "version", "passes"),
    [
        ("v0.2.0", "0.2.0", True),
        ("v1.0", "1.0", True),
        ("v10.20.30", "10.20.30", True),
        ("v0.2.0.dev0", "0.2.0.dev0", False),
        ("v0.2.0a1", "0.2.0a1", False),
        ("v0.2.0b2", "0.2.0b2", False),
        ("v0.2.0rc1", "0.2.0rc1", False),
        ("v0.2.0.post1", "0.2.0.post1", False),
        ("v0.2.0+local", "0.2.0+local", False),
        ("v0.2.0", "0.2.1", False),  # not the version being built
        ("v0.2", "0.2.0", False),
        ("v02.0", "2.0", False),
        ("0.2.0", "0.2.0", False),
        ("vnext", "0.2.0", False),
    ],
)
def test_a_tag_must_name_a_final_version_the_one_built(
    tmp_path: Path, tag: str, version: str, passes: bool
) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / f"msyncext-{version}.tar.gz").touch()
    done = subprocess.run(
        ["bash", "-e", "-c", _tag_check_script()],
        cwd=tmp_path,
        env={**os.environ, "TAG": tag},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode == 0) == passes, done.stderr
    if not passes:
        assert tag in done.stderr


# --- the wheels' platform tags ------------------------------------------------


def _expected_abis() -> set[str]:
    """What [tool.cibuildwheel] build compiles: the one cp311-abi3 wheel
    every GIL build shares, and a wheel per free-threaded build."""
    abis = set()
    for selector in _cibuildwheel()["build"]:
        found = re.fullmatch(r"cp3(\d+)(t?)-\*", selector)
        assert found, f"unexpected build selector {selector}"
        abis.add(f"cp3{found[1]}-cp3{found[1]}t" if found[2] else "cp311-abi3")
    return abis


def test_linux_wheels_are_built_in_manylinux2014_images() -> None:
    linux = _cibuildwheel()["linux"]
    for arch in linux["archs"]:
        assert linux.get(f"manylinux-{arch}-image") == "manylinux2014", arch


def _tag_step() -> dict[str, Any]:
    (step,) = (
        s for s in _jobs()["wheels"]["steps"] if "EXPECTED_ABIS" in s.get("env", {})
    )
    return step


def test_the_tag_check_expects_what_the_configuration_builds() -> None:
    step = _tag_step()
    assert set(step["env"]["EXPECTED_ABIS"].split()) == _expected_abis()
    assert step["env"]["PLATFORM"] == "${{ matrix.platform }}"
    assert step["env"]["ARCH"] == "${{ matrix.archs }}"
    steps = _jobs()["wheels"]["steps"]
    built = next(i for i, s in enumerate(steps) if "cibuildwheel==" in s.get("run", ""))
    uploaded = next(
        i for i, s in enumerate(steps) if "upload-artifact" in s.get("uses", "")
    )
    assert built < steps.index(step) < uploaded


def _wheel_names(platform: str, arch: str, floor: str = "2_17") -> list[str]:
    names = []
    for abi in sorted(_expected_abis()):
        if platform == "linux":
            names.append(
                f"msyncext-0.2.0-{abi}-manylinux_{floor}_{arch}."
                f"manylinux{'2014' if floor == '2_17' else '_' + floor}_{arch}.whl"
            )
            names.append(f"msyncext-0.2.0-{abi}-musllinux_1_2_{arch}.whl")
        else:
            names.append(f"msyncext-0.2.0-{abi}-macosx_11_0_{arch}.whl")
    return names


def _check_tags(tmp_path: Path, platform: str, arch: str, names: list[str]) -> str:
    """Run the workflow's tag check on empty files of these names; returns
    its stderr if it failed, '' if it passed."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    for name in names:
        (house / name).touch()
    # The step runs python3: this interpreter.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    step = _tag_step()
    done = subprocess.run(
        ["bash", "-e", "-c", step["run"]],
        cwd=tmp_path,
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PLATFORM": platform,
            "ARCH": arch,
            "EXPECTED_ABIS": step["env"]["EXPECTED_ABIS"],
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "" if done.returncode == 0 else done.stderr or "failed"


@pytest.mark.parametrize(
    ("platform", "arch"),
    [
        ("linux", "x86_64"),
        ("linux", "aarch64"),
        ("macos", "x86_64"),
        ("macos", "arm64"),
    ],
)
def test_the_tag_check_passes_the_wheels_promised(
    tmp_path: Path, platform: str, arch: str
) -> None:
    assert _check_tags(tmp_path, platform, arch, _wheel_names(platform, arch)) == ""


def test_the_tag_check_refuses_a_newer_glibc_floor(tmp_path: Path) -> None:
    names = _wheel_names("linux", "x86_64", floor="2_28")
    failed = _check_tags(tmp_path, "linux", "x86_64", names)
    assert "not tagged manylinux_2_17 alone" in failed


def test_the_tag_check_refuses_a_missing_or_foreign_wheel(tmp_path: Path) -> None:
    names = _wheel_names("linux", "aarch64")
    for case, changed in {
        "missing": names[1:],
        "other arch": [names[0].replace("aarch64", "x86_64"), *names[1:]],
        "extra": [*names, "msyncext-0.2.0-cp313-cp313-musllinux_1_2_aarch64.whl"],
        "old musl": [n.replace("musllinux_1_2", "musllinux_1_1") for n in names],
    }.items():
        where = tmp_path / case.replace(" ", "-")
        where.mkdir()
        assert _check_tags(where, "linux", "aarch64", changed), case


# --- test environments never compile numpy ------------------------------------


def _identifiers() -> list[str]:
    """Every build identifier [tool.cibuildwheel] selects on Linux."""
    config = _cibuildwheel()
    pythons = [s.removesuffix("-*") for s in config["build"]]
    return [
        f"{py}-{family}_{arch}"
        for py in pythons
        for family in ("manylinux", "musllinux")
        for arch in config["linux"]["archs"]
    ]


def _without_numpy_wheel(identifier: str) -> bool:
    """Whether numpy has no wheel for this build's test environment: numpy
    2.3 and later need glibc 2.28 on Linux, and 3.14 has no older numpy;
    the manylinux2014 containers have glibc 2.17. (PyPI's numpy files, seen
    for numpy 2.2.6 and 2.5.5.)"""
    python, platform = identifier.split("-")
    version = int(re.fullmatch(r"cp3(\d+)t?", python)[1])  # type: ignore[index]
    return platform.startswith("manylinux") and version >= 14


def _matches(selector: str | list[str], identifier: str) -> bool:
    patterns = selector.split() if isinstance(selector, str) else selector
    return any(fnmatch.fnmatchcase(identifier, p) for p in patterns)


def test_numpy_is_installed_from_wheels_only() -> None:
    environment = _cibuildwheel()["test-environment"]
    assert "numpy" in environment["PIP_ONLY_BINARY"].split(","), environment


def test_builds_without_a_numpy_wheel_test_without_numpy() -> None:
    config = _cibuildwheel()
    test_extra = _pyproject()["project"]["optional-dependencies"]["test"]
    assert any(req.startswith("numpy") for req in test_extra)
    without_numpy = [r for r in test_extra if not r.startswith("numpy")]
    dropping = [
        o for o in config["overrides"] if "test-requires" in o or "test-extras" in o
    ]
    for identifier in _identifiers():
        matched = [o for o in dropping if _matches(o["select"], identifier)]
        if _without_numpy_wheel(identifier):
            assert matched, f"{identifier} would install numpy, which has no wheel"
            (override,) = matched
            assert override["test-extras"] == []
            assert override["test-requires"] == without_numpy
        else:
            assert not matched, f"{identifier} has a numpy wheel: test with it"


def test_a_final_version_does_not_call_itself_unpublished() -> None:
    # The README is the package index's project page: the release that
    # publishes it must not say that nothing is published.
    init = (ROOT / "msyncext" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"$', init, re.M)
    assert version
    final = re.fullmatch(r"\d+(\.\d+)*", version[1]) is not None
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    says_unpublished = "No release is published yet" in readme
    assert not (final and says_unpublished), (
        f"version {version[1]} is a release, and README.md says none is published"
    )


def test_ci_runs_on_every_pull_request() -> None:
    # ci.yml runs the tests and checks; no paths filter may leave a change out.
    yaml = pytest.importorskip("yaml", reason="PyYAML (the checks group) reads it")
    ci = yaml.safe_load((WORKFLOW.parent / "ci.yml").read_text())
    trigger = ci[True]["pull_request"]
    assert not trigger or not {"paths", "paths-ignore"} & set(trigger), trigger
