#!/bin/bash
# vm-tests/systemd, in the guest: run by btrship-vmtest.service once the
# system is up (systemd is PID 1); prints "PASS ..."/"FAIL ..." per
# assertion, "VM: ..." progress and "RESULT PASS|FAIL" on the serial console;
# the unit powers the machine off when this script ends.
#
# Kernel command line: btrship_vm=test (the checks, see vm-tests/systemd)
# or btrship_vm=explore-caps (the search for the minimal capability sets).
# Disks: vda the root (ext4), vdb the share's btrfs (mounted at /srv).
# Files from the host (the initramfs copied them): /usr/bin/btrship,
# /usr/lib/btrship-vm/{test.sh,hardening-daemon.conf,hardening-snapshot.conf,
# hardening-mount.conf}.

set -uo pipefail
if [ -z "${VMTEST_INNER:-}" ]; then
	# a pipe, not the tty itself: btrship draws no progress bars into the log
	VMTEST_INNER=1 "$0" "$@" < /dev/null 2>&1 | tee /var/log/btrship-vmtest.log > /dev/ttyS0
	exit "${PIPESTATUS[0]}"
fi
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C
D=/usr/lib/btrship-vm
SD=/etc/systemd/system
MODE="test"
for w in $(cat /proc/cmdline); do
	case $w in btrship_vm=*) MODE=${w#*=} ;; esac
done

FAILS=0
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "VM: $* [t=$(up)]"; }
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; FAILS=$(( FAILS + 1 )); }
indent() { sed 's/^/    | /'; }
# expect WHAT GOT WANT
expect() { if [ "$2" = "$3" ]; then pass "$1: $2"; else fail "$1: got '$2', want '$3'"; fi; }
prop() { systemctl show -p "$2" --value "$1"; }
journal() { journalctl -u "$1" --no-pager -o cat -n "${2:-25}" 2>&1 | indent; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# wait_prop UNIT PROP VALUE SECONDS: until the property has the value
wait_prop() {
	local i=0
	while [ "$(prop "$1" "$2")" != "$3" ]; do
		[ $i -ge $(( $4 * 5 )) ] && return 1
		sleep 0.2
		i=$(( i + 1 ))
	done
}

# capability numbers (linux/capability.h), for CapBnd in /proc/PID/status
declare -A CAPNO=([CAP_CHOWN]=0 [CAP_DAC_OVERRIDE]=1 [CAP_DAC_READ_SEARCH]=2 [CAP_FOWNER]=3
	[CAP_FSETID]=4 [CAP_KILL]=5 [CAP_SETGID]=6 [CAP_SETUID]=7 [CAP_SETPCAP]=8
	[CAP_LINUX_IMMUTABLE]=9 [CAP_NET_BIND_SERVICE]=10 [CAP_NET_ADMIN]=12 [CAP_NET_RAW]=13
	[CAP_IPC_LOCK]=14 [CAP_SYS_MODULE]=16 [CAP_SYS_RAWIO]=17 [CAP_SYS_CHROOT]=18
	[CAP_SYS_PTRACE]=19 [CAP_SYS_ADMIN]=21 [CAP_SYS_NICE]=23 [CAP_SYS_RESOURCE]=24
	[CAP_SYS_TIME]=25 [CAP_MKNOD]=27 [CAP_LEASE]=28 [CAP_AUDIT_WRITE]=29 [CAP_SETFCAP]=31)
capmask() { # CAP...: the CapBnd hex of exactly these
	local m=0 c
	for c in "$@"; do m=$(( m | (1 << ${CAPNO[$c]}) )); done
	printf '%016x' "$m"
}
conf_value() { sed -n "s/^$2=//p" "$1" | tail -n 1; } # FILE KEY
norm() { echo "$1" | tr 'A-Z' 'a-z' | tr ' ' '\n' | grep -v '^$' | sort | tr '\n' ' '; }

# ---------------------------------------------------------------- setup
N=0
setup() {
	say "setup: btrfs on /dev/vdb at /srv, btrship init"
	mkfs.btrfs -q -f /dev/vdb > /tmp/mkfs.out 2>&1 || { fail "mkfs.btrfs /dev/vdb"; indent < /tmp/mkfs.out; return 1; }
	mount /dev/vdb /srv || { fail "mount /dev/vdb /srv"; return 1; }
	btrfs -q subvolume create /srv/share || { fail "btrfs subvolume create /srv/share"; return 1; }
	# a Samba user's private directory: the daemon (root) reads it only
	# with CAP_DAC_READ_SEARCH/CAP_DAC_OVERRIDE, leases only with CAP_LEASE
	mkdir /srv/share/alice
	chown 1000:1000 /srv/share/alice
	chmod 700 /srv/share/alice
	if btrship init /srv/share --repo /var/lib/btrship/repo > /tmp/init.out 2>&1; then
		pass "btrship init /srv/share --repo /var/lib/btrship/repo"
	else
		fail "btrship init /srv/share exited $?"
	fi
	indent < /tmp/init.out
	local u
	for u in btrship@.service btrship-snapshot@.service btrship-snapshot@.timer \
		btrship-prune@.service btrship-prune@.timer btrship-mount@.service; do
		if [ -f "$SD/$u" ] || [ -f "/lib/systemd/system/$u" ]; then
			pass "unit $u installed ($(ls "$SD/$u" "/lib/systemd/system/$u" 2> /dev/null | tr '\n' ' '))"
		else
			fail "no unit $u in $SD or /lib/systemd/system after btrship init"
		fi
	done
	install_dropins "$D/hardening-daemon.conf" "$D/hardening-snapshot.conf"
	mkdir -p "$SD/btrship-mount@.service.d"
	cp "$D/hardening-mount.conf" "$SD/btrship-mount@.service.d/hardening.conf"
	# the snapshot service ends before it can be looked at: a probe records
	# the sandbox it runs in (same unit, same drop-ins)
	mkdir -p "$SD/btrship-snapshot@.service.d"
	cat > "$SD/btrship-snapshot@.service.d/zz-vmtest-probe.conf" <<-'EOF'
		[Service]
		ExecStartPre=/bin/sh -c 'grep -E "^(CapBnd|NoNewPrivs|Seccomp|Umask):" /proc/self/status > /run/btrship-vmtest-snapshot-probe; cat /proc/self/mountinfo >> /run/btrship-vmtest-snapshot-probe'
	EOF
	systemctl daemon-reload || fail "systemctl daemon-reload"
}
install_dropins() { # DAEMON_CONF SNAPSHOT_CONF
	mkdir -p "$SD/btrship@.service.d" "$SD/btrship-snapshot@.service.d"
	cp "$1" "$SD/btrship@.service.d/hardening.conf"
	cp "$2" "$SD/btrship-snapshot@.service.d/hardening.conf"
}

# write_files: new contents of three files: one by root, one replaced
# Office style (temp file renamed over it), one by uid 1000 (0600 in 0700)
write_files() {
	N=$(( N + 1 ))
	printf 'root file, version %s\n' "$N" > /srv/share/root.txt
	printf 'document, version %s\n' "$N" > /srv/share/.~doc.tmp && mv /srv/share/.~doc.tmp /srv/share/doc.txt
	setpriv --reuid=1000 --regid=1000 --clear-groups sh -c \
		"umask 077; printf 'alice secret, version %s\n' $N > /srv/share/alice/secret.txt"
}

# shipped WHAT: sync, then restore the three files as of now and compare
shipped() {
	local t0 rc out
	t0=$(now_ms)
	out=$(timeout 180 btrship sync share 2>&1)
	rc=$?
	if [ $rc = 0 ]; then
		pass "$1: btrship sync share ($(( $(now_ms) - t0 )) ms)"
	else
		fail "$1: btrship sync share exited $rc: $out"
		journal btrship@share.service
		return 1
	fi
	rm -rf /tmp/restore
	out=$(btrship restore share --at now --to /tmp/restore --path root.txt --path doc.txt --path alice/secret.txt 2>&1)
	rc=$?
	if [ $rc != 0 ]; then
		fail "$1: btrship restore exited $rc: $out"
		btrship versions share alice/secret.txt 2>&1 | indent
		journalctl -u btrship@share.service --no-pager -o cat -p warning -n 10 2>&1 | indent
		return 1
	fi
	local f bad=
	for f in root.txt doc.txt alice/secret.txt; do
		cmp -s "/srv/share/$f" "/tmp/restore/$f" || bad="$bad $f"
	done
	if [ -z "$bad" ]; then
		pass "$1: version $N of root.txt, doc.txt, alice/secret.txt restores exactly"
	else
		fail "$1: restored files differ from the share:$bad"
		btrship versions share alice/secret.txt 2>&1 | indent
		journalctl -u btrship@share.service --no-pager -o cat -p warning -n 10 2>&1 | indent
	fi
	rm -rf /tmp/restore
}

# status_is WHAT RC HEALTH: btrship status exit code and health
status_is() {
	local out rc health
	out=$(btrship status share --json 2>&1)
	rc=$?
	health=$(echo "$out" | grep -o '"health": *"[a-z_]*"' | head -n 1 | sed 's/.*"\([a-z_]*\)"$/\1/')
	if [ "$rc" = "$2" ] && [ "$health" = "$3" ]; then
		pass "$1: btrship status exits $rc, health $health"
	else
		fail "$1: btrship status exited $rc with health '$health' (want $2, $3)"
		btrship status share 2>&1 | indent
	fi
}

# check_props UNIT CONF: systemctl show reports every option of the drop-in
check_props() {
	local line k v got
	while IFS= read -r line; do
		case $line in '' | '#'* | '['*) continue ;; esac
		k=${line%%=*}
		v=${line#*=}
		got=$(prop "$1" "$k")
		case $k=$v in
		# systemctl shows the namespaces still allowed: none
		RestrictNamespaces=yes) [ "$got" = "" ] || [ "$got" = yes ] && got=yes ;;
		SystemCallArchitectures=native) [ "$got" = native ] || [ "$got" = x86-64 ] && got=native ;;
		# one line per rule (ProtectClock adds char-rtc r): this rule among them
		DeviceAllow=*) echo "$got" | grep -qxF "$v" && got=$v ;;
		esac
		if [ "$(norm "$v")" = "$(norm "$got")" ]; then
			pass "$1 applies $k=$v"
		else
			fail "$1: $k is '$got' for systemctl show, the drop-in sets '$v'"
		fi
	done < "$2"
}

