#!/usr/bin/env bash
# shellcheck disable=SC2015,SC2016,SC2317  # pass() never fails; $$ and $0 are for the inner sh; cleanup runs from trap
# Self-test of the socket load balancer programs (bpf/). Run as root:
#   bash bpf/selftest.sh
# Builds, mounts a PRIVATE bpffs, creates the maps (some with non-default sizes),
# loads + pins the programs with bpftool, attaches all 8 hooks to a PRIVATE cgroup
# v2 directory, starts two python backends on loopback, fills the maps for a few
# services and runs clients inside the cgroup. Everything is removed at exit.
# Only loopback traffic: every client socket is bound to device lo.
# Prints PASS/FAIL lines; exit status = number of failures (capped at 100).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
OBJ=$HERE/build/sock_lb.o
LBCTL="python3 $HERE/tools/lbctl.py"
CLIENT=$HERE/tools/lbtest_client.py
FAILS=0
ATTACHED=()
BACKEND_PIDS=()
T=""
CG=""
BPFFS=""
WATCHDOG=""

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
die() { fail "$*"; exit 1; }

cleanup() {
	set +e
	local a p
	for a in "${ATTACHED[@]}"; do
		# shellcheck disable=SC2086
		bpftool cgroup detach "$CG" $a
	done
	for p in "${BACKEND_PIDS[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${BACKEND_PIDS[@]}"; do wait "$p" 2>/dev/null; done
	if [ -n "$CG" ] && [ -d "$CG" ]; then
		# only clients this script moved there can be left (killed by timeout)
		while read -r p; do kill -9 "$p" 2>/dev/null; done <"$CG/cgroup.procs"
		for _ in 1 2 3 4 5 6 7 8 9 10; do rmdir "$CG" 2>/dev/null && break; sleep 0.1; done
		[ -d "$CG" ] && echo "WARN: could not remove $CG"
	fi
	if [ -n "$BPFFS" ] && mountpoint -q "$BPFFS"; then umount "$BPFFS"; fi
	[ -n "$T" ] && rm -rf "$T"
	[ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
	echo "cleanup done"
}
trap cleanup EXIT
trap 'echo "FAIL: interrupted (time limit?)"; exit 1' INT TERM

[ "$(id -u)" = 0 ] || die "must run as root"
for t in bpftool clang python3 curl findmnt; do
	command -v $t >/dev/null || die "$t not installed"
done

# Hard time bound: the whole test stops itself after 55 s.
(sleep 55 && kill -TERM $$) 2>/dev/null &
WATCHDOG=$!

# no "." anywhere in the path: libbpf turns "." into "_" in pin paths
T=$(mktemp -d /tmp/netstack-bpf-selftest-XXXXXX)
BPFFS=$T/bpffs
MAPS=$BPFFS/maps
PROGS=$BPFFS/progs

# ---- build ------------------------------------------------------------------------
if make -s -C "$HERE" >"$T/make.log" 2>&1; then
	pass "build: make -C bpf -> build/sock_lb.o ($(clang --version | head -1))"
else
	cat "$T/make.log"
	die "build"
fi

# ---- layouts: header py: formats vs BTF of the object ---------------------------------
bpftool btf dump file "$OBJ" >"$T/btf.txt" || die "bpftool btf dump"
bad=""
while read -r name _fmt size; do
	btf=$(sed -n "s/^\[[0-9]*\] STRUCT '$name' size=\([0-9]*\) .*/\1/p" "$T/btf.txt")
	case $name in lb_backend_key | lb_maglev_key | lb_maglev_val | lb_config_key) continue ;; esac
	[ "$btf" = "$size" ] || bad="$bad $name(py=$size,btf=${btf:-missing})"
done < <($LBCTL layout)
[ -z "$bad" ] && pass "layout: every py: struct format in lib/lb_structs.h matches the BTF size" \
	|| fail "layout mismatch:$bad"

