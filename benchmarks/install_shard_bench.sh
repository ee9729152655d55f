#!/usr/bin/env bash
# What benchmarks/shard_speed.py needs beyond requirements.txt, from Debian (root or sudo;
# skipped when present): strace for the system-call counts, libfuse2 for mfusepy's FUSE
# mount (the simulated shared file system). mfusepy itself is pinned in requirements.txt.
set -euo pipefail
need=()
command -v strace >/dev/null || need+=(strace)
ldconfig -p | grep -q 'libfuse\.so\.2' || need+=(libfuse2)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
[ -e /dev/fuse ] || { echo "error: /dev/fuse is missing: FUSE mounts cannot work here" >&2; exit 1; }