# mnt_opt MOUNTINFO DIR: rw or ro of the last mount on DIR (fields 5 and 6)
mnt_opt() { awk -v d="$2" '$5 == d {split($6, o, ","); r = o[1]} END {print r}' "$1"; }

# check_sandbox WHAT STATUSFILE MOUNTINFO CONF: the kernel's view of a
# process started by the unit
check_sandbox() {
	local st=$2 mi=$3 conf=$4 want got
	# shellcheck disable=SC2046
	want=$(capmask $(conf_value "$conf" CapabilityBoundingSet))
	got=$(sed -n 's/^CapBnd:[[:space:]]*//p' "$st")
	expect "$1: CapBnd (bounding set)" "$got" "$want"
	expect "$1: NoNewPrivs" "$(sed -n 's/^NoNewPrivs:[[:space:]]*//p' "$st")" 1
	expect "$1: Seccomp (filter mode)" "$(sed -n 's/^Seccomp:[[:space:]]*//p' "$st")" 2
	expect "$1: Umask" "$(sed -n 's/^Umask:[[:space:]]*//p' "$st")" "$(conf_value "$conf" UMask)"
	# mountinfo: field 5 the mount point, 6 its options
	if [ "$(conf_value "$conf" ProtectSystem)" = full ]; then
		expect "$1: /usr mounted read-only (ProtectSystem)" "$(mnt_opt "$mi" /usr)" ro
		expect "$1: /etc mounted read-only (ProtectSystem=full)" "$(mnt_opt "$mi" /etc)" ro
	fi
	[ "$(conf_value "$conf" PrivateTmp)" = yes ] &&
		expect "$1: private /tmp (PrivateTmp)" "$(awk '$5 == "/tmp" {r = "mounted"} END {print r}' "$mi")" mounted
	[ "$(conf_value "$conf" PrivateDevices)" = yes ] &&
		expect "$1: private /dev (PrivateDevices)" "$(awk '$5 == "/dev" {for (i = 7; i <= NF; i++) if ($i == "-") {r = $(i + 1); break}} END {print r}' "$mi")" tmpfs
	[ "$(conf_value "$conf" ProtectKernelTunables)" = yes ] &&
		expect "$1: /proc/sys read-only (ProtectKernelTunables)" "$(mnt_opt "$mi" /proc/sys)" ro
	[ "$(conf_value "$conf" ProtectControlGroups)" = yes ] &&
		expect "$1: /sys/fs/cgroup read-only (ProtectControlGroups)" "$(mnt_opt "$mi" /sys/fs/cgroup)" ro
	return 0
}

