#!/usr/bin/env bash
# A local Python base image for the Dockerfiles' BASE_IMAGE, made where no image registry
# can be reached (issue 18): Debian bookworm by debootstrap from the host's own apt
# mirror, with python3, pip and venv, and the host's extra CA certificates (where TLS to
# the package index is intercepted, pip inside needs them).
#
#   deploy/base_image.sh [TAG]      # default local/python:3.11-bookworm; as root
#
# Does nothing when TAG exists. Prints TAG. Needs debootstrap and a running Docker engine.
set -euo pipefail
tag=${1:-local/python:3.11-bookworm}
docker=${DOCKER:-/usr/bin/docker}

if "$docker" image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    exit 0
fi
# The host's first Debian mirror, read from its apt sources (deb822 or one-line form).
mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
    | grep -v security | head -n1 || true)
if [[ -z $mirror ]]; then
    mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' \
        | grep -v security | head -n1 || true)
fi
[[ -n $mirror ]] || { echo "base_image.sh: no Debian mirror in the host's apt sources" >&2; exit 1; }

root=$(mktemp -d /tmp/stepwise-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$mirror" >/dev/null
# The host's locally added CA certificates, trusted inside too.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi
# pip may install into the image's Python (it is the image's only job).
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$docker" import - "$tag" >/dev/null
echo "$tag"
