#!/usr/bin/env bash
# Install the benchmark's external tools with apt when they are missing:
# nginx and wrk (required: the upstream and the load generator), haproxy and
# caddy (peers; run.py skips a peer that is not installed), h2load from
# nghttp2-client (the h2 scenarios; run.py skips them without it).
# Idempotent: does nothing when all are on PATH. Installing needs root; without
# it, or when apt has no candidate for a package, it says so and carries on.
set -euo pipefail

# command=package: what must be on PATH, and the Debian package that puts it there
tools=(nginx=nginx wrk=wrk haproxy=haproxy caddy=caddy h2load=nghttp2-client)
missing=()
for tool in "${tools[@]}"; do
    command -v "${tool%%=*}" >/dev/null || missing+=("${tool#*=}")
done
((${#missing[@]} == 0)) && exit 0

if ((EUID != 0)); then
    echo "benchmarks/setup.sh: not root, not installing ${missing[*]};" \
        "as root: apt-get install ${missing[*]}" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq

# Only what apt can actually install; a package with no candidate (another
# distribution, another release) is reported, not fatal.
installable=()
for pkg in "${missing[@]}"; do
    # (grep reads all of it: with pipefail, grep -q could SIGPIPE apt-cache)
    if apt-cache policy "$pkg" 2>/dev/null | grep 'Candidate:' | grep -qv '(none)'; then
        installable+=("$pkg")
    else
        echo "benchmarks/setup.sh: apt has no package '$pkg'; install it by hand" \
            "(see benchmarks/README.md), or the benchmark skips it" >&2
    fi
done
((${#installable[@]} == 0)) && exit 0
echo "benchmarks/setup.sh: installing ${installable[*]}"

# Debian's nginx, haproxy and caddy packages start a system-wide service at
# install time (nginx on 0.0.0.0:80). The benchmark starts its own instances on
# 127.0.0.1 only, so keep the packaged services from starting (standard
# policy-rc.d mechanism), unless the machine already has a policy in place.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi

apt-get install -y -qq --no-install-recommends "${installable[@]}"
