#!/usr/bin/env python3
# /// script
# dependencies = ["nox>=2025.2.9"]
# ///
"""Tasks for contributors: `nox` (tests and lint), `nox -s checks`.

The same commands .ci/run runs, each in a fresh virtual environment; .ci/run
stays what CI runs (it also builds the wheels and the Python matrix).
"""

from __future__ import annotations

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
nox.options.default_venv_backend = "venv"

PYPROJECT = nox.project.load_toml("pyproject.toml")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against the installed package (pytest arguments pass on).

    Set MSYNCEXT_TEST_MOUNTS=1 (as root) for the tests that mount file systems.
    """
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "test"))
    # -I: the source folder, which has no compiled module, must not shadow
    # the installation.
    session.run("python", "-Im", "pytest", "tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff, mypy and stubtest, as .ci/run runs them."""
    # The package too: stubtest compares the stubs with the built module.
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "dev"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "msyncext", "tests/typing")
    session.run(
        "mypy", "--strict", "--python-version", "3.12", "msyncext", "tests/typing"
    )
    # -I: the installed module, not the source folder (no compiled module).
    session.run("python", "-I", "-m", "mypy.stubtest", "msyncext")


@nox.session(default=False)
def checks(session: nox.Session) -> None:
    """The workflows, repo-review and pre-commit's config (.ci/conventions.sh)."""
    # tests/test_release.py runs under the suite's conftest, which imports
    # the package and its test dependencies.
    groups = nox.project.dependency_groups(PYPROJECT, "test", "checks")
    session.install(".", *groups)
    session.run("bash", ".ci/conventions.sh", external=True)


if __name__ == "__main__":
    nox.main()
