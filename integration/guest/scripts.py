"""Shell scripts baked into the guest initramfs: /init and the udhcpc default script.

/init (PID 1) mounts proc, sysfs and devtmpfs, installs the busybox applets, loads the
modules listed in /etc/guest-modules (already in dependency order), brings up lo, runs
/test.sh (supplied per run, in a second cpio archive) and prints GUEST-EXIT=<status>
on the console before powering off. Everything here is part of the build cache key.
"""

from __future__ import annotations

EXIT_MARKER = "GUEST-EXIT="
START_MARKER = "GUEST-START"
MODULE_LIST = "etc/guest-modules"

INIT = f"""#!/bin/busybox sh
# PID 1 of the passt test guest.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /etc /root /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mkdir -p /dev/pts /var && ln -s /run /var/run
mount -t devpts devpts /dev/pts
hostname guest
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "GUEST-INSMOD-FAILED=$m"
done < /{MODULE_LIST}
ip link set lo up
# virtio_net probes synchronously on insmod, but give udev-less naming a moment.
if grep -qx 0x0001 /sys/bus/virtio/devices/*/device 2>/dev/null; then
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do usleep 100000; n=$((n+1)); done
fi
echo {START_MARKER}
if [ -f /test.sh ]; then
    sh /test.sh
    rc=$?
else
    echo "no /test.sh in the initramfs"
    rc=127
fi
echo "{EXIT_MARKER}$rc"
sync
poweroff -f
echo o > /proc/sysrq-trigger
"""

# busybox udhcpc runs this with $1 = deconfig|bound|renew|leasefail|nak and the lease
# in the environment: interface ip subnet mask broadcast router dns domain mtu.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-$subnet}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    if [ -n "$router" ]; then
        while ip -4 route del default dev "$interface" 2>/dev/null; do :; done
        for r in $router; do
            ip route add default via "$r" dev "$interface" && break
        done
    fi
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
leasefail|nak)
    echo "udhcpc: $1 on $interface" >&2
    ;;
esac
exit 0
"""
