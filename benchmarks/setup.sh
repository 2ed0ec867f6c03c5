#!/usr/bin/env bash
# Install the benchmark's external tools (nginx, wrk) when they are missing.
# Idempotent: does nothing when both are already on PATH. Needs root to install.
set -euo pipefail

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
((${#missing[@]} == 0)) && exit 0

echo "benchmarks/setup.sh: installing ${missing[*]}"

# The Debian nginx package starts a system-wide nginx on 0.0.0.0:80 at install
# time. The benchmark starts its own nginx instances on 127.0.0.1 only, so
# keep the packaged service from starting (standard policy-rc.d mechanism),
# unless the machine already has a policy in place.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq nginx wrk
