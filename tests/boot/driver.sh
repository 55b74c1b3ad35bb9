#!/bin/bash
# The boot test's driver, inside the VM (installed as /usr/local/sbin/kvmufw-boot-driver).
#   kvmufw-boot-driver net   early at every boot (before libvirt): the "internet" namespace,
#                            reached through eth0, the uplink of the NAT network
#   kvmufw-boot-driver run   the phase of this boot: 1 installs the Debian package and sets
#                            up, then reboots; 2 checks with packets after the reboot,
#                            reloads and restarts, then selects the nftables backend (the
#                            next hook, replay, reload, restart) and reboots; 3 checks that
#                            the nftables backend comes back at boot, removes and purges,
#                            then powers off
# Results: $STATE/results, one line per check: PHASE<TAB>CHECK<TAB>OK|FAIL|INFO<TAB>DETAIL.
# The full output of every command goes to $STATE/log; short progress lines to the console.
# All traffic stays inside this VM: the guest and the "internet" are network namespaces.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8
STATE=/var/lib/kvmufw-boot
SRC=/root/kvmufw
PEER="python3 $SRC/peer.py"
NET=lab
DOM=web1
BRIDGE=virbr1
HOST_WAN=203.0.113.1     # eth0, this host's side of the uplink
INET_IP=203.0.113.2      # the "internet" namespace
GUEST_IP=10.0.0.5
GUEST_MAC=52:54:00:00:00:05
BOOT_WAIT=${KVMUFW_BOOT_WAIT:-120}   # seconds a boot may take before we call it hung
mkdir -p "$STATE"
PHASE=$(cat "$STATE/phase" 2>/dev/null || echo 1)

say() { echo "KVMUFW-BOOT phase $PHASE: $*"; echo "=== $(date +%T) $*" >> "$STATE/log"; }
oneline() { tr '\n\t' '  ' | sed 's/  */ /g' | cut -c1-1500; }
# record CHECK OK|FAIL DETAIL
record() {
    printf '%s\t%s\t%s\t%s\n' "$PHASE" "$1" "$2" "$(printf '%s' "$3" | oneline)" >> "$STATE/results"
    say "$1: $2 $(printf '%s' "$3" | oneline | cut -c1-200)"
    sync
}
# logged CMD...: run with a bound, output to the log; returns its status
logged() {
    echo "+ $*" >> "$STATE/log"
    timeout 120 "$@" >> "$STATE/log" 2>&1
}
# check CHECK CMD...: record OK if the command succeeds, else FAIL with its last output
check() {
    local name=$1 out rc
    shift
    echo "+ $*" >> "$STATE/log"
    if declare -F "$1" >/dev/null; then out=$("$@" 2>&1); rc=$?   # our functions are bounded
    else out=$(timeout 120 "$@" 2>&1); rc=$?; fi
    printf '%s\n' "$out" >> "$STATE/log"
    if [ $rc = 0 ]; then record "$name" OK "$(printf '%s' "$out" | tail -n 3)"
    else record "$name" FAIL "exit $rc: $(printf '%s' "$out" | tail -n 8)"; fi
    return $rc
}
us_now() { awk '{printf "%d", $1 * 1000000}' /proc/uptime; }

# --------------------------------------------------------------------------- namespaces

setup_internet() {
    ip netns add inet
    ip link add eth0 type veth peer name wan
    ip link set wan netns inet
    ip addr add "$HOST_WAN/24" dev eth0
    ip link set eth0 up
    ip -n inet link set lo up
    ip -n inet addr add "$INET_IP/24" dev wan
    ip -n inet link set wan up
}

# The namespace that plays the guest's services, on the network's bridge.
setup_guest_ns() {
    ip netns del guest 2>/dev/null
    ip link del gport 2>/dev/null
    ip netns add guest
    ip link add gport type veth peer name geth
    ip link set geth netns guest
    ip -n guest link set lo up
    ip -n guest link set geth name eth0
    ip -n guest addr add "$GUEST_IP/24" dev eth0
    ip -n guest link set eth0 up
    ip -n guest route add default via 10.0.0.1
    ip link set gport master "$BRIDGE"
    ip link set gport up
}