# ---------------------------------------------------------------- (a), (d)
check_daemon() {
	local u=btrship@share.service t0 rc pid
	say "(a) the daemon unit under the hardening drop-in"
	t0=$(now_ms)
	timeout 300 systemctl start $u
	rc=$?
	if [ $rc = 0 ]; then
		pass "(a) systemctl start $u returned: READY=1 after $(( $(now_ms) - t0 )) ms"
	else
		fail "(a) systemctl start $u exited $rc"
		journal $u
		return 1
	fi
	expect "(a) ActiveState" "$(prop $u ActiveState)" active
	expect "(a) SubState" "$(prop $u SubState)" running
	expect "(a) Type" "$(prop $u Type)" notify
	expect "(a) Restart" "$(prop $u Restart)" on-failure
	expect "(a) RestartPreventExitStatus" "$(norm "$(prop $u RestartPreventExitStatus)")" "$(norm "2 3 4 6 11 12")"
	expect "(a) WatchdogUSec" "$(prop $u WatchdogUSec)" 5min
	expect "(a) ExecStart runs /usr/bin/btrship" "$(prop $u ExecStart | grep -o 'path=[^ ;]*' | head -n 1)" path=/usr/bin/btrship
	expect "(a) drop-in hardening.conf loaded" "$(prop $u DropInPaths | grep -o "$SD/btrship@.service.d/hardening.conf")" "$SD/btrship@.service.d/hardening.conf"
	check_props $u "$D/hardening-daemon.conf"
	pid=$(prop $u MainPID)
	if [ -n "$pid" ] && [ "$pid" != 0 ] && [ -r "/proc/$pid/status" ]; then
		cp "/proc/$pid/status" /tmp/daemon.status
		cp "/proc/$pid/mountinfo" /tmp/daemon.mountinfo
		check_sandbox "(d) daemon pid $pid" /tmp/daemon.status /tmp/daemon.mountinfo "$D/hardening-daemon.conf"
	else
		fail "(a) no main pid for $u"
	fi
	write_files
	shipped "(a)"
	status_is "(a)" 0 ok
	# the daemon pings the watchdog every 5 s while it makes progress
	local i=0 wt=0
	while [ $i -lt 20 ]; do
		wt=$(prop $u WatchdogTimestampMonotonic)
		[ -n "$wt" ] && [ "$wt" != 0 ] && break
		sleep 1
		i=$(( i + 1 ))
	done
	if [ -n "$wt" ] && [ "$wt" != 0 ]; then
		pass "(a) watchdog pinged (WatchdogTimestampMonotonic=$wt)"
	else
		fail "(a) no WATCHDOG=1 ping reached systemd within 20 s"
	fi
	expect "(a) NRestarts" "$(prop $u NRestarts)" 0
}

