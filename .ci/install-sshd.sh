#!/bin/sh
# Install what tests/orchestrator/test_cluster.py needs on a fresh Debian CI machine: the OpenSSH
# server binary (the test starts its own sshd on 127.0.0.1 with its own config; nothing is enabled
# or started here) and rsync (`ray up`/`ray rsync` copy files with it when present).
# Idempotent and quiet; returns at once when everything is already installed. Run as root.
set -eu
need=""
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
command -v ssh >/dev/null 2>&1 || need="$need openssh-client"
command -v rsync >/dev/null 2>&1 || need="$need rsync"
[ -z "$need" ] && exit 0
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Quiet on success; the whole apt log on failure.
apt-get update -qq >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
# policy-rc.d 101: keep the package's post-install from starting a system sshd on 0.0.0.0:22.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
rc=0
apt-get install -y -qq --no-install-recommends $need >"$log" 2>&1 || rc=$?
if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
if [ "$rc" != 0 ]; then cat "$log" >&2; exit "$rc"; fi
exit 0
