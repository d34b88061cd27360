# Informational: the same fio job on /dev/ublkb0 (lockstep), on the kernel nbd client to
# lockstep, and on a loop device over the same file. Prints IOPS per path.
. /scripts/common.sh
JOB="--rw=randwrite --bs=4k --size=64M --ioengine=io_uring --iodepth=16 --direct=1 --time_based --runtime=5 --verify_state_save=0"
iops() { sed -n 's/.*IOPS=\([0-9.k]*\).*/\1/p' "$1" | head -1; }
lockstep export --disk /tmp/disk.img --size 256M --ublk --ublk-id 0 --listen 127.0.0.1:10809 > /tmp/export.log 2>&1 &
EXPORT=$!
wait_for "[ -b /dev/ublkb0 ]" 30 || fail "/dev/ublkb0 did not appear"
fio --eta=never --name=ublk --filename=/dev/ublkb0 $JOB --output=/tmp/p-ublk.log || fail "fio ublk"
nbd-client 127.0.0.1 10809 /dev/nbd0 -N disk -b 4096 > /tmp/nbd.log 2>&1 || fail "nbd-client"
fio --eta=never --name=nbd --filename=/dev/nbd0 $JOB --output=/tmp/p-nbd.log || fail "fio nbd"
nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true
kill -TERM $EXPORT; wait $EXPORT || true
LOOP=$(losetup -f)
losetup "$LOOP" /tmp/disk.img || fail "losetup"
fio --eta=never --name=loop --filename="$LOOP" $JOB --output=/tmp/p-loop.log || fail "fio loop"
losetup -d "$LOOP"
echo "PERF ublk=$(iops /tmp/p-ublk.log) nbd=$(iops /tmp/p-nbd.log) loop=$(iops /tmp/p-loop.log)"
