#!/bin/busybox sh
# /init of the devdax-lab guest (busybox initramfs, runs as PID 1).
#
# Loads the device-dax modules in the order the image builder computed, then
# either prepares NVDIMM labels (devdax_lab.prepare=..., once per device
# layout; the host caches the result) or starts the guest agent on its
# virtio-serial port. Lines starting "devdax-lab:" are read by the host; the
# console is otherwise for humans.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp

say() {  # a line for the host, stamped with the guest's uptime
    echo "devdax-lab: $* (uptime $(cut -d' ' -f1 /proc/uptime))"
}

arg() {  # value of devdax_lab.$1= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in devdax_lab.$1=*) echo "${word#*=}"; return;; esac
    done
}

say "init started"
for mod in $(cat /etc/devdax-lab/modules.order); do
    insmod "/lib/modules/$mod.ko" || say "insmod $mod failed"
    [ "$(arg timing)" = "1" ] && say "loaded $mod"
done
say "modules loaded"

# devdax_lab.crash=1 crashes the kernel on purpose (sysrq c: a NULL
# dereference, Oops, panic) so the host's crash detection can be tested live.
if [ "$(arg crash)" = "1" ]; then
    echo 1 > /proc/sys/kernel/sysrq
    echo c > /proc/sysrq-trigger
fi

prepare="$(arg prepare)"
if [ -n "$prepare" ]; then
    # prepare=ALIGN[:SIZE],ALIGN[:SIZE],... one entry per NVDIMM region, in order.
    ndctl disable-region all >/dev/null
    ndctl init-labels -f all >/dev/null
    ndctl enable-region all >/dev/null
    i=0
    status=ok
    for entry in $(echo "$prepare" | tr ',' ' '); do
        align="${entry%%:*}"
        size=""
        case "$entry" in *:*) size="-s ${entry#*:}";; esac
        if ! ndctl create-namespace -r "region$i" -m devdax -a "$align" $size >/tmp/ns.json 2>&1; then
            echo "devdax-lab: create-namespace region$i align $align failed:"
            cat /tmp/ns.json
            status=failed
        fi
        i=$((i + 1))
    done
    sync
    echo "devdax-lab: prepare $status"
    poweroff -f
fi

port=""
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "org.devdax-lab.agent" ] && port="/dev/${p##*/}"
done
if [ -z "$port" ]; then
    echo "devdax-lab: no agent port (virtio-serial org.devdax-lab.agent) found"
    poweroff -f
fi
say "agent on $port"
# Respawn the agent if it ever dies, so one bad moment does not end the guest.
( while true; do /bin/agent "$port" --allow-poweroff; echo "devdax-lab: agent exited $?"; sleep 1; done ) &

if [ "$(arg shell)" = "1" ]; then
    # The shell's end (exit, Ctrl-D, the end of input piped to
    # `devdax-lab boot --shell`) ends the guest.
    setsid cttyhack sh -l
    poweroff -f
fi
while true; do sleep 3600; done