# ---------------------------------------------------------------- (c)
check_snapshot() {
	local u=btrship-snapshot@share.service t0 rc before after
	say "(c) the snapshot service under its hardening drop-in"
	before=$(btrship snapshots share 2> /dev/null | grep -c . || true)
	echo "snapshot content $N" > /srv/share/snapshot-marker.txt
	rm -f /run/btrship-vmtest-snapshot-probe
	t0=$(now_ms)
	timeout 600 systemctl start $u
	rc=$?
	if [ $rc = 0 ]; then
		pass "(c) systemctl start $u succeeded ($(( $(now_ms) - t0 )) ms)"
	else
		fail "(c) systemctl start $u exited $rc"
		journal $u
	fi
	expect "(c) Result" "$(prop $u Result)" success
	expect "(c) ExecMainStatus" "$(prop $u ExecMainStatus)" 0
	after=$(btrship snapshots share 2> /dev/null | grep -c . || true)
	if [ "$after" -gt "$before" ]; then
		pass "(c) btrship snapshots lists the new snapshot ($before -> $after lines)"
	else
		fail "(c) btrship snapshots shows no new snapshot ($before -> $after lines)"
		btrship snapshots share 2>&1 | indent
	fi
	check_props $u "$D/hardening-snapshot.conf"
	if [ -s /run/btrship-vmtest-snapshot-probe ]; then
		grep -E '^(CapBnd|NoNewPrivs|Seccomp|Umask):' /run/btrship-vmtest-snapshot-probe > /tmp/snap.status
		grep -vE '^(CapBnd|NoNewPrivs|Seccomp|Umask):' /run/btrship-vmtest-snapshot-probe > /tmp/snap.mountinfo
		check_sandbox "(d) snapshot service" /tmp/snap.status /tmp/snap.mountinfo "$D/hardening-snapshot.conf"
	else
		fail "(d) the snapshot service's sandbox probe wrote nothing"
	fi
}

check_timer() {
	local t=btrship-snapshot@share.timer out rc
	say "(c) the snapshot timer"
	if systemctl enable --now $t > /tmp/enable.out 2>&1; then
		pass "(c) systemctl enable --now $t"
	else
		fail "(c) systemctl enable --now $t failed"
		indent < /tmp/enable.out
	fi
	expect "(c) timer ActiveState" "$(prop $t ActiveState)" active
	expect "(c) timer UnitFileState" "$(prop $t UnitFileState)" enabled
	out=$(systemctl list-timers --all --no-pager 2>&1)
	echo "$out" | indent
	if echo "$out" | grep -q "$t.*btrship-snapshot@share.service"; then
		pass "(c) systemctl list-timers shows $t activating btrship-snapshot@share.service"
	else
		fail "(c) $t is not in systemctl list-timers"
	fi
	if prop $t TimersMonotonic | grep -q 'OnUnitActiveUSec.*1h'; then
		pass "(c) the share's interval (drop-in) is in force: $(prop $t TimersMonotonic | tr '\n' ' ')"
	else
		fail "(c) TimersMonotonic lacks OnUnitActiveUSec=1h: $(prop $t TimersMonotonic)"
	fi
	out=$(systemd-analyze verify $t btrship-snapshot@share.service btrship@share.service 2>&1)
	rc=$?
	if [ $rc = 0 ] && ! echo "$out" | grep -q 'btrship@\|btrship-snapshot@'; then
		pass "(c) systemd-analyze verify of the timer and both services: clean"
	else
		fail "(c) systemd-analyze verify exited $rc"
	fi
	[ -n "$out" ] && echo "$out" | indent
	systemctl stop $t
}

# the prune timer: enabled and listed, never fired here (the service is
# verified and its sandbox shown, not started)
check_prune_timer() {
	local t=btrship-prune@share.timer u=btrship-prune@share.service out rc
	say "(c) the prune timer"
	if systemctl enable --now $t > /tmp/enable.out 2>&1; then
		pass "(c) systemctl enable --now $t"
	else
		fail "(c) systemctl enable --now $t failed"
		indent < /tmp/enable.out
	fi
	expect "(c) prune timer ActiveState" "$(prop $t ActiveState)" active
	expect "(c) prune timer UnitFileState" "$(prop $t UnitFileState)" enabled
	expect "(c) prune timer Persistent" "$(prop $t Persistent)" yes
	expect "(c) prune timer RandomizedDelayUSec" "$(prop $t RandomizedDelayUSec)" 1h
	if prop $t TimersCalendar | grep -q 'OnCalendar=\*-\*-\* 00:00:00'; then
		pass "(c) prune timer is daily: $(prop $t TimersCalendar | tr '\n' ' ')"
	else
		fail "(c) prune timer TimersCalendar is not daily: $(prop $t TimersCalendar)"
	fi
	out=$(systemctl list-timers --all --no-pager 2>&1)
	if echo "$out" | grep -q "$t.*$u"; then
		pass "(c) systemctl list-timers shows $t activating $u"
	else
		fail "(c) $t is not in systemctl list-timers"
		echo "$out" | indent
	fi
	expect "(c) prune service Type" "$(prop $u Type)" oneshot
	# systemctl show gives the class as its number (IOPRIO_CLASS_IDLE = 3)
	out=$(prop $u IOSchedulingClass)
	[ "$out" = 3 ] && out=idle
	expect "(c) prune service IOSchedulingClass" "$out" idle
	expect "(c) prune service Nice" "$(prop $u Nice)" 10
	if prop $u ExecStart | grep -q 'argv\[\]=/usr/bin/btrship .* prune \(share\|%i\) '; then
		pass "(c) prune service runs btrship prune share"
	else
		fail "(c) prune service ExecStart: $(prop $u ExecStart)"
	fi
	check_props $u "$D/hardening-snapshot.conf"
	out=$(systemd-analyze verify $t $u 2>&1)
	rc=$?
	if [ $rc = 0 ] && ! echo "$out" | grep -q 'btrship-prune@'; then
		pass "(c) systemd-analyze verify of the prune timer and service: clean"
	else
		fail "(c) systemd-analyze verify of the prune units exited $rc"
	fi
	[ -n "$out" ] && echo "$out" | indent
	systemctl disable --now $t > /dev/null 2>&1
}