# ---- private bpffs, probe load (verifier + map specs) ---------------------------------
mkdir -p "$BPFFS"
mount -t bpf bpf "$BPFFS" || die "mount private bpffs"
if bpftool prog loadall "$OBJ" "$BPFFS/probe" pinmaps "$BPFFS/probemaps" 2>"$T/load.log"; then
	pass "verifier: all $(find "$BPFFS/probe" -type f | wc -l) programs load on kernel $(uname -r) (bpftool loadall ... pinmaps)"
else
	tail -40 "$T/load.log"
	die "probe load"
fi
bad=""
while read -r name typ k v n flags; do
	got=$(bpftool -j map show pinned "$BPFFS/probemaps/$name" | python3 -c \
		'import json,sys; m=json.load(sys.stdin); print(m["type"], m["bytes_key"], m["bytes_value"], m["max_entries"], m["flags"])')
	[ "$got" = "$typ $k $v $n $flags" ] || bad="$bad $name(object: $got; lbctl: $typ $k $v $n $flags)"
done < <($LBCTL maps)
[ -z "$bad" ] && pass "maps: object's map specs match tools/lbctl.py" || fail "map spec mismatch:$bad"
rm -rf "$BPFFS/probe" "$BPFFS/probemaps"

# ---- loader path: create maps with chosen sizes, then load programs against them ------
M=251 # Maglev table size per half (prime)
mkdir -p "$MAPS"
maparg=()
while read -r name typ k v n flags; do
	bpftool map create "$MAPS/$name" type "$typ" key "$k" value "$v" entries "$n" \
		name "$name" flags "$flags" || die "map create $name"
	maparg+=(map name "$name" pinned "$MAPS/$name")
done < <($LBCTL maps --size kln_lb4_svc=1024 --size kln_lb6_svc=1024 --size kln_lb4_revnat=4096 \
	--size kln_lb6_revnat=4096 --size kln_lb_affinity=1024 --size kln_lb_maglev=$((16 * 2 * M)))
bpftool prog loadall "$OBJ" "$PROGS" "${maparg[@]}" 2>"$T/load.log" || { tail -40 "$T/load.log"; die "load against pre-created maps"; }
svc_id=$(bpftool -j map show pinned "$MAPS/kln_lb4_svc" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["id"], m["max_entries"])')
prog_maps=$(bpftool -j prog show pinned "$PROGS/kln_connect4" | python3 -c 'import json,sys; print(" ".join(map(str, json.load(sys.stdin)["map_ids"])))')
case " $prog_maps " in
*" ${svc_id% *} "*) [ "${svc_id#* }" = 1024 ] && pass "load-time sizes: connect4 uses the loader's kln_lb4_svc (max_entries 1024, default 65536)" \
	|| fail "kln_lb4_svc max_entries ${svc_id#* }" ;;
*) fail "connect4 does not use the pre-created kln_lb4_svc (maps $prog_maps, svc $svc_id)" ;;
esac

# ---- private cgroup, attach the 8 hooks -------------------------------------------
CG2=$(findmnt -n -o TARGET -t cgroup2 | head -1)
[ -n "$CG2" ] || die "no cgroup2 mount"
CG=$CG2/netstack-bpf-selftest.$$
mkdir "$CG" || die "mkdir $CG"
for h in connect4:kln_connect4 sendmsg4:kln_sendmsg4 recvmsg4:kln_recvmsg4 getpeername4:kln_getpeer4 \
	connect6:kln_connect6 sendmsg6:kln_sendmsg6 recvmsg6:kln_recvmsg6 getpeername6:kln_getpeer6; do
	a="${h%%:*} pinned $PROGS/${h#*:}"
	# shellcheck disable=SC2086
	bpftool cgroup attach "$CG" $a || die "attach $a"
	ATTACHED+=("$a")
done
n=$(bpftool cgroup show "$CG" | grep -c kln_)
[ "$n" = 8 ] && pass "attach: 8 hooks on private cgroup $CG" || fail "attach: $n hooks listed"

# ---- backends on loopback --------------------------------------------------------
for b in b1 b2; do
	python3 "$HERE/tools/lbtest_backend.py" $b "$T/$b.ports" &
	BACKEND_PIDS+=($!)
