#!/usr/bin/env bash
# shellcheck disable=SC2015,SC2016,SC2317  # pass() never fails; $$ and $0 are for the inner sh; cleanup runs from trap
# Self-test of the eBPF objects (bpf/), through the collection's own loader and map writer
# (plugins/module_utils/loader.py and lb/, driven by tools/lbctl.py). Run as root:
#   bash bpf/selftest.sh
# Builds every object that has a manifest, runs each through the verifier and holds it against its
# manifest, mounts a PRIVATE bpffs, loads the socket LB and a second object (tests/peek.c) that
# shares a map with it into a PRIVATE cgroup v2 directory, starts two python backends on loopback,
# programs services with the writer the modules use, runs clients inside the cgroup, and migrates
# a shared map to a (test-only) new layout version. Everything is removed at exit.
# Only loopback traffic: every client socket is bound to device lo.
# Prints PASS/FAIL lines; exit status = number of failures (capped at 100).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=$HERE/build
LBCTL="python3 $HERE/tools/lbctl.py"
CLIENT=$HERE/tools/lbtest_client.py
FAILS=0
BACKEND_PIDS=()
T=""
CG=""
BPFFS=""
ROOT=""
WATCHDOG=""

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
die() { fail "$*"; exit 1; }

cleanup() {
	set +e
	local p
	[ -n "$ROOT" ] && [ -d "$ROOT" ] && $LBCTL unload "$ROOT" >/dev/null
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

# Hard time bound: the whole test stops itself after 90 s.
(sleep 90 && kill -TERM $$) 2>/dev/null &
WATCHDOG=$!

# no "." anywhere in the path: bpffs refuses dots in names
T=$(mktemp -d /tmp/netstack-bpf-selftest-XXXXXX)
BPFFS=$T/bpffs
ROOT=$BPFFS/kldload-netstack
G=$ROOT/globals
py() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# ---- build ------------------------------------------------------------------------
if make -s -C "$HERE" >"$T/make.log" 2>&1; then
	pass "build: make -C bpf -> $(cd "$BUILD" && find . -name '*.o' | sort | tr '\n' ' ')($(clang --version | head -1))"
else
	cat "$T/make.log"
	die "build"
fi

# ---- layouts: header py: formats vs BTF of the object ---------------------------------
bpftool btf dump file "$BUILD/sock_lb.o" >"$T/btf.txt" || die "bpftool btf dump"
bad=""
while read -r name _fmt size; do
	btf=$(sed -n "s/^\[[0-9]*\] STRUCT '$name' size=\([0-9]*\) .*/\1/p" "$T/btf.txt")
	case $name in lb_backend_key | lb_maglev_key | lb_maglev_val | lb_config_key) continue ;; esac
	[ "$btf" = "$size" ] || bad="$bad $name(py=$size,btf=${btf:-missing})"
done < <($LBCTL layout)
[ -z "$bad" ] && pass "layout: every py: struct format in lib/lb_structs.h matches the BTF size" \
	|| fail "layout mismatch:$bad"

# ---- every object: verifier + manifest (what `make -C bpf verify` runs) --------------------
while read -r line; do
	case $line in PASS:*) echo "$line" ;; *) echo "FAIL: $line"; FAILS=$((FAILS + 1)) ;; esac
done < <($LBCTL verify "$BUILD" "$BUILD/tests" 2>&1)

# ---- private bpffs and cgroup; both objects through the loader ---------------------------
mkdir -p "$BPFFS"
mount -t bpf bpf "$BPFFS" || die "mount private bpffs"
CG2=$(findmnt -n -o TARGET -t cgroup2 | head -1)
[ -n "$CG2" ] || die "no cgroup2 mount"
CG=$CG2/netstack-bpf-selftest-$$
mkdir "$CG" || die "mkdir $CG"
M=251 # Maglev table size per half (prime)
spec() { # spec SOCK_LB_OBJECT PEEK_OBJECT
	cat <<EOF
{"objects": [
 {"name": "sock_lb", "object": "$1", "targets": {"cgroup": "$CG"},
  "maps": {"kln_lb4_svc": 1024, "kln_lb6_svc": 1024, "kln_lb4_revnat": 4096, "kln_lb6_revnat": 4096,
           "kln_lb_affinity": 1024, "kln_lb_maglev": $((16 * 2 * M))}},
 {"name": "peek", "object": "$2", "targets": {"cgroup": "$CG"}}]}
EOF
}
spec "$BUILD/sock_lb.o" "$BUILD/tests/peek.o" >"$T/load.json"
if $LBCTL load "$ROOT" "$T/load.json" >"$T/load.out" 2>&1; then
	pass "loader: sock_lb and peek loaded and attached to $CG from their manifests ($(py 'len(d["actions"])' <"$T/load.out") actions)"
else
	cat "$T/load.out"
	die "loader: load"