start_peers() {
    KVMUFW_PEER_LIFETIME=1800 ip netns exec guest $PEER serve tcp 22 80 >/dev/null 2>&1 &
    KVMUFW_PEER_LIFETIME=1800 ip netns exec inet $PEER serve tcp 7000 >/dev/null 2>&1 &
    sleep 1
}

# --------------------------------------------------------------------------- checks

# ask NS HOST PORT EXPECTED: a TCP connection from namespace NS; the peer answers with the
# source address it saw, which must be EXPECTED.
ask() {
    local ns=$1 host=$2 port=$3 want=$4 got
    got=$(ip netns exec "$ns" $PEER ask tcp "$host" "$port" 3)
    if [ "$got" = "$want" ]; then echo "$ns -> $host:$port answered, source seen $got"; return 0; fi
    echo "$ns -> $host:$port: ${got:-no answer} (want the peer to see $want)"
    return 1
}

# jumps_first: our jump is the first rule of each built-in chain we use.
jumps_first() {
    local table chain first bad=""
    for tc in filter/INPUT filter/FORWARD nat/PREROUTING nat/OUTPUT nat/POSTROUTING; do
        table=${tc%/*}; chain=${tc#*/}
        first=$(iptables -w -t "$table" -S "$chain" | sed -n 2p)
        [ "$first" = "-A $chain -j KVMUFW-$chain" ] || bad="$bad $table/$chain first is '${first:-none}';"
    done
    [ -z "$bad" ] && { echo "KVMUFW jumps first in INPUT FORWARD PREROUTING OUTPUT POSTROUTING"; return 0; }
    echo "$bad"
    return 1
}

# jumps_first_within WHEN SECONDS: libvirt re-adds its own jumps (at position 1) a moment
# after its start, when it reloads its networks' rules: first wait until the daemon answers
# and its jumps are there, then ours must be first, and still first a few seconds later.
jumps_first_within() {
    local i out=""
    timeout 60 virsh net-info "$NET" >/dev/null 2>&1
    for i in $(seq "$2"); do
        if iptables -w -S FORWARD | grep -q -- '-j LIBVIRT_'; then
            out=$(jumps_first) && sleep 3 && out=$(jumps_first) && {
                record "jumps-first-$1" OK "$out (after ${i}s, and 3 s later; libvirt's jumps are in)"
                return 0; }
        else
            out="libvirt's jumps are not in FORWARD"
        fi
        sleep 1
    done
    record "jumps-first-$1" FAIL "after $2 s: $out"
    logged iptables-save
    logged journalctl -b --no-pager --since=-2min
}

# packets WHEN [network]: the guest forward, egress, and (with "network") the network forward
packets() {
    check "dnat-2222-$1" ask inet "$HOST_WAN" 2222 "$INET_IP"
    check "egress-masquerade-$1" ask guest "$INET_IP" 7000 "$HOST_WAN"
    if [ "${2:-}" = network ]; then
        check "network-forward-8080-$1" ask inet "$HOST_WAN" 8080 "$INET_IP"
    fi
    logged iptables-save
}