# ---------------------------------------------------------------- (m)
# The mount service, never started here (the FUSE server is btrship mount's
# own test): systemd-analyze verify, the properties the renderer promises,
# no option that makes a mount namespace, and its sandbox shown to work by a
# probe: the same unit file (same drop-in) with a shell in place of btrship
# mount that opens /dev/fuse, mounts a FUSE filesystem at /run/btrship/share
# and exits, as a killed server would. The host's namespace sees the mount
# (smbd would), dead; stopping the probe runs the unit's ExecStopPost, which
# detaches it. The probe also mounts the share's btrfs top level from its
# block device (what btrship's private snapshot area does) under the
# unit's device policy.
check_mount_unit() {
	local u=btrship-mount@share.service p=btrship-vmtest-mountprobe@share.service
	local dir=/run/btrship/share probe=/run/btrship-vmtest-mount-probe out rc k want got
	say "(m) the mount service (not started: static checks and a sandbox probe)"
	out=$(systemd-analyze verify $u 2>&1)
	rc=$?
	if [ $rc = 0 ] && ! echo "$out" | grep -q 'btrship'; then
		pass "(m) systemd-analyze verify $u: clean"
	else
		fail "(m) systemd-analyze verify $u exited $rc"
	fi
	[ -n "$out" ] && echo "$out" | indent
	expect "(m) Type" "$(prop $u Type)" notify
	expect "(m) NotifyAccess" "$(prop $u NotifyAccess)" main
	expect "(m) Restart" "$(prop $u Restart)" on-failure
	expect "(m) RestartUSec" "$(prop $u RestartUSec)" 5s
	expect "(m) RestartPreventExitStatus" "$(norm "$(prop $u RestartPreventExitStatus)")" "$(norm "2 3 4 6 11 12")"
	expect "(m) ExecStart runs /usr/bin/btrship" "$(prop $u ExecStart | grep -o 'path=[^ ;]*' | head -n 1)" path=/usr/bin/btrship
	if prop $u ExecStart | grep -q 'argv\[\]=/usr/bin/btrship .* --no-progress mount \(share\|%i\) ;'; then
		pass "(m) ExecStart runs btrship mount share (the default directory)"
	else
		fail "(m) ExecStart: $(prop $u ExecStart)"
	fi
	if prop $u ExecStopPost | grep -q 'path=/bin/umount ; argv\[\]=/bin/umount --lazy /run/btrship/\(share\|%i\) ; ignore_errors=yes'; then
		pass "(m) ExecStopPost detaches /run/btrship/share, errors ignored"
	else
		fail "(m) ExecStopPost: $(prop $u ExecStopPost)"
	fi
	got=$(prop $u After)
	for k in network-online.target local-fs.target; do
		echo " $got " | grep -q " $k " && pass "(m) After has $k" || fail "(m) After lacks $k: $got"
	done
	echo " $got " | grep -q ' btrship@share.service ' && fail "(m) After has btrship@share.service (a cycle with smbd): $got"
	echo " $(prop $u Before) " | grep -q ' smbd.service ' && pass "(m) Before has smbd.service" ||
		fail "(m) Before lacks smbd.service: $(prop $u Before)"
	expect "(m) drop-in hardening.conf loaded" "$(prop $u DropInPaths | grep -o "$SD/btrship-mount@.service.d/hardening.conf")" "$SD/btrship-mount@.service.d/hardening.conf"
	check_props $u "$D/hardening-mount.conf"
	# what systemctl show says when none of the options that make a
	# mount namespace (systemd.exec(5)) is set
	for k in ProtectSystem=no ProtectHome=no PrivateTmp=no PrivateDevices=no PrivateMounts=no \
		PrivateIPC=no PrivateNetwork=no ProtectKernelTunables=no ProtectKernelModules=no \
		ProtectKernelLogs=no ProtectControlGroups=no ProtectProc=default ProcSubset=all \
		ReadWritePaths= ReadOnlyPaths= InaccessiblePaths= ExecPaths= NoExecPaths= BindPaths= \
		BindReadOnlyPaths= TemporaryFileSystem= RootDirectory= RootImage= MountImages= \
		LogNamespace= MountAPIVFS=no; do
		expect "(m) no mount namespace: ${k%%=*}" "$(prop $u "${k%%=*}")" "${k#*=}"
	done

	# the probe: the unit as rendered, the same drop-in
	sed -e 's/^Type=notify$/Type=oneshot\nRemainAfterExit=yes/' -e '/^NotifyAccess=/d' -e '/^Restart/d' \
		-e 's|^ExecStart=.*|ExecStart=/usr/lib/btrship-vm/mount-probe %i|' \
		"$SD/btrship-mount@.service" > "$SD/btrship-vmtest-mountprobe@.service"
	mkdir -p "$SD/btrship-vmtest-mountprobe@.service.d"
	cp "$SD/btrship-mount@.service.d/hardening.conf" "$SD/btrship-vmtest-mountprobe@.service.d/"
	cat > /usr/lib/btrship-vm/mount-probe <<-'EOF'
		#!/bin/sh
		# in the mount service's sandbox: what the kernel says, then a FUSE
		# mount whose server (this shell) goes away, and the btrfs top level
		exec > /run/btrship-vmtest-mount-probe 2>&1
		echo "ns $(readlink /proc/self/ns/mnt)"
		grep -E '^(CapBnd|NoNewPrivs|Seccomp|Umask):' /proc/self/status
		mkdir -p "/run/btrship/$1"
		exec 3<> /dev/fuse && echo "fuse-open ok"
		mount -i -t fuse.btrship -o ro,nosuid,nodev,noexec,fd=3,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions \
			"btrship:$1" "/run/btrship/$1" && echo "fuse-mount ok"
		mkdir -p /run/btrship-vmtest-top
		mount -o subvolid=5 /dev/vdb /run/btrship-vmtest-top && echo "btrfs-top ok" && umount /run/btrship-vmtest-top
		exit 0
	EOF
	chmod 755 /usr/lib/btrship-vm/mount-probe
	systemctl daemon-reload
	out=$(systemd-analyze verify $p 2>&1)
	[ -n "$out" ] && echo "$out" | indent
	rm -f $probe
	if timeout 60 systemctl start $p; then
		pass "(m) the probe ran in the mount service's sandbox"
	else
		fail "(m) the probe failed"
		journal $p 10
	fi
	indent < $probe
	grep -E '^(CapBnd|NoNewPrivs|Seccomp|Umask):' $probe > /tmp/mount.status
	expect "(m) probe in the host's mount namespace (as PID 1)" "$(sed -n 's/^ns //p' $probe)" "$(readlink /proc/1/ns/mnt)"
	# shellcheck disable=SC2046
	want=$(capmask $(conf_value "$D/hardening-mount.conf" CapabilityBoundingSet))
	expect "(m) probe: CapBnd (bounding set)" "$(sed -n 's/^CapBnd:[[:space:]]*//p' /tmp/mount.status)" "$want"
	expect "(m) probe: NoNewPrivs" "$(sed -n 's/^NoNewPrivs:[[:space:]]*//p' /tmp/mount.status)" 1
	expect "(m) probe: Seccomp (filter mode)" "$(sed -n 's/^Seccomp:[[:space:]]*//p' /tmp/mount.status)" 2
	expect "(m) probe: Umask" "$(sed -n 's/^Umask:[[:space:]]*//p' /tmp/mount.status)" "$(conf_value "$D/hardening-mount.conf" UMask)"
	grep -qx 'fuse-open ok' $probe && pass "(m) probe opened /dev/fuse (DeviceAllow)" || fail "(m) probe could not open /dev/fuse"
	grep -qx 'fuse-mount ok' $probe && pass "(m) probe mounted a FUSE filesystem" || fail "(m) probe could not mount a FUSE filesystem"
	grep -qx 'btrfs-top ok' $probe && pass "(m) probe mounted the btrfs top level from /dev/vdb (the private snapshot area's way)" ||
		fail "(m) probe could not mount the btrfs top level from /dev/vdb (device policy?)"
	expect "(m) the host sees the FUSE mount at $dir" "$(findmnt -n -o FSTYPE,SOURCE "$dir" | tr -s ' ')" "fuse.btrship btrship:share"
	expect "(m) its server gone, the mount is dead" "$(stat -c %n "$dir" 2>&1 | grep -o 'Transport endpoint is not connected')" "Transport endpoint is not connected"
	expect "(m) mode of /run/btrship (UMask)" "$(stat -c %a /run/btrship)" 755
	systemctl stop $p
	expect "(m) stopping the unit ran ExecStopPost: nothing mounted at $dir" "$(findmnt -n -o FSTYPE "$dir")" ""
	expect "(m) $dir usable again" "$(stat -c %F "$dir" 2>&1)" directory
}

