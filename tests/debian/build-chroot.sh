#!/bin/sh
# Builds the Debian 12 chroot the real-host tests run against (tests/debian/conftest.py),
# following tests/fixtures/hygiene/README.md: debootstrap minbase from the main suite,
# then bookworm-security added so that real security upgrades (a kernel among them) are
# pending. The fixture caches the result by this file's hash: edit it and it rebuilds.
#
#   usage: build-chroot.sh DIR [MIRROR]        (as root; DIR must not exist yet)
set -eu
C=$1
MIRROR=${2:-http://deb.debian.org/debian}
SECURITY_MIRROR=${MIRROR%/debian}/debian-security

cleanup() { umount "$C/proc" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

debootstrap --variant=minbase bookworm "$C" "$MIRROR"
# Package scripts must not start daemons: the tests start the chroot's sshd themselves.
printf '#!/bin/sh\nexit 101\n' > "$C/usr/sbin/policy-rc.d"
chmod +x "$C/usr/sbin/policy-rc.d"
# The chroot never boots, so no initramfs is built for its kernels (it would take
# minutes each time); the kernel packages and their hooks run as on a host otherwise.
chroot "$C" dpkg-divert --local --rename --add /usr/sbin/update-initramfs
ln -s /bin/true "$C/usr/sbin/update-initramfs"
# Nor are its kernels' modules unpacked (400 MB a kernel), nor docs: each test unpacks
# two copies of this chroot, and the security upgrade unpacks a new kernel in each.
printf '%s\n' 'path-exclude=/lib/modules/*/kernel/*' \
    'path-exclude=/usr/lib/modules/*/kernel/*' 'path-exclude=/usr/share/doc/*' \
    'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/locale/*' \
    > "$C/etc/dpkg/dpkg.cfg.d/changeover-test-chroot"
cp /etc/resolv.conf "$C/etc/resolv.conf"
mount -t proc proc "$C/proc"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
# Main suite only: everything below is older than bookworm-security's versions.
chroot "$C" apt-get install -y -q --no-install-recommends \
    openssh-server unattended-upgrades linux-image-amd64 python3 ca-certificates
chroot "$C" apt-get clean
echo "deb $SECURITY_MIRROR bookworm-security main" >> "$C/etc/apt/sources.list"
chroot "$C" apt-get update -q
# Download (not install) what is pending, so each test run's upgrade does not fetch it.
chroot "$C" apt-get -y -q -d --with-new-pkgs upgrade
chroot "$C" apt-get -q -s --with-new-pkgs upgrade | grep -c '^Inst' | sed 's/^/pending upgrades: /'