fi
$LBCTL report "$ROOT" >"$T/report.json"
n=$(py 'len(d["objects"]["sock_lb"]["attachments"]) + len(d["objects"]["peek"]["attachments"])' <"$T/report.json")
[ "$n" = 9 ] && pass "attach: 8 socket LB hooks + 1 peek hook, every one a pinned BPF link" || fail "attach: $n links"
n=$(bpftool cgroup show "$CG" | grep -c kln_)
[ "$n" = 9 ] && pass "bpftool cgroup show lists the 9 programs on the private cgroup" || fail "bpftool cgroup show: $n programs"
shared=$(py '" ".join(str(d["globals"]["kln_lb_config_v1"]["id"] in d["objects"][o]["programs"][p]["map_ids"]) for o, p in (("sock_lb", "kln_connect4"), ("peek", "kln_peek_egress")))' <"$T/report.json")
[ "$shared" = "True True" ] && pass "shared map: globals/kln_lb_config_v1 is the one map of sock_lb's kln_connect4 and of peek's program" \
	|| fail "shared map not shared: $shared"
size=$(py 'd["globals"]["kln_lb4_svc_v1"]["max_entries"]' <"$T/report.json")
[ "$size" = 1024 ] && pass "load-time sizes: globals/kln_lb4_svc_v1 has 1024 entries (default 65536)" || fail "kln_lb4_svc_v1 size $size"
[ -e "$ROOT/sock_lb/maps/kln_lb4_revnat" ] && [ ! -e "$G/kln_lb4_revnat_v1" ] \
	&& pass "private map: kln_lb4_revnat stays with its object (sock_lb/maps/)" || fail "kln_lb4_revnat not private"
again=$($LBCTL load "$ROOT" "$T/load.json" 2>&1 | py 'd["changed"]')
[ "$again" = False ] && pass "loader: the same load again changes nothing" || fail "loader: second load changed: $again"

# ---- backends on loopback --------------------------------------------------------
for b in b1 b2; do
	python3 "$HERE/tools/lbtest_backend.py" $b "$T/$b.ports" &
	BACKEND_PIDS+=($!)
done
for _ in $(seq 50); do [ -s "$T/b1.ports" ] && [ -s "$T/b2.ports" ] && break; sleep 0.1; done
read -r B1T B1U <"$T/b1.ports" || die "backend b1 did not start"
read -r B2T B2U <"$T/b2.ports" || die "backend b2 did not start"
echo "backends: b1 tcp $B1T udp $B1U, b2 tcp $B2T udp $B2U (127.0.0.1 and ::1)"

# ---- services, written by the lb_services module's writer (lb.sync) ----------------------
services() { # services MAGLEV_BACKENDS_JSON
	cat <<EOF
[{"name": "web", "vip": "10.96.0.10", "port": 80, "backends": [{"ip": "127.0.0.1", "port": $B1T}, {"ip": "127.0.0.1", "port": $B2T}]},
 {"name": "dns", "vip": "10.96.0.10", "port": 53, "protocol": "udp", "backends": [{"ip": "127.0.0.1", "port": $B1U}, {"ip": "127.0.0.1", "port": $B2U}]},
 {"name": "empty", "vip": "10.96.0.11", "port": 80},
 {"name": "empty-udp", "vip": "10.96.0.11", "port": 53, "protocol": "udp"},
 {"name": "web6", "vip": "fd00:96::10", "port": 80, "backends": [{"ip": "::1", "port": $B1T}, {"ip": "::1", "port": $B2T}]},
 {"name": "dns6", "vip": "fd00:96::10", "port": 53, "protocol": "udp", "backends": [{"ip": "::1", "port": $B1U}, {"ip": "::1", "port": $B2U}]},
 {"name": "maglev", "vip": "10.96.0.12", "port": 53, "protocol": "udp", "algorithm": "maglev", "backends": $1},
 {"name": "weighted", "vip": "10.96.0.13", "port": 80, "backends": [{"ip": "127.0.0.1", "port": $B1T, "weight": 1}, {"ip": "127.0.0.1", "port": $B2T, "weight": 60000}]},
 {"name": "affinity", "vip": "10.96.0.14", "port": 80, "affinity_timeout": 60, "backends": [{"ip": "127.0.0.1", "port": $B1T}, {"ip": "127.0.0.1", "port": $B2T}]}]
EOF
}
services "[{\"ip\": \"127.0.0.1\", \"port\": $B1U}, {\"ip\": \"127.0.0.1\", \"port\": $B2U}]" >"$T/services.json"
if out=$($LBCTL sync "$G" "$T/services.json" $M 2>&1); then
	pass "maps filled by lb.sync, the writer of the lb_services module: $out"
else
	die "lb.sync: $out"
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
# weights 1:60000 - b1 gets one connect in 60,001; 16 connects with more than one b1 would be a bug
EXPECT='^peer=\S+ backends=(b2,)*(b1,)?(b2,)*b2$' check "weighted 1:60000 -> (almost) only b2" tcp 10.96.0.13 80 16
EXPECT='backends=(b1,){11}b1$|backends=(b2,){11}b2$' check "session affinity (netns, 60 s) -> one backend for 12 connects" tcp 10.96.0.14 80 12
EXPECT='backends=(b1,){7}b1$|backends=(b2,){7}b2$' check "Maglev: one socket's 8 datagrams -> one backend" udp 10.96.0.12 53 8