# no ordering cycle at boot with Samba and the daemon: a stand-in smbd and a
# target that wants all three, as multi-user.target does when all are enabled
check_mount_order() {
	local out rc
	say "(m) boot order of the mount service, the daemon and smbd"
	if [ ! -e /lib/systemd/system/smbd.service ] && [ ! -e "$SD/smbd.service" ]; then
		printf '[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n' > "$SD/smbd.service"
	fi
	printf '[Unit]\nWants=smbd.service btrship@share.service btrship-mount@share.service\n' > "$SD/btrship-vmtest-boot.target"
	systemctl daemon-reload
	out=$(systemd-analyze verify btrship-vmtest-boot.target 2>&1)
	rc=$?
	if [ $rc = 0 ] && ! echo "$out" | grep -qi 'cycle'; then
		pass "(m) systemd-analyze verify of smbd, btrship@share and btrship-mount@share together: no ordering cycle"
	else
		fail "(m) systemd-analyze verify of smbd, btrship@share and btrship-mount@share together exited $rc"
	fi
	[ -n "$out" ] && echo "$out" | indent
	# the check sees a cycle when there is one: ordered after the daemon
	mkdir -p "$SD/btrship-mount@share.service.d"
	printf '[Unit]\nAfter=btrship@share.service\n' > "$SD/btrship-mount@share.service.d/vmtest-cycle.conf"
	systemctl daemon-reload
	if systemd-analyze verify btrship-vmtest-boot.target 2>&1 | grep -qi 'ordering cycle'; then
		pass "(m) ... and it does with After=btrship@share.service added (the check can fail)"
	else
		fail "(m) no ordering cycle reported with After=btrship@share.service added: the check cannot see one"
	fi
	rm -rf "$SD/btrship-mount@share.service.d" "$SD/btrship-vmtest-boot.target"
	systemctl daemon-reload
}