# wait_boot: bounded wait for the boot to finish; on a hang, record where it hung, then free
# it (kill what of ours blocks ufw.service), so the later checks still say something.
wait_boot() {
    local state hung procs pid args
    state=$(timeout "$BOOT_WAIT" systemctl is-system-running --wait 2>&1)
    if [ $? = 124 ]; then
        hung="boot not finished after ${BOOT_WAIT}s (uptime $(cut -d' ' -f1 /proc/uptime)s); jobs: $(systemctl list-jobs --no-legend | head -n 8 | oneline)"
        procs=$(for pid in $(cat /sys/fs/cgroup/system.slice/ufw.service/cgroup.procs 2>/dev/null); do
            printf '%s (%s s): %s; ' "$pid" "$(ps -o etimes= -p "$pid")" "$(tr '\0' ' ' < "/proc/$pid/cmdline")"; done)
        record boot-finished FAIL "$hung; ufw.service processes: $procs"
        logged ps -eo pid,ppid,etimes,args --forest
        for pid in $(cat /sys/fs/cgroup/system.slice/ufw.service/cgroup.procs 2>/dev/null); do
            args=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)
            case "$args" in *kvmufw_hook*) kill "$pid" && say "freed the boot: killed $pid ($args)" ;; esac
        done
        timeout 120 systemctl is-system-running --wait >/dev/null 2>&1
    else
        record boot-finished OK "$state at uptime $(cut -d' ' -f1 /proc/uptime)s"
    fi
    record systemd-analyze INFO "$(systemd-analyze 2>&1 | head -n 2)"
    # ufw.service: did it finish, and how long did its start take?
    local active enter leave secs
    active=$(systemctl show -P ActiveState ufw.service)
    leave=$(systemctl show -P InactiveExitTimestampMonotonic ufw.service)
    enter=$(systemctl show -P ActiveEnterTimestampMonotonic ufw.service)
    if [ "$active" = active ] && [ "${enter:-0}" -gt 0 ]; then
        secs=$(( (enter - leave) / 1000000 ))
        # UFW alone takes seconds under TCG; a wait on libvirt takes for ever (until freed)
        if [ $secs -le 60 ]; then record ufw-service-start OK "active; its start took ${secs}s"
        else record ufw-service-start FAIL "active, but its start took ${secs}s (more than 60 s)"; fi
    else
        record ufw-service-start FAIL "ufw.service is $active, not started (start began at ${leave}us)"
    fi
}

# wait_for WHAT SECONDS CMD...: bounded poll until CMD succeeds
wait_for() {
    local what=$1 secs=$2 i
    shift 2
    for i in $(seq "$secs"); do
        "$@" >/dev/null 2>&1 && { record "$what" OK "after ${i}s"; return 0; }
        sleep 1
    done
    record "$what" FAIL "not within ${secs}s: $("$@" 2>&1 | oneline)"
    return 1
}
net_active() { [ "$(timeout 20 virsh net-info "$NET" | awk '/^Active:/ {print $2}')" = yes ]; }
dom_running() { [ "$(timeout 20 virsh domstate "$DOM")" = running ]; }
# A diskless guest under TCG inside TCG only burns CPU: pause it (its QEMU, its tap on the
# bridge and every hook stay; the namespace plays its services).
pause_guest() { logged virsh suspend "$DOM"; }

