#!/usr/bin/env bash
# Installs what the cluster tests (tests/cluster/) need from Debian: a real SLURM
# (slurmctld, slurmd and the client commands, package slurm-wlm) and munge, its
# authentication. Idempotent: does nothing when the binaries are already there.
# Needs root (or sudo). It starts nothing: each test session starts its own
# munged, slurmctld and slurmd on 127.0.0.1 (tests/cluster/slurm_cluster.py).
set -euo pipefail

need=(munged slurmctld slurmd sbatch srun scontrol sinfo squeue scancel)
missing() {
  local b out=()
  for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || out+=("$b")
  done
  echo "${out[*]}"
}

if [ -z "$(missing)" ]; then
  echo "cluster tests: slurm-wlm and munge already installed"
  exit 0
fi
echo "cluster tests: installing slurm-wlm and munge (missing: $(missing))"

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
# The packages' post-install scripts would start system-wide daemons with
# /etc/slurm's config; policy-rc.d exit 101 tells invoke-rc.d not to.
added_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
  added_policy=1
fi
remove_policy() {
  if [ "$added_policy" -eq 1 ]; then "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d; fi
}
trap remove_policy EXIT
"${SUDO[@]}" apt-get install -y -q --no-install-recommends slurm-wlm munge

if [ -n "$(missing)" ]; then
  echo "error: still missing after apt-get install: $(missing)" >&2
  exit 1
fi
echo "cluster tests: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm)," \
     "munge $(dpkg-query -W -f='${Version}' munge)"
