#!/usr/bin/env bash
# The repository's own checks, all offline, with the tools of pyproject.toml's
# `checks` dependency group on PATH (.ci/run and noxfile.py install them):
#   - the GitHub workflows and Dependabot config against GitHub's schemas
#     (vendored in check-jsonschema), and zizmor's security audits;
#   - pre-commit's check of .pre-commit-config.yaml;
#   - Scientific Python's repo-review (ignored checks: [tool.repo-review]);
#   - tests/test_release.py: the release workflow builds what
#     [tool.cibuildwheel] selects, read with PyYAML as well.
set -euo pipefail
cd "$(dirname "$0")/.."

check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
zizmor --offline --persona auditor .github
pre-commit validate-config .pre-commit-config.yaml
repo-review .
python -Im pytest -p no:cacheprovider -q tests/test_release.py