done
for _ in $(seq 50); do [ -s "$T/b1.ports" ] && [ -s "$T/b2.ports" ] && break; sleep 0.1; done
read -r B1T B1U <"$T/b1.ports" || die "backend b1 did not start"
read -r B2T B2U <"$T/b2.ports" || die "backend b2 did not start"
echo "backends: b1 tcp $B1T udp $B1U, b2 tcp $B2T udp $B2U (127.0.0.1 and ::1)"

# ---- services -----------------------------------------------------------------------
# ids: 1 VIP:80/tcp  2 VIP:53/udp  3 empty .11:80/tcp  9 empty .11:53/udp
#      4 [fd00:96::10]:80/tcp  5 [fd00:96::10]:53/udp  6 maglev .12:53/udp
#      7 weighted .13:80/tcp (weights 0,1)  8 affinity .14:80/tcp
spec() {
	cat <<EOF
{"config": {"maglev_m": $M},
 "backends4": {"1": "127.0.0.1:$B1T", "2": "127.0.0.1:$B2T", "3": "127.0.0.1:$B1U", "4": "127.0.0.1:$B2U"},
 "backends6": {"1": "[::1]:$B1T", "2": "[::1]:$B2T", "3": "[::1]:$B1U", "4": "[::1]:$B2U"},
 "services": [
  {"id": 1, "vip": "10.96.0.10", "port": 80, "proto": "tcp", "backends": [1, 2]},
  {"id": 2, "vip": "10.96.0.10", "port": 53, "proto": "udp", "backends": [3, 4]},
  {"id": 3, "vip": "10.96.0.11", "port": 80, "proto": "tcp", "backends": []},
  {"id": 9, "vip": "10.96.0.11", "port": 53, "proto": "udp", "backends": []},
  {"id": 4, "vip": "fd00:96::10", "port": 80, "proto": "tcp", "backends": [1, 2]},
  {"id": 5, "vip": "fd00:96::10", "port": 53, "proto": "udp", "backends": [3, 4]},
  {"id": 6, "vip": "10.96.0.12", "port": 53, "proto": "udp", "backends": [3, 4], "alg": "maglev", "rev": 1},
  {"id": 7, "vip": "10.96.0.13", "port": 80, "proto": "tcp", "backends": [1, 2], "alg": "weighted", "weights": [0, 1]},
  {"id": 8, "vip": "10.96.0.14", "port": 80, "proto": "tcp", "backends": [1, 2], "affinity": 60}
 ]}
EOF
}
spec >"$T/spec.json"
$LBCTL batch "$MAPS" "$T/spec.json" >"$T/batch.txt" || die "lbctl batch"
if bpftool batch file "$T/batch.txt" >"$T/batch.log" 2>&1; then
	pass "maps filled: $(wc -l <"$T/batch.txt") bpftool batch updates (backends, slots, maglev, master last)"
else
	tail -5 "$T/batch.log"
	die "bpftool batch"
fi

# ---- clients inside the cgroup --------------------------------------------------------
incg() { timeout 10 sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG" "$@"; }
check() { # EXPECT=ERE check DESCRIPTION CLIENT-ARGS...; leaves the client's output in $out
	local desc=$1 rc
	shift
	out=$(incg python3 "$CLIENT" "$@" 2>&1)
	rc=$?
	if [ $rc = 0 ] && { [ -z "${EXPECT:-}" ] || echo "$out" | grep -Eq "$EXPECT"; }; then
		pass "$desc: $out"
	else
		fail "$desc: $out (rc $rc)"
	fi
}

out=$(incg curl -sS --max-time 3 --interface lo http://10.96.0.10/ 2>&1)
case $out in "backend b1" | "backend b2") pass "TCP curl http://10.96.0.10/ -> $out" ;; *) fail "TCP curl VIP: $out" ;; esac
out=$(incg curl -sS --max-time 3 --interface lo -g 'http://[fd00:96::10]/' 2>&1)
case $out in "backend b1" | "backend b2") pass "TCP6 curl http://[fd00:96::10]/ -> $out" ;; *) fail "TCP6 curl VIP: $out" ;; esac

