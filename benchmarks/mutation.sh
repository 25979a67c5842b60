#!/bin/sh
# Mutation testing of one module against only the test files that cover it, with mutmut.
#   benchmarks/mutation.sh starflow_mlx/convert/torch_pickle.py tests/test_pinned_rules.py tests/test_torch_pickle.py
# The module is named by its package path (convert/ is installed as starflow_mlx/convert/). mutmut names a
# mutant by its file's path, so it runs on a copy of the sources laid out as installed, in $MUTATION_DIR
# (default /tmp/starflow-mutation/<module>): the checkout is never touched. One child at a time, niced.
# MUTANTS restricts a large module to the functions that matter, as mutmut's space-separated name globs:
#   MUTANTS='starflow_mlx.sampling.jacobi.x_invert_jacobi__mutmut_* starflow_mlx.sampling.jacobi.x_converged__mutmut_*'
set -eu
module=$1; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=${MUTATION_DIR:-/tmp/starflow-mutation/$(basename "$module" .py)}
rm -rf "$work" && mkdir -p "$work"
cp -r "$repo/starflow_mlx" "$work/starflow_mlx"
for sub in convert quantize apps benchmarks; do cp -r "$repo/$sub" "$work/starflow_mlx/$sub"; done
cp -r "$repo/tests" "$work/tests"
find "$work" -name __pycache__ -prune -exec rm -rf {} +
# The installed starflow_mlx_blas.pth imports starflow_mlx at start-up, from the checkout: drop it, so the
# tests import the mutated copy mutmut puts first on sys.path.
cat > "$work/tests/conftest.py" <<'PY'
import sys

for name, module in list(sys.modules.items()):
    if name.split(".")[0] == "starflow_mlx" and "/mutants/" not in (getattr(module, "__file__", None) or ""):
        del sys.modules[name]
PY
tests=$(printf '"%s", ' "$@")
cat > "$work/pyproject.toml" <<TOML
[tool.pytest.ini_options]
addopts = "-m 'not slow' -p no:cacheprovider"
markers = ["slow: slow", "macos: macOS"]

[tool.mutmut]
source_paths = ["starflow_mlx"]
only_mutate = ["$module"]
pytest_add_cli_args_test_selection = [${tests%, }]
use_git_change_detection = false
# A process that has evaluated MLX arrays cannot evaluate any in a fork (the child hangs): plain fork isolation
# turned every mutant a test computed into a timeout, counted as caught. The fork server forks before any runs.
process_isolation = "forkserver"
timeout_multiplier = 3.0  # a mutant that loops (a sampler that never converges) is cut off early: it counts as caught
timeout_constant = 5.0
TOML
cd "$work"
# shellcheck disable=SC2086 # the globs are split into mutmut arguments, unexpanded by the shell (set -f)
set -f
nice -n 10 "$python" -m mutmut run --max-children 1 ${MUTANTS:-} >mutmut.log 2>&1 || true
"$python" -m mutmut results --all true > results.txt 2>&1 || "$python" -m mutmut results > results.txt 2>&1
tail -3 mutmut.log
grep -c ': killed' results.txt | sed 's/^/killed: /' || true
grep -v ': killed' results.txt
