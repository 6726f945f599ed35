#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3: every mutant (a one-line change of the code)
# must make the fast unit tests fail. Prints killed / total per module, equivalent mutants excluded.
#
#   bench/mutation.sh                       every module of [tool.mutmut] only_mutate (pyproject.toml)
#   bench/mutation.sh posttrain/results.py  just these modules
#
# The module list and the test selection live in pyproject.toml ([tool.mutmut]); the equivalent
# mutants the score leaves out are listed, with reasons, in bench/mutation_equivalent.txt. mutmut
# works in mutants/ (git-ignored) and reuses its per-test coverage there between runs; delete
# mutants/ after changing tests or code to start clean. Not part of `make test`: hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
PY=.venv/bin/python
MUTMUT_VERSION=3.8.1
if ! .venv/bin/mutmut --version 2>/dev/null | grep -q "$MUTMUT_VERSION"; then
  $PY -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
if [ $# -gt 0 ]; then
  modules=("$@")
else
  mapfile -t modules < <($PY -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["only_mutate"]))')
fi
export POSTTRAIN_NO_PROGRESS=1
# one torch thread per mutant worker: the workers already use the cores
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p mutants
start=$(date +%s)
for path in "${modules[@]}"; do
  mod=${path%.py}
  mod=${mod//\//.}
  echo "== $path"
  # one module at a time: only its mutants, each against the selected tests that call the mutated function
  .venv/bin/mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${mod}.*" > "mutants/run-${mod}.log" 2>&1 \
    || { echo "mutmut failed on $path (log: mutants/run-${mod}.log)"; tail -20 "mutants/run-${mod}.log"; exit 1; }
done
echo "wall time: $(( $(date +%s) - start )) s"
$PY bench/mutation_score.py "${modules[@]}"
