#!/usr/bin/env bash
# Create the bench-only environment .venv-bench (repo root) with torch 2.13.0 (CPU),
# numpy<2, the reference libraries (pyDVL, Captum, dattri, Kronfluence, TRAK, laplace-torch)
# and, last, headwater itself in editable mode.
#
#   bash bench/setup_peers.sh          # idempotent: a no-op when the stamp is current
#   FORCE=1 bash bench/setup_peers.sh  # reinstall everything
#
# Every pip call passes -c constraints.txt so no peer can pull a (CUDA) torch.
# The stamp records a hash of this script, requirements-peers.txt and
# constraints.txt; editing any of them triggers a reinstall. If headwater is not
# installable yet (src/ still being written), the peers are still installed and
# stamped, and the editable install is retried on every later run until it works.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv-bench"
PY="$VENV/bin/python"
REQ="bench/requirements-peers.txt"
STAMP="$VENV/.bench-peers-installed"
HW_STAMP="$VENV/.bench-headwater-installed"

want="$(cat "$SELF" "$REQ" constraints.txt | sha256sum | cut -d' ' -f1)"

if [[ "${FORCE:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    peers_ok=1
else
    peers_ok=0
fi

tmpfiles=()
cleanup() { rm -f "${tmpfiles[@]}"; }
trap cleanup EXIT

pip_install() { "$PY" -m pip install --quiet -c constraints.txt "$@"; }

if [[ "$peers_ok" == "0" ]]; then
    test -x "$PY" || "$PYTHON" -m venv "$VENV"
    echo "[setup_peers] torch (CPU) ..."
    pip_install torch==2.13.0
    echo "[setup_peers] numpy<2 and the peers ..."
    tmp="$(mktemp)"; tmpfiles+=("$tmp")
    grep -v 'no-deps' "$REQ" > "$tmp"
    pip_install "numpy<2" -r "$tmp"
    # Packages tagged "no-deps" (kronfluence): strip comments, install without deps.
    nodeps="$(grep 'no-deps' "$REQ" | grep -v '^[[:space:]]*#' | sed 's/#.*//' | xargs || true)"
    if [[ -n "$nodeps" ]]; then
        # shellcheck disable=SC2086
        pip_install --no-deps $nodeps
    fi
    "$PY" - <<'PY'
import importlib, numpy, torch
assert numpy.__version__.startswith("1."), numpy.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
for m in ("pydvl.influence", "captum.influence", "dattri", "kronfluence", "trak", "sklearn",
          "laplace", "curvlinops", "backpack", "asdl"):
    importlib.import_module(m)
print("[setup_peers] imports ok: torch", torch.__version__, "numpy", numpy.__version__)
PY
    echo "$want" > "$STAMP"
    rm -f "$HW_STAMP"
fi

# headwater itself, editable, last (it may not be installable yet); reinstalled when
# pyproject.toml changes (new dependencies). With its dependencies, but constrained to
# torch==2.13.0 and numpy<2 (pyDVL).
hw_want="$(cat pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [[ -f "$HW_STAMP" && "$(cat "$HW_STAMP")" == "$hw_want" ]] \
        && "$PY" -c "import headwater" 2>/dev/null; then
    :
elif [[ -f pyproject.toml ]]; then
    echo "[setup_peers] headwater (editable) ..."
    hwc="$(mktemp)"; tmpfiles+=("$hwc"); echo 'numpy<2' > "$hwc"
    if pip_install -c "$hwc" -e . ; then
        if "$PY" -c "import headwater" 2>/dev/null; then
            echo "$hw_want" > "$HW_STAMP"
        else
            echo "[setup_peers] WARNING: headwater installed but not importable yet; will retry next run" >&2
        fi
    else
        echo "[setup_peers] WARNING: 'pip install -e .' failed (package not ready?); peers are installed; will retry next run" >&2
    fi
fi
echo "[setup_peers] ready: $VENV"
