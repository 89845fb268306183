#!/usr/bin/env bash
# One-command, idempotent setup of mmlinattn's environment in .venv/.
#
#   bash tools/setup.sh
#
# Creates .venv/ at the repository root and installs, pinned, the stack the
# project runs on (torch 2.14.1, torchvision 0.29.1, mmengine 0.10.7, mmcv 2.1.0
# with its compiled ops, mmdet 3.3.0, mmsegmentation 1.2.2, timm) and mmlinattn
# itself in editable mode with its dev extras, the ONNX export/runtime stack
# (onnx, onnxruntime, onnxscript: the deploy extra) and the gigapixel file stack
# (tifffile, OpenSlide: the large-images extra), plus OpenSeadragon (the deep-zoom
# viewer's script, from its npm package, into .venv/share/openseadragon). Every step first checks whether
# its result is already there, so a second run on a ready machine changes
# nothing, and a run interrupted half-way is repaired by running it again.
#
# Environment knobs:
#   PYTHON=python3.11   interpreter used to create the venv
#   MAX_JOBS=N          parallel compile jobs for mmcv (default: number of cores)
#   MMCV_WITH_CUDA=1    force building mmcv's CUDA ops (default: only if nvcc
#                       and a CUDA-enabled torch are both visible)
set -Eeuo pipefail  # -E: the ERR trap also fires inside functions

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3.11}"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMENGINE_VERSION=0.10.7
MMCV_VERSION=2.1.0
MMDET_VERSION=3.3.0
MMSEG_VERSION=1.2.2
# mmcv 2.1.0's setup.py imports pkg_resources, which setuptools >= 81 no longer
# ships; torch 2.14.1 needs setuptools >= 77.0.3. 80.9.0 satisfies both.
SETUPTOOLS_VERSION=80.9.0

STEP=""
step() { STEP="$1"; printf '\n[setup %s] %s\n' "$(date +%H:%M:%S)" "$1"; }
fail() {
  printf '\n[setup] FAILED at step: %s\n' "$STEP" >&2
  [ -n "${1:-}" ] && printf '[setup] %s\n' "$1" >&2
  exit 1
}
trap 'fail "command exited with status $? (see the output above)"' ERR

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
# True when `python -c CODE` succeeds inside the venv.
# Runs from / so that the repository's own directory does not shadow the install.
venv_check() { (cd / && "$PY" -c "$1" >/dev/null 2>&1); }
dist_version() {
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null || true
}

step "1/7 virtual environment in .venv/ ($PYTHON)"
if [ -x "$PY" ] && "$PY" -c 'import sys, pip; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "  .venv/ exists and works: kept"
else
  command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; set PYTHON=/path/to/python3.11"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  echo "  created $VENV"
fi

step "2/7 build tools and PyTorch $TORCH_VERSION / torchvision $TORCHVISION_VERSION"
if [ "$(dist_version torch)" = "$TORCH_VERSION" ] && [ "$(dist_version torchvision)" = "$TORCHVISION_VERSION" ] \
   && [ "$(dist_version setuptools)" = "$SETUPTOOLS_VERSION" ] && venv_check 'import torch, torchvision, wheel, ninja'; then
  echo "  already installed"
else
  pip_install "setuptools==$SETUPTOOLS_VERSION" wheel ninja \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

step "3/7 mmengine $MMENGINE_VERSION, timm and pure-Python dependencies"
if [ "$(dist_version mmengine)" = "$MMENGINE_VERSION" ] && venv_check 'import mmengine, timm, matplotlib, rich, pycocotools'; then
  echo "  already installed"
else
  pip_install "mmengine==$MMENGINE_VERSION" "timm>=1.0,<2" "numpy>=1.24" \
    matplotlib rich psutil pycocotools "opencv-python-headless" scipy shapely terminaltables
fi

step "4/7 mmcv $MMCV_VERSION with compiled ops"
if [ "$(dist_version mmcv)" = "$MMCV_VERSION" ] && venv_check 'import mmcv.ops; from mmcv.ops import nms, roi_align'; then
  echo "  already installed (mmcv.ops imports)"
else
  echo "  mmcv $MMCV_VERSION has no wheel for torch $TORCH_VERSION: compiling it from source."
  echo "  This takes about 12 minutes on 2 cores (seconds if pip's wheel cache already holds it)."
  # Three things break a plain `pip install mmcv==2.1.0` on this stack:
  #  1. its setup.py needs pkg_resources -> setuptools < 81 (installed in step 2);
  #  2. its setup.py imports torch -> build without isolation, so it sees the
  #     venv's torch, setuptools, wheel and ninja;
  #  3. torch 2.14's ATen headers require C++20, but mmcv 2.1.0 passes -std=c++17
  #     for every torch > 1.12. gcc honours the last -std flag, so we point CXX
  #     (which torch's extension builder uses) at a wrapper that appends
  #     -std=c++20 to each compiler call.
  CXX_WRAPPER="$VENV/bin/cxx20"
  REAL_CXX="$(command -v "${CXX:-g++}")" || fail "no C++ compiler (g++) found: install gcc/g++"
  cat >"$CXX_WRAPPER" <<WRAP
