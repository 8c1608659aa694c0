# Sourced by bench/run.sh and bench/suite.sh (with $PY and $here set): on PyPy every Python row,
# the baselines too, runs with the nursery size the a3s-gateway command gives itself
# (a3s_gateway.tap.gc_nursery), so that a ratio compares code, not GC settings. An operator's
# PYPY_GC_NURSERY is kept; CPython ignores the variable.
if [ -z "${PYPY_GC_NURSERY:-}" ]; then
  PYPY_GC_NURSERY=$(cd "$(dirname "$here")" && "$PY" -c \
    'from a3s_gateway.tap import gc_nursery; print(gc_nursery({}, pypy=True) or "")' 2>/dev/null)
  if [ -n "$PYPY_GC_NURSERY" ]; then export PYPY_GC_NURSERY; else unset PYPY_GC_NURSERY; fi
fi
