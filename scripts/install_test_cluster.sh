#!/usr/bin/env bash
# Install what the SLURM tests need (tests/slurm_cluster.py builds a real SLURM cluster on this machine;
# tests/test_slurm.py runs the sbatch scripts on it and shellchecks them): slurm-wlm, munge, iproute2 and
# util-linux (network namespaces for the nodes: ip, unshare, nsenter) and shellcheck. The tests never install
# anything: run this once before them (CI runs it before pytest). Without root or apt-get it says why and
# installs nothing (exit 0; also when apt-get fails): the tests that need the cluster then skip, naming this script.
#
#   scripts/install_test_cluster.sh          (as root, on a Debian-family machine)
set -euo pipefail

packages=(slurm-wlm munge iproute2 util-linux shellcheck)
needed=()
for pair in sbatch:slurm-wlm slurmctld:slurm-wlm slurmd:slurm-wlm munged:munge ip:iproute2 unshare:util-linux \
            nsenter:util-linux shellcheck:shellcheck; do
    command -v "${pair%%:*}" > /dev/null 2>&1 || needed+=("${pair#*:}")
done
if [[ ${#needed[@]} -eq 0 ]]; then
    echo "install_test_cluster: ${packages[*]}: already installed"
    exit 0
fi
mapfile -t needed < <(printf '%s\n' "${needed[@]}" | sort -u)
if [[ "$(id -u)" -ne 0 ]]; then
    echo "install_test_cluster: not root, nothing installed (missing: ${needed[*]}); the SLURM tests will skip"
    exit 0
fi
if ! command -v apt-get > /dev/null 2>&1; then
    echo "install_test_cluster: no apt-get (not a Debian-family machine), nothing installed (missing: ${needed[*]});" \
         "the SLURM tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_test_cluster: installing ${needed[*]}"
if apt-get install -y -q --no-install-recommends "${needed[@]}" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "${needed[@]}"; }; then
    exit 0
fi
# (no network, a broken mirror): the tests still run, and those that need the cluster skip naming this script
echo "install_test_cluster: apt-get install ${needed[*]} failed (see above); the SLURM tests will skip" >&2
exit 0
