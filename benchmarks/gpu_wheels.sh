#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels benchmarks/gpu_check.sh installs
# on a GPU machine that has PyTorch, Triton, transformers, pyarrow and pandas but
# no network: Ray (and what Ray imports that such an image lacks) and Liger Kernel.
# They land in .whl/ (git-ignored) for Python 3.12 on x86-64 Linux.
#
#   bash benchmarks/gpu_wheels.sh            # then carry .whl/ to the GPU machine
#
# Ray's wheel (79 MB) is slimmed: its Java jar and the dashboard's source maps are
# not needed to run Train/Data/Tune from Python; the rest is repacked as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=.whl
mkdir -p "$DEST"
get() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DEST" "$@"
}
# Versions as pinned in pyproject.toml (ray, liger extra) or as in the dev venv.
get ray==2.60.0 liger-kernel==0.8.5 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    tensorboardX==2.6.5

ray_whl=$(ls "$DEST"/ray-2.60.0-*.whl)
"$PY" - "$ray_whl" <<'PYEOF'
import os, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as z:
    names = z.namelist()
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    keep = [n for n in names if not (n.startswith("ray/jars/")
                                     or (n.startswith("ray/dashboard/client/") and n.endswith(".map")))]
    listed = [line for line in z.read(record).splitlines(True) if line.strip()]
    held = set(keep)
    # RECORD must list only what the wheel holds.
    lines = [line for line in listed if line.split(b",")[0].decode() in held]
    if len(keep) < len(names) or len(lines) < len(listed):
        with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for n in keep:
                data = b"".join(lines) if n == record else z.read(n)
                out.writestr(z.getinfo(n), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        print(f"ray wheel slimmed: {len(names) - len(keep)} files and {len(listed) - len(lines)} RECORD lines dropped")
if os.path.exists(path + ".tmp"):
    os.replace(path + ".tmp", path)
PYEOF
du -ch "$DEST"/*.whl | tail -1
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
    echo "warning: .whl/ holds $((total / 1024 / 1024)) MiB; the device tool carries at most 64 MiB with the tree" >&2
fi