# ---------------------------------------------------------------- (b)
check_wrong_key() {
	local u=btrship@share.service t0 rc ms
	say "(b) wrong key: the daemon must fail for good, not be restarted"
	systemctl stop $u
	btrfs -q subvolume create /srv/other
	if btrship init /srv/other --name other --repo /var/lib/btrship/repo-other --no-systemd > /tmp/init2.out 2>&1; then
		pass "(b) btrship init /srv/other --repo /var/lib/btrship/repo-other (another repository's key)"
	else
		fail "(b) second btrship init failed"
		indent < /tmp/init2.out
		return 1
	fi
	if cmp -s /etc/btrship/share.key /etc/btrship/other.key; then
		fail "(b) the two repositories have the same key file"
		return 1
	fi
	cp -p /etc/btrship/share.key /tmp/share.key.good
	cp /etc/btrship/other.key /etc/btrship/share.key
	systemctl reset-failed $u 2> /dev/null
	t0=$(now_ms)
	timeout 120 systemctl start $u > /tmp/start.out 2>&1
	rc=$?
	if ! wait_prop $u ActiveState failed 60; then
		fail "(b) $u is '$(prop $u ActiveState)', not failed, 60 s after start (systemctl start exited $rc)"
	fi
	ms=$(( $(now_ms) - t0 ))
	# The daemon checks the repository before READY=1: the start itself
	# fails, and the unit ends failed.
	say "(b) systemctl start exited $rc; the unit is $(prop $u ActiveState) after $ms ms"
	if [ $rc -ne 0 ]; then
		pass "(b) systemctl start itself fails (exit $rc)"
	else
		fail "(b) systemctl start succeeded with the wrong key (the daemon said READY=1 before checking the repository)"
	fi
	if [ "$(prop $u ActiveState)" = failed ] && [ $ms -le 30000 ]; then
		pass "(b) the unit is failed within seconds ($ms ms after systemctl start)"
	else
		fail "(b) the unit is $(prop $u ActiveState) $ms ms after systemctl start (want failed within 30 s)"
	fi
	expect "(b) Result" "$(prop $u Result)" exit-code
	expect "(b) ExecMainStatus (exit::KEY)" "$(prop $u ExecMainStatus)" 4
	expect "(b) NRestarts right after" "$(prop $u NRestarts)" 0
	journal $u 6
	say "(b) waiting 15 s (RestartSec=5s: a restart would have happened)"
	sleep 15
	expect "(b) NRestarts after 15 s" "$(prop $u NRestarts)" 0
	expect "(b) ActiveState after 15 s" "$(prop $u ActiveState)" failed
	if systemctl is-failed --quiet $u; then pass "(b) systemctl is-failed $u: true"; else fail "(b) systemctl is-failed $u: false"; fi
	status_is "(b)" 10 daemon_failed

	say "(b) the right key back: the unit starts again"
	cp -p /tmp/share.key.good /etc/btrship/share.key
	systemctl reset-failed $u
	if timeout 300 systemctl start $u; then
		pass "(b) with the right key $u starts again"
	else
		fail "(b) with the right key $u does not start"
		journal $u
		return 1
	fi
	write_files
	shipped "(b) after recovery"
	status_is "(b) after recovery" 0 ok

	say "a transient failure (SIGKILL) is restarted"
	local before
	before=$(prop $u NRestarts)
	systemctl kill --signal=SIGKILL $u
	if wait_prop $u NRestarts $(( before + 1 )) 60 && wait_prop $u ActiveState active 120; then
		pass "SIGKILLed daemon restarted by systemd (NRestarts $before -> $(prop $u NRestarts)), active"
	else
		fail "SIGKILLed daemon: NRestarts $(prop $u NRestarts), $(prop $u ActiveState)"
	fi
}

