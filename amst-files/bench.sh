#!/usr/bin/env bash
# Loopback speed of `amst send DIR` against rsync (a local daemon) and amst-tcp's blast, in
# the same minutes, source and destination on tmpfs. Interleaved rounds; prints every run
# and the medians.
#
#   cargo build --release -p amst-cli --bin amst
#   cargo build --release -p amst-tcp --example blast
#   amst-files/bench.sh [ROUNDS] [BIG_MIB] [SMALL_FILES] [STREAMS]
#
# Defaults: 3 rounds, a 4096 MiB file, 10000 files of 4 KiB, 8 streams. Needs about
# 2 × BIG_MIB of free tmpfs (/dev/shm). Traffic stays on 127.0.0.1.
set -euo pipefail

ROUNDS=${1:-3}
BIG_MIB=${2:-4096}
SMALL=${3:-10000}
STREAMS=${4:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AMST=$ROOT/target/release/amst
BLAST=$ROOT/target/release/examples/blast
[ -x "$AMST" ] && [ -x "$BLAST" ] || { echo "build amst and the blast example in release first" >&2; exit 2; }

T=$(mktemp -d /dev/shm/amst-files-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$T/src/big" "$T/src/small" "$T/dst"
head -c "$((BIG_MIB << 20))" /dev/urandom > "$T/src/big/image.bin"
python3 - "$T/src/small" "$SMALL" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
        f.write(os.urandom(4096))
EOF

echo "amst-files loopback bench: ${BIG_MIB} MiB file, ${SMALL} × 4 KiB, ${STREAMS} streams, ${ROUNDS} rounds, tmpfs $T"
printf 'key for the amst-files bench only 0123456789\n' > "$T/key"
chmod 600 "$T/key"

RPORT=$(free_port)
cat > "$T/rsyncd.conf" <<EOF
use chroot = no
uid = 0
gid = 0
address = 127.0.0.1
pid file = $T/rsyncd.pid
[dst]
path = $T/dst
read only = no
EOF
rsync --daemon --no-detach --config "$T/rsyncd.conf" --port "$RPORT" &
PIDS+=($!)

APORT=$(free_port)
"$AMST" serve --listen "127.0.0.1:$APORT" --output "$T/dst/amst" --psk-file "$T/key" \
    --mode datacenter --quiet > "$T/serve.log" 2>&1 &
PIDS+=($!)
sleep 1

now() { date +%s.%N; }
# Runs a command, prints and appends its seconds to results/NAME.
timed() {
    local name=$1; shift
    local t0 t1
    t0=$(now)
    "$@" > "$T/last.log" 2>&1 || { echo "$name failed:"; cat "$T/last.log"; exit 1; }
    t1=$(now)
    echo "$t1 - $t0" | bc -l >> "$T/$name.times"
    printf '  %-22s %8.2f s\n' "$name" "$(echo "$t1 - $t0" | bc -l)"
}
fresh() { rm -rf "$T/dst/amst" "$T/dst/rsync"; mkdir -p "$T/dst/amst" "$T/dst/rsync"; }
amst_send() {
    "$AMST" send "127.0.0.1:$APORT" --psk-file "$T/key" --mode datacenter --streams "$STREAMS" --quiet "$@"
}

for r in $(seq 1 "$ROUNDS"); do
    echo "round $r"
    fresh
    timed big_amst amst_send "$T/src/big"
    b3sum --no-names "$T/src/big/image.bin" > "$T/want"; b3sum --no-names "$T/dst/amst/big/image.bin" | cmp -s - "$T/want" \
        || { echo "big file differs after amst"; exit 1; }
    timed big_rsync_whole rsync -a --whole-file "$T/src/big" "rsync://127.0.0.1:$RPORT/dst/rsync/"
    fresh
    "$BLAST" "$STREAMS" "$BIG_MIB" > "$T/blast.log" 2>&1
    g=$(grep -o '[0-9.]* Gbit/s' "$T/blast.log" | head -1 | cut -d' ' -f1)
    secs=$(echo "$BIG_MIB * 1048576 * 8 / ($g * 1000000000)" | bc -l)
    echo "$secs" >> "$T/big_blast.times"
    printf '  %-22s %8.2f s (%s Gbit/s)\n' big_blast "$secs" "$g"
    timed small_amst amst_send "$T/src/small"
    timed small_rsync rsync -a "$T/src/small" "rsync://127.0.0.1:$RPORT/dst/rsync/"
    timed small_amst_identical amst_send "$T/src/small"
    timed small_rsync_identical rsync -a "$T/src/small" "rsync://127.0.0.1:$RPORT/dst/rsync/"
    diff -r "$T/src/small" "$T/dst/amst/small" > /dev/null || { echo "small tree differs after amst"; exit 1; }
done

median() { sort -g "$T/$1.times" | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "medians (s):"
for n in big_amst big_rsync_whole big_blast small_amst small_rsync small_amst_identical small_rsync_identical; do
    printf '  %-22s %8.2f\n' "$n" "$(median $n)"
done
ratio() { echo "scale=2; $(median "$1") / $(median "$2")" | bc -l; }
echo "ratios (higher is better for amst):"
echo "  big: rsync --whole-file / amst = $(ratio big_rsync_whole big_amst)  (goal >= 2)"
echo "  big: amst goodput / blast goodput = $(ratio big_blast big_amst)  (goal >= 0.8)"
echo "  small: rsync -a / amst = $(ratio small_rsync small_amst)  (goal >= 2)"
echo "  identical small tree: rsync -a / amst = $(ratio small_rsync_identical small_amst_identical)"