#!/bin/sh
exec "$REAL_CXX" "\$@" -std=c++20
WRAP
  chmod +x "$CXX_WRAPPER"
  if [ -z "${MMCV_WITH_CUDA:-}" ] && command -v nvcc >/dev/null \
     && "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    MMCV_WITH_CUDA=1
  fi
  if [ "${MMCV_WITH_CUDA:-0}" = 1 ]; then
    echo "  CUDA visible: building mmcv with CUDA ops (FORCE_CUDA=1)"
    export FORCE_CUDA=1
  else
    echo "  no CUDA visible: building mmcv's CPU ops"
    export FORCE_CUDA=0
  fi
  "$PY" -m pip uninstall -y -q mmcv mmcv-lite >/dev/null 2>&1 || true
  CXX="$CXX_WRAPPER" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install --disable-pip-version-check --no-build-isolation \
    "mmcv==$MMCV_VERSION"
  venv_check 'import mmcv.ops' || fail "mmcv installed but 'import mmcv.ops' fails: $("$PY" -c 'import mmcv.ops' 2>&1 | tail -1)"
fi

step "5/7 mmdet $MMDET_VERSION and mmsegmentation $MMSEG_VERSION"
if [ "$(dist_version mmdet)" = "$MMDET_VERSION" ] && [ "$(dist_version mmsegmentation)" = "$MMSEG_VERSION" ] \
   && venv_check 'import ftfy, regex'; then
  echo "  already installed"
else
  # mmseg imports ftfy and regex (text encoders) without declaring them.
  pip_install "mmdet==$MMDET_VERSION" "mmsegmentation==$MMSEG_VERSION" ftfy regex
fi

step "6/7 mmlinattn (editable) with its dev, mm, deploy and large-images extras"
if venv_check 'import mmlinattn, pytest, pytest_timeout, ruff, onnx, onnxruntime, onnxscript, tifffile, openslide, shapely, pyogrio' \
   && [ "$(cd / && "$PY" -c 'import mmlinattn, os; print(os.path.dirname(os.path.dirname(os.path.abspath(mmlinattn.__file__))))' 2>/dev/null)" = "$ROOT" ]; then
  echo "  already installed from $ROOT"
else
  # No build isolation: the venv's setuptools builds the editable install, so
  # nothing is fetched and the pins above are not re-resolved.
  pip_install --no-build-isolation -e "$ROOT[dev,mm,deploy,large-images]"
fi

OSD_VERSION=6.1.1
OSD_DIR="$VENV/share/openseadragon"
if [ -f "$OSD_DIR/openseadragon.js" ] && [ "$(cat "$OSD_DIR/VERSION" 2>/dev/null)" = "$OSD_VERSION" ]; then
  echo "  OpenSeadragon $OSD_VERSION: already in $OSD_DIR"
elif command -v npm >/dev/null; then
  # The viewer page (tools/infer_large.py --viewer) serves OpenSeadragon from its own
  # files; npm pack fetches the released package without installing anything.
  OSD_TMP="$(mktemp -d)"
  (cd "$OSD_TMP" && npm pack --silent "openseadragon@$OSD_VERSION" >/dev/null && tar xzf openseadragon-*.tgz)
  rm -rf "$OSD_DIR" && mkdir -p "$OSD_DIR"
  cp -r "$OSD_TMP/package/build/openseadragon/." "$OSD_DIR/"
  cp "$OSD_TMP/package/LICENSE.txt" "$OSD_DIR/"
  echo "$OSD_VERSION" > "$OSD_DIR/VERSION"
  rm -rf "$OSD_TMP"
  echo "  OpenSeadragon $OSD_VERSION installed in $OSD_DIR"
else
  echo "  npm not found: the --viewer page needs OpenSeadragon; install Node.js and rerun"
fi

step "7/7 verify"
"$PY" - <<'PYCHECK' || fail "the environment does not import (see the traceback above)"
import importlib
for name in ('torch', 'torchvision', 'timm', 'mmengine', 'mmcv.ops', 'mmdet.models',
             'mmseg.models', 'onnx', 'onnxruntime', 'onnxscript', 'tifffile', 'openslide',
             'mmlinattn'):
    importlib.import_module(name)
    print(f'  import {name}: ok')
import torch, mmcv, mmdet, mmseg, mmengine, mmlinattn
print(f'  torch {torch.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmlinattn {mmlinattn.__version__}')
PYCHECK
trap - ERR
printf '\n[setup] done. Run the tests with: .venv/bin/python -m pytest\n'