# ---------------------------------------------------------------- explore
# dropins_with DAEMON_CAPS SNAPSHOT_CAPS: the packaging drop-ins with these
# bounding sets
dropins_with() {
	sed "s/^CapabilityBoundingSet=.*/CapabilityBoundingSet=$1/" "$D/hardening-daemon.conf" > /tmp/hd.conf
	sed "s/^CapabilityBoundingSet=.*/CapabilityBoundingSet=$2/" "$D/hardening-snapshot.conf" > /tmp/hs.conf
	install_dropins /tmp/hd.conf /tmp/hs.conf
	systemctl daemon-reload
}
try_daemon() { # WHAT
	local u=btrship@share.service
	systemctl stop $u 2> /dev/null
	systemctl reset-failed $u 2> /dev/null
	if ! timeout 120 systemctl start $u || ! sleep 2 || [ "$(prop $u ActiveState)" != active ]; then
		fail "$1: the daemon does not start"
		journal $u 8
		return
	fi
	write_files
	shipped "$1"
	systemctl stop $u
	journalctl -u $u --no-pager -o cat -p warning -n 5 2>&1 | indent
}
try_snapshot() { # WHAT
	local u=btrship-snapshot@share.service before after
	systemctl reset-failed $u 2> /dev/null
	before=$(btrship snapshots share 2> /dev/null | grep -c . || true)
	echo "snapshot $RANDOM" > /srv/share/snapshot-marker.txt
	if timeout 300 systemctl start $u; then
		after=$(btrship snapshots share 2> /dev/null | grep -c . || true)
		[ "$after" -gt "$before" ] && pass "$1: snapshot shipped" || fail "$1: the snapshot service succeeded but no new snapshot"
	else
		fail "$1: the snapshot service failed"
		journal $u 8
	fi
}
# explore_opts: the daemon with no hardening, with all of it, and without
# each option in turn: which options break it
explore_opts() {
	local line k f0 full_ok=1
	say "explore: the daemon without any hardening"
	printf '[Service]\n' > /tmp/none.conf
	install_dropins /tmp/none.conf /tmp/none.conf
	systemctl daemon-reload
	f0=$FAILS
	try_daemon "no hardening"
	[ $FAILS != "$f0" ] && echo "OPTS the daemon fails even without hardening"
	install_dropins "$D/hardening-daemon.conf" "$D/hardening-snapshot.conf"
	systemctl daemon-reload
	f0=$FAILS
	try_daemon "all hardening"
	[ $FAILS != "$f0" ] && full_ok=0
	echo "OPTS all of hardening-daemon.conf: $([ $full_ok = 1 ] && echo works || echo BREAKS)"
	FAILS=0
	[ $full_ok = 1 ] && return
	while IFS= read -r line; do
		case $line in '' | '#'* | '['*) continue ;; esac
		k=${line%%=*}
		grep -v "^$k=" "$D/hardening-daemon.conf" > /tmp/hd.conf
		install_dropins /tmp/hd.conf "$D/hardening-snapshot.conf"
		systemctl daemon-reload
		f0=$FAILS
		try_daemon "all but $k"
		[ $FAILS = "$f0" ] && echo "OPTS without $line the daemon works: $k breaks it" || echo "OPTS without $k still broken"
	done < "$D/hardening-daemon.conf"
	install_dropins "$D/hardening-daemon.conf" "$D/hardening-snapshot.conf"
	systemctl daemon-reload
	FAILS=0 # a search, not a test: its findings are the OPTS lines
}
explore_caps() {
	local full c keep trial f0 order
	full=$(conf_value "$D/hardening-daemon.conf" CapabilityBoundingSet)
	order="CAP_SETFCAP CAP_FSETID CAP_CHOWN CAP_FOWNER CAP_LEASE CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_SYS_ADMIN"
	say "explore: the daemon's bounding set, from $full"
	f0=$FAILS
	try_daemon "daemon with $full"
	[ $FAILS != "$f0" ] && { echo "CAPS the daemon fails with the full set"; return; }
	keep=$full
	for c in $order; do
		trial=$(echo " $keep " | sed "s/ $c / /; s/^ //; s/ $//")
		dropins_with "$trial" "$full"
		f0=$FAILS
		try_daemon "daemon without $c"
		if [ $FAILS = "$f0" ]; then echo "CAPS daemon: $c not needed"; keep=$trial; else echo "CAPS daemon: $c NEEDED"; fi
	done
	echo "CAPS daemon minimal: $keep"
	local dkeep=$keep
	say "explore: the snapshot service's bounding set"
	dropins_with "$dkeep" "$full"
	systemctl start btrship@share.service
	keep=$full
	for c in $order; do
		trial=$(echo " $keep " | sed "s/ $c / /; s/^ //; s/ $//")
		dropins_with "$dkeep" "$trial"
		f0=$FAILS
		try_snapshot "snapshot without $c"
		if [ $FAILS = "$f0" ]; then echo "CAPS snapshot: $c not needed"; keep=$trial; else echo "CAPS snapshot: $c NEEDED"; fi
	done
	echo "CAPS snapshot minimal: $keep"
	FAILS=0
}

# ---------------------------------------------------------------- main
say "test.sh mode=$MODE systemd $(systemctl --version | head -n 1 | cut -d' ' -f2) kernel $(uname -r) btrship $(btrship --version 2>&1)"
expect "systemd is PID 1" "$(cat /proc/1/comm)" systemd
state=$(systemctl is-system-running 2>&1)
say "system state: $state"
[ "$state" != running ] && systemctl --failed --no-pager 2>&1 | indent
if setup; then
	case $MODE in
	explore-caps) explore_caps ;;
	explore-opts) explore_opts ;;
	*)
		check_daemon
		check_snapshot
		check_wrong_key
		check_timer
		check_prune_timer
		check_mount_unit
		check_mount_order
		;;
	esac
else
	fail "setup failed"
fi
umount /srv 2> /dev/null
if [ $FAILS = 0 ]; then echo "RESULT PASS"; else echo "RESULT FAIL ($FAILS failed)"; fi
exit 0