# after_init_bounded: UFW's after.init must never wait on libvirt. At boot, libvirt's socket
# listens but the daemon waits for ufw.service: a connect succeeds and no answer ever comes.
# Replay that here, deterministically: sockets that listen and never answer, in a mount
# namespace of its own, so the running libvirtd is left alone.
after_init_bounded() {
    local out rc start secs
    start=$(date +%s)
    out=$(unshare --mount --propagation private bash -c '
        mount -t tmpfs none /run/libvirt
        python3 -c "import socket, time
socks = []
for name in (\"libvirt-sock\", \"libvirt-sock-ro\"):
    s = socket.socket(socket.AF_UNIX); s.bind(\"/run/libvirt/\" + name); s.listen(16)
    socks.append(s)
time.sleep(60)" &
        sleep 1
        timeout 45 /etc/ufw/after.init start; rc=$?
        kill $! 2>/dev/null
        exit $rc' 2>&1); rc=$?
    secs=$(( $(date +%s) - start ))
    printf '%s\n' "$out" >> "$STATE/log"
    if [ $rc = 0 ] && [ $secs -le 25 ]; then
        record after-init-never-waits-on-libvirt OK "after.init start took ${secs}s with a libvirt socket that never answers"
    else
        record after-init-never-waits-on-libvirt FAIL "after.init start with a libvirt socket that never answers: exit $rc after ${secs}s (124: still waiting at 45 s; more than 25 s fails); $out"
    fi
}

# stop_guest [WHEN]: a diskless guest ignores ACPI, and libvirt-guests would wait minutes for
# it at shutdown: destroy it (it may be gone already).
stop_guest() {
    local state name=dom-destroy${1:+-$1}
    logged virsh destroy "$DOM"
    state=$(timeout 20 virsh domstate "$DOM" 2>&1)
    if [ "$state" = "shut off" ]; then record "$name" OK "$DOM is shut off"
    else record "$name" FAIL "$DOM is '$state' after virsh destroy"; fi
}

# no_iptables_chains WHEN: with the nftables backend selected, no KVMUFW chain of the
# iptables backend is left in either family (the glue in others' chains is tagged kvmufw,
# in lower case, and stays).
no_iptables_chains() {
    local left
    left=$( { iptables-save; ip6tables-save; } 2>&1 | grep KVMUFW | sort -u)
    if [ -z "$left" ]; then record "no-iptables-chains-$1" OK "no KVMUFW in iptables-save nor ip6tables-save"
    else record "no-iptables-chains-$1" FAIL "$left"; fi
}
nft_table() { nft list table inet kvmufw; }
# doctor_names_nftables: doctor names the backend in use (its exit status counts warnings)
doctor_names_nftables() {
    local out
    out=$(timeout 120 kvmufw_hook doctor 2>&1)
    printf '%s\n' "$out" | grep 'firewall backend' && printf '%s\n' "$out" | grep -q 'firewall backend: nftables'
}
# settled: after libvirt's start, wait until the daemon answers and its own jumps (with the
# rejects our glue must pass) are back, and a few seconds more
settled() {
    local i
    timeout 60 virsh net-info "$NET" >/dev/null 2>&1
    for i in $(seq 20); do
        iptables -w -S FORWARD | grep -q -- '-j LIBVIRT_' && break
        sleep 1
    done
    sleep 3
}
select_nftables() {
    mkdir -p /etc/kvmufw_hook && echo 'firewall_backend = "nftables"' > /etc/kvmufw_hook/kvmufw_hook.conf
}

# --------------------------------------------------------------------------- phases

NET_XML="<network><name>$NET</name><forward mode='nat' dev='eth0'/>
  <bridge name='$BRIDGE' stp='off'/>
  <ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.100' end='10.0.0.200'/>
    <host mac='$GUEST_MAC' ip='$GUEST_IP'/></dhcp></ip></network>"
DOM_XML="<domain type='qemu'><name>$DOM</name><memory unit='MiB'>48</memory><vcpu>1</vcpu>
  <metadata><kvmufw:forwards xmlns:kvmufw=\"urn:kvmufw:1\">
    <kvmufw:forward host-port=\"2222\" guest-port=\"22\"/></kvmufw:forwards></metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices><interface type='network'><source network='$NET'/><mac address='$GUEST_MAC'/>
    <model type='e1000'/><rom enabled='no'/></interface>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices></domain>"

phase1() {
    wait_boot
    check install env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$SRC/kvmufw-hook.deb"
    # the image has no lxml (tests/boot/image.py): every hook below runs without it
    check no-lxml sh -c '! python3 -c "import lxml" 2>/dev/null'
    check ufw-entry-add kvmufw_hook ufw-entry add
    check ufw-enable ufw --force enable
    printf '%s\n' "$NET_XML" > "$STATE/net.xml"
    printf '%s\n' "$DOM_XML" > "$STATE/dom.xml"
    check net-define virsh net-define "$STATE/net.xml"
    check net-autostart virsh net-autostart "$NET"
    check net-start virsh net-start "$NET"
    check dom-define virsh define "$STATE/dom.xml"
    check dom-autostart virsh autostart "$DOM"
    check dom-start virsh start "$DOM"
    pause_guest
    setup_guest_ns >> "$STATE/log" 2>&1
    start_peers
    packets phase1
    logged kvmufw_hook status
    stop_guest
    echo 2 > "$STATE/phase"
    say "rebooting"
    sync
    systemctl reboot
}

phase2() {
    wait_boot
    record uptime INFO "$(uptime)"
    wait_for net-autostarted 120 net_active
    wait_for dom-autostarted 120 dom_running
    pause_guest
    setup_guest_ns >> "$STATE/log" 2>&1
    start_peers
    packets after-boot
    jumps_first_within after-boot 20
    logged kvmufw_hook status
    logged kvmufw_hook doctor

    check forward-add-network kvmufw_hook forward add --network "$NET" 8080:80 --guest-ip "$GUEST_IP"
    check network-forward-8080-after-add ask inet "$HOST_WAN" 8080 "$INET_IP"

    check ufw-reload ufw reload
    packets after-ufw-reload network
    jumps_first_within after-ufw-reload 20

    check libvirtd-restart systemctl restart libvirtd
    jumps_first_within after-libvirtd-restart 20
    packets after-libvirtd-restart network

    check manage-builtins sed -i 's/^MANAGE_BUILTINS=.*/MANAGE_BUILTINS=yes/' /etc/default/ufw
    check ufw-reload-builtins ufw reload
    packets after-builtins-reload network
    check libvirtd-restart-builtins systemctl restart libvirtd
    jumps_first_within after-builtins-restart 20
    packets after-builtins-restart network

    # Issue 9, item 3: no guest with forwards runs, a reload wipes libvirt's jumps, and the
    # daemon's start puts them back at position 1; no hook of ours runs: only what runs at
    # the daemon's start can put our jumps first again.
    record dom-state-before-destroy INFO "$(timeout 20 virsh domstate "$DOM" 2>&1)"
    stop_guest
    check ufw-reload-no-guest ufw reload
    check network-forward-8080-after-reload-no-guest ask inet "$HOST_WAN" 8080 "$INET_IP"
    check libvirtd-restart-no-guest systemctl restart libvirtd
    jumps_first_within after-restart-no-guest 20
    check network-forward-8080-after-restart-no-guest ask inet "$HOST_WAN" 8080 "$INET_IP"
    logged kvmufw_hook status
    logged kvmufw_hook doctor

    # Issue 21: the nftables backend, selected with guests stopped; the next hook (the
    # guest's start) completes the switch, then replay; packets through table inet kvmufw
    # across a reload and a restart, then across a reboot (phase 3).
    check select-nftables select_nftables
    check dom-start-nftables virsh start "$DOM"
    pause_guest
    check nft-table-after-next-hook nft_table
    no_iptables_chains after-next-hook
    packets nftables-after-next-hook network
    check replay-nftables kvmufw_hook replay
    check nft-table-after-replay nft_table
    no_iptables_chains after-replay
    packets nftables-after-replay network
    check doctor-names-nftables doctor_names_nftables
    check ufw-reload-nftables ufw reload
    packets nftables-after-ufw-reload network
    check libvirtd-restart-nftables systemctl restart libvirtd
    settled
    packets nftables-after-libvirtd-restart network
    no_iptables_chains after-libvirtd-restart
    logged nft list ruleset
    logged kvmufw_hook status
    stop_guest nftables
    trap - EXIT
    echo 3 > "$STATE/phase"
    say "rebooting with the nftables backend selected"
    sync
    systemctl reboot
}

phase3() {
    wait_boot
    wait_for net-autostarted 120 net_active
    wait_for dom-autostarted 120 dom_running
    pause_guest
    setup_guest_ns >> "$STATE/log" 2>&1
    start_peers
    settled
    # What put the table back (seen in the first run: UFW's after.init entry, restore with no
    # owner yet, at UFW's start; then the network's and the guest's start hooks fill it).
    record nft-table-at-boot INFO "$(journalctl -b --no-pager -o short-monotonic 2>/dev/null \
        | grep -E 'kvmufw_hook\[|Finished ufw.service|Started libvirtd.service' | head -n 8)"
    check nft-table-after-boot nft_table
    no_iptables_chains after-boot
    packets nftables-after-boot network
    logged nft list ruleset
    logged kvmufw_hook status
    stop_guest

    after_init_bounded
    # uninstall as the README says: the admin's after.init entry out, apt remove, apt purge
    check ufw-entry-remove kvmufw_hook ufw-entry remove
    check remove env DEBIAN_FRONTEND=noninteractive apt-get remove -y kvmufw-hook
    logged iptables-save
    local left
    left=$( { iptables-save; iptables-save -t nat; } | grep -i kvmufw | sort -u)
    if [ -z "$left" ]; then record uninstall-rules-gone OK "no kvmufw in iptables-save"
    else record uninstall-rules-gone FAIL "$left"; fi
    logged nft list ruleset
    left=$(nft list ruleset 2>&1 | grep -i kvmufw)
    if [ -z "$left" ] && ! nft list table inet kvmufw >/dev/null 2>&1; then
        record uninstall-nft-table-gone OK "no table inet kvmufw, no kvmufw in nft list ruleset"
    else record uninstall-nft-table-gone FAIL "$left"; fi
    left=$(ls -d /etc/libvirt/hooks/*/kvmufw_hook /usr/sbin/kvmufw_hook 2>/dev/null)
    if [ -z "$left" ] && dpkg -l kvmufw-hook 2>/dev/null | grep -q '^rc'; then
        record config-kept-after-remove OK "hooks and command gone; dpkg keeps the configuration (rc)"
    else record config-kept-after-remove FAIL "left: $left; $(dpkg -l kvmufw-hook 2>&1 | tail -n1)"; fi
    check purge env DEBIAN_FRONTEND=noninteractive apt-get purge -y kvmufw-hook
    left=$(ls -d /etc/libvirt/hooks/*/kvmufw_hook /etc/libvirt/hooks/network /etc/libvirt/hooks/qemu \
        /usr/local/sbin/kvmufw_hook /usr/local/lib/kvmufw_hook /etc/systemd/system/*.d/kvmufw_hook* \
        /usr/sbin/kvmufw_hook /usr/lib/kvmufw-hook /usr/lib/python3/dist-packages/kvmufw_hook \
        /usr/lib/systemd/system/*.d/kvmufw-hook* /usr/share/doc/kvmufw-hook \
        /run/kvmufw_hook /var/lib/kvmufw_hook 2>/dev/null; grep -l kvmufw /etc/ufw/*.init 2>/dev/null
        status=$(dpkg-query -W -f='${Status}' kvmufw-hook 2>/dev/null)
        case $status in ""|*not-installed) ;; *) echo "dpkg: kvmufw-hook $status" ;; esac)
    if [ -z "$left" ]; then record uninstall-files-gone OK "no hook, command, package, drop-in or after.init entry left"
    else record uninstall-files-gone FAIL "left: $left"; fi
}

finish() {
    trap - EXIT
    say "powering off"
    timeout 20 virsh destroy "$DOM" >/dev/null 2>&1
    journalctl -b --no-pager > "$STATE/journal-phase$PHASE.txt" 2>&1
    echo done > "$STATE/finished"
    sync
    systemctl poweroff
}

case "${1:-}" in
    net) setup_internet ;;
    run)
        boots=$(( $(cat "$STATE/boots" 2>/dev/null || echo 0) + 1 ))
        echo "$boots" > "$STATE/boots"
        say "boot $boots starts, uptime $(cut -d' ' -f1 /proc/uptime)s"
        if [ "$boots" -gt 3 ]; then say "more boots than phases: powering off"; finish; exit 0; fi
        case "$PHASE" in
            1) phase1 ;;
            2) trap finish EXIT; phase2 ;;
            *) trap finish EXIT; phase3 ;;
        esac ;;
    *) echo "usage: $0 net|run" >&2; exit 2 ;;
esac