EXPECT='b1.*b2|b2.*b1' check "TCP random over 16 connects, getpeername = VIP" tcp 10.96.0.10 80 16
EXPECT="backends=b[12]$" check "TCP6 getpeername = VIP" tcp fd00:96::10 80
EXPECT="backends=b[12]$" check "TCP v4-mapped (AF_INET6 socket) getpeername = ::ffff:VIP" tcp ::ffff:10.96.0.10 80
EXPECT='b1.*b2|b2.*b1' check "UDP unconnected sendto/recvfrom: source = VIP, random per datagram" udp 10.96.0.10 53 16
EXPECT="" check "UDP6 unconnected recvfrom source = VIP" udp fd00:96::10 53 4
EXPECT="" check "UDP v4-mapped unconnected recvfrom source = ::ffff:VIP" udp ::ffff:10.96.0.10 53 4
EXPECT="" check "UDP connected: getpeername and recvfrom = VIP" udpc 10.96.0.10 53
EXPECT="" check "UDP6 connected: getpeername = VIP" udpc fd00:96::10 53
EXPECT="" check "UDP v4-mapped connected: getpeername = ::ffff:VIP" udpc ::ffff:10.96.0.10 53
EXPECT="" check "0 backends: TCP connect refused at once" refuse 10.96.0.11 80
EXPECT="" check "0 backends: UDP sendto refused at once" refuse-udp 10.96.0.11 53
EXPECT="" check "0 backends: v4-mapped TCP connect refused at once" refuse ::ffff:10.96.0.11 80
t0=$(date +%s%N)
incg curl -sS --max-time 5 --interface lo http://10.96.0.11/ >/dev/null 2>&1
rc=$? ms=$((($(date +%s%N) - t0) / 1000000))
[ $rc = 7 ] && [ $ms -lt 2000 ] && pass "0 backends: curl fails at once (exit 7 after $ms ms)" || fail "0 backends: curl rc $rc after $ms ms"
EXPECT="peer=127.0.0.1:$B1T backends=b1$" check "non-VIP destination untouched" tcp 127.0.0.1 "$B1T"
EXPECT='backends=(b2,){7}b2$' check "weighted 0:1 -> b2 only" tcp 10.96.0.13 80 8
EXPECT='backends=(b1,){11}b1$|backends=(b2,){11}b2$' check "session affinity (netns, 60 s) -> one backend for 12 connects" tcp 10.96.0.14 80 12
EXPECT='backends=(b1,){7}b1$|backends=(b2,){7}b2$' check "Maglev: one socket's 8 datagrams -> one backend" udp 10.96.0.12 53 8

# Maglev commit: write the other table half (rev 2 -> half 0) holding only the
# backend the check above did NOT get, then the master (commit point), then the
# stale slot 2 is deleted. A new socket must now land on that backend.
case $out in *b1) other=b2 other_id=4 ;; *) other=b1 other_id=3 ;; esac
cat >"$T/spec2.json" <<EOF
{"config": {"maglev_m": $M}, "services": [
 {"id": 6, "vip": "10.96.0.12", "port": 53, "proto": "udp", "backends": [$other_id], "alg": "maglev", "rev": 2, "prev_count": 2}]}
EOF
$LBCTL batch "$MAPS" "$T/spec2.json" >"$T/batch2.txt" && bpftool batch file "$T/batch2.txt" >/dev/null 2>&1 \
	|| fail "maglev update batch"
EXPECT="backends=($other,){7}$other\$" check "Maglev update (new half, master rev 2 last, slot 2 deleted) -> $other only" udp 10.96.0.12 53 8

n=$(bpftool -j map dump pinned "$MAPS/kln_lb4_revnat" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$n" -gt 0 ] && pass "reverse map kln_lb4_revnat has $n socket entries" || fail "reverse map empty"

echo "---"
if [ $FAILS = 0 ]; then echo "selftest: all checks passed"; else echo "selftest: $FAILS check(s) FAILED"; fi
[ $FAILS -gt 100 ] && FAILS=100
exit $FAILS
