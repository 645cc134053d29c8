#!/usr/bin/env bash
# The GPU check on the device machine (bench/README.md, "The GPU check"), in three calls of the
# device tool: DALI travels as three parts of at most 57 MiB (../shared/device/stage-dali) and one
# call carries at most 64 MiB, so the parts are copied to /tmp/stage one per call, then joined.
#
#   bench/gpu_check_device.sh stage 0        # carry .dali-stage/part00
#   bench/gpu_check_device.sh stage 1        # carry .dali-stage/part01
#   bench/gpu_check_device.sh run [ARGS]     # carry .dali-stage/part02 and .dali-stage/SHA256
#
# `run` joins and unpacks the parts (../shared/device/README.md's three steps), runs
# `python3 bench/gpu_check.py /tmp/gpu-check ARGS` and copies gpu_check.json, gpu_check.md and a
# tarball of the logs and raw JSONs into $OUT (at most 8 files come back from there).
set -uo pipefail
stage=/tmp/stage
case "${1:-}" in
  stage)
    part=$(printf 'part%02d' "${2:?give the part number: 0, 1 or 2}")
    mkdir -p "$stage" && cp ".dali-stage/$part" "$stage/" && ls -la "$stage"
    ;;
  run)
    shift
    mkdir -p "$stage"
    [ -f .dali-stage/part02 ] && cp .dali-stage/part02 "$stage/"
    if [ ! -d /tmp/dsite ]; then
      for p in part00 part01 part02; do
        [ -f "$stage/$p" ] || { echo "error: $stage/$p missing: run the stage calls first (a machine that went back loses /tmp)"; exit 2; }
      done
      if [ -f .dali-stage/SHA256 ]; then
        got=$(cat "$stage"/part0* | sha256sum | cut -c1-64)
        [ "$got" = "$(cat .dali-stage/SHA256)" ] || { echo "error: the joined parts' SHA-256 differs from .dali-stage/SHA256: stage them again"; exit 2; }
      fi
      cat "$stage"/part0* | tar -xJ -C /tmp || { echo "error: could not unpack the DALI parts"; exit 2; }
    fi
    export PYTHONPATH=/tmp/dsite:$PWD PYTHONUNBUFFERED=1
    export LD_LIBRARY_PATH=/tmp/dsite/nvidia/cu13/lib:/tmp/dsite/nvidia/nvimgcodec:/tmp/dsite/nvidia/libnvcomp/lib64:${LD_LIBRARY_PATH:-}
    out=/tmp/gpu-check
    python3 bench/gpu_check.py "$out" "$@"
    rc=$?
    if [ -n "${OUT:-}" ]; then
      cp "$out"/gpu_check.json "$out"/gpu_check.md "$OUT"/ 2>/dev/null
      tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$out" logs $(cd "$out" && ls *.json *.xml 2>/dev/null) 2>/dev/null
    fi
    exit $rc
    ;;
  *)
    echo "usage: bench/gpu_check_device.sh stage 0|1|2 | run [gpu_check.py options]" >&2
    exit 2
    ;;
esac
