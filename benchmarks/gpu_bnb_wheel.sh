#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) for benchmarks/gpu_check.py on the lent GPU machine, which has torch (CUDA 13.0),
# transformers and peft but no bitsandbytes and no internet. The run tool carries at most 64 MiB with the tree;
# the bitsandbytes wheel is 43 MB with libraries for every CUDA/ROCm/XPU release, so a trimmed copy keeps only
# the CPU library and the CUDA 13.x ones (cuda130, cuda132: 3.5 MB each compressed); its RECORD is rewritten.
#
#   .whl/*.whl           installed unconditionally: bitsandbytes (trimmed), aenum (a pica dependency)
#   .whl/fallback/NAME/  installed on the device only where NAME is missing (peft also where it is not 0.21.x):
#                        peft, accelerate (pica's dependencies), pytest (tests/conftest.py, used by the script)
#
# Usage: bash benchmarks/gpu_bnb_wheel.sh   (needs PyPI or the local index; versions from scripts/constraints.txt)
# Then see benchmarks/README.md, "GPU check", for the device command.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
KEEP=${BNB_KEEP:-"cpu cuda130 cuda132"}  # libbitsandbytes_<name>.so kept in the trimmed wheel
DEST=.whl
LIMIT_BYTES=$((24 * 1024 * 1024))  # well under the 64 MiB carry limit: pica's own tree travels too

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

pin() {  # NAME==VERSION as scripts/constraints.txt pins it
  local line
  line=$(grep -i "^$1==" scripts/constraints.txt) || { echo "no pin for $1 in scripts/constraints.txt" >&2; exit 1; }
  echo "$line"
}
download() {  # download DIR REQUIREMENT...: the wheels themselves, no dependencies (each is listed)
  local dir=$1
  shift
  mkdir -p "$dir"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$dir" "$@" 2>"$scratch/pip.err" \
    || { grep -v "is ignored" "$scratch/pip.err" >&2; echo "pip download $* failed" >&2; exit 1; }
}

rm -rf "$DEST"
mkdir -p "$DEST"

download "$scratch/original" "$(pin bitsandbytes)"
original=$(ls "$scratch"/original/bitsandbytes-*.whl)
"$PYTHON" - "$original" "$DEST" $KEEP <<'EOF'
"""Copy a bitsandbytes wheel without the native libraries not kept; rewrite RECORD to list what remains."""
import re
import sys
import zipfile
from pathlib import Path

source, dest, keep = Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3:])
library = re.compile(r"^bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")
target = dest / source.name
kept_libraries, dropped = [], []
with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
    names = wheel.namelist()
    record = next(name for name in names if name.endswith(".dist-info/RECORD"))
    for info in wheel.infolist():
        match = library.match(info.filename)
        if match and match.group(1) not in keep:
            dropped.append(info.filename)
            continue
        if match:
            kept_libraries.append(match.group(1))
        if info.filename != record:
            out.writestr(info, wheel.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    lines = [line for line in wheel.read(record).decode().splitlines() if line.split(",", 1)[0] not in dropped]
    out.writestr(wheel.getinfo(record), "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
missing = keep - set(kept_libraries)
if missing:
    sys.exit(f"the wheel has no libbitsandbytes_{sorted(missing)}: kept {sorted(kept_libraries)}")
print(f"{target}: kept {sorted(kept_libraries)}, dropped {len(dropped)} libraries, "
      f"{source.stat().st_size / 2**20:.1f} MiB -> {target.stat().st_size / 2**20:.1f} MiB")
EOF

download "$DEST" "$(pin aenum)"
download "$DEST/fallback/peft" "$(pin peft)"
download "$DEST/fallback/accelerate" "$(pin accelerate)"
download "$DEST/fallback/pytest" "$(pin pytest)" pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0

# The trimmed wheel must install as the device command installs it, and RECORD must list every file.
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$scratch/site" \
  "$DEST"/*.whl
"$PYTHON" - "$scratch/site" <<'EOF'
import csv
import sys
from pathlib import Path

site = Path(sys.argv[1])
info = next(site.glob("bitsandbytes-*.dist-info"))
listed = {row[0] for row in csv.reader((info / "RECORD").read_text().splitlines()) if row}
on_disk = {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()
           if p.parts[len(site.parts)] in ("bitsandbytes", info.name) and "__pycache__" not in p.parts}
unlisted, absent = on_disk - listed, {p for p in listed - on_disk if not p.endswith(".pyc")}
if unlisted or absent:
    sys.exit(f"RECORD mismatch: not listed {sorted(unlisted)[:5]}, listed but absent {sorted(absent)[:5]}")
print("installed:", sorted(p.name for p in (site / "bitsandbytes").glob("libbitsandbytes_*")))
EOF
# Import it from the target alone (this host has no GPU: the CPU library loads).
PYTHONPATH="$scratch/site" "$PYTHON" -c "import bitsandbytes as b; print('imported', b.__version__, b.__file__)"

size=$(du -sb "$DEST" | cut -f1)
find "$DEST" -type f -name "*.whl" -printf "%10s  %p\n" | sort -k2
echo "$DEST: $size bytes ($((size / 1024 / 1024)) MiB)"
if [ "$size" -gt "$LIMIT_BYTES" ]; then
  echo "$DEST is larger than $LIMIT_BYTES bytes" >&2
  exit 1
fi