# Maglev commit: the writer fills the other table half (rev+1) holding only the backend the check
# above did NOT get, then the master (commit point), then deletes the stale slot. A new socket must
# now land on that backend.
case $out in *b1) other=b2 port=$B2U ;; *) other=b1 port=$B1U ;; esac
services "[{\"ip\": \"127.0.0.1\", \"port\": $port}]" >"$T/services2.json"
$LBCTL sync "$G" "$T/services2.json" $M >/dev/null || fail "Maglev update: lb.sync"
EXPECT="backends=($other,){7}$other\$" check "Maglev update (new half, master last, stale slot deleted) -> $other only" udp 10.96.0.12 53 8

n=$(bpftool -j map dump pinned "$ROOT/sock_lb/maps/kln_lb4_revnat" | py 'len(d)')
[ "$n" -gt 0 ] && pass "reverse map sock_lb/maps/kln_lb4_revnat has $n socket entries" || fail "reverse map empty"

# ---- the second object read the shared map the socket LB's writer wrote --------------------
seen=$(bpftool -j map dump pinned "$ROOT/peek/maps/kln_peek_seen" | py '" ".join(str(e["formatted"]["value"] if "formatted" in e else int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little")) for e in d)')
case $seen in "$M "[1-9]*) pass "peek saw maglev_m=$M in the shared kln_lb_config (packets counted: ${seen#* })" ;;
*) fail "peek did not see the shared config: $seen" ;; esac

# ---- shared maps: a different layout is refused, a declared migration is carried out ----------
mkdir -p "$T/v2"
cp "$BUILD/tests/peek.o" "$T/v2/peek.o"
sed 's/"key_size": 4, "value_size": 8, "max_entries": 1, "flags": 0, "shared": true/"key_size": 4, "value_size": 16, "max_entries": 1, "flags": 0, "shared": true/' \
	"$BUILD/tests/peek.manifest.json" >"$T/v2/peek.manifest.json"
printf '{"objects": [{"name": "peek", "object": "%s", "targets": {"cgroup": "%s"}}]}\n' "$T/v2/peek.o" "$CG" >"$T/bad.json"
out=$($LBCTL load "$ROOT" "$T/bad.json" 2>&1)
case $out in *"kln_lb_config_v1 is pinned as array key 4 value 8 flags 0 but object peek declares layout version 1 as array key 4 value 16"*)
	pass "a shared map of another layout is refused, naming both: ${out#lbctl: }" ;;
*) fail "layout mismatch not refused: $out" ;; esac
# a test-only layout bump: kln_lb_config version 2 (same bytes), migrated by 'copy'
for o in sock_lb peek; do
	src=$BUILD/$o; [ $o = peek ] && src=$BUILD/tests/$o
	cp "$src.o" "$T/v2/$o.o"
	python3 - "$src.manifest.json" "$T/v2/$o.manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["maps"]["kln_lb_config"].update(version=2, migrations={"1": "copy"})
json.dump(m, open(sys.argv[2], "w"))
PY
done
printf '{"objects": [{"name": "peek", "object": "%s", "targets": {"cgroup": "%s"}}]}\n' "$T/v2/peek.o" "$CG" >"$T/peek2.json"
out=$($LBCTL load "$ROOT" "$T/peek2.json" 2>&1)
case $out in *"not part of this run, use it"*) pass "migrating a shared map another loaded object uses is refused: ${out#lbctl: }" ;;
*) fail "migration with a user left behind not refused: $out" ;; esac
spec "$T/v2/sock_lb.o" "$T/v2/peek.o" >"$T/load2.json"
if out=$($LBCTL load "$ROOT" "$T/load2.json" 2>&1) && echo "$out" | grep -q "migrate shared map kln_lb_config_v1 -> kln_lb_config_v2 (copy)"; then
	pass "layout version 2: kln_lb_config migrated (copy), both objects reloaded against it"
else
	fail "migration: $out"
fi
m2=$(bpftool -j map dump pinned "$G/kln_lb_config_v2" | py 'd[0]["formatted"]["value"]["maglev_m"] if "formatted" in d[0] else int.from_bytes(bytes(int(b, 16) for b in d[0]["value"][:4]), "little")')
[ "$m2" = $M ] && [ ! -e "$G/kln_lb_config_v1" ] && pass "the migrated map holds maglev_m=$m2, version 1 is unpinned" \
	|| fail "after migration: maglev_m=$m2, v1 present: $([ -e "$G/kln_lb_config_v1" ] && echo yes || echo no)"
EXPECT='b1.*b2|b2.*b1' check "after the migration the socket LB still answers" tcp 10.96.0.10 80 16

echo "---"
if [ $FAILS = 0 ]; then echo "selftest: all checks passed"; else echo "selftest: $FAILS check(s) FAILED"; fi
[ $FAILS -gt 100 ] && FAILS=100
exit $FAILS
