# lockstep export --ublk: fio verify, randread, dd with fsync and a direct read-back.
. /scripts/common.sh
lockstep export --disk /tmp/disk.img --size 256M --ublk --ublk-id 0 --listen 127.0.0.1:10809 > /tmp/export.log 2>&1 &
EXPORT=$!
wait_for "[ -b /dev/ublkb0 ]" 30 || fail "/dev/ublkb0 did not appear"
log "device up"
fio --eta=never --name=verify --filename=/dev/ublkb0 --rw=randwrite --bs=4k --size=64M --ioengine=io_uring \
    --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output=/tmp/fio-verify.log || fail "fio randwrite+verify"
grep -q "err= 0" /tmp/fio-verify.log || fail "fio reported errors"
log "randwrite + crc32c verify ok"
fio --eta=never --name=read --filename=/dev/ublkb0 --rw=randread --bs=4k --size=64M --ioengine=io_uring \
    --iodepth=16 --direct=1 --time_based --runtime=3 --output=/tmp/fio-read.log || fail "fio randread"
grep -q "err= 0" /tmp/fio-read.log || fail "fio randread errors"
log "randread ok"
dd if=/dev/urandom of=/tmp/src bs=1M count=8 2>/dev/null
dd if=/tmp/src of=/dev/ublkb0 bs=1M seek=100 conv=fsync 2>/dev/null || fail "dd write"
dd if=/dev/ublkb0 of=/tmp/back bs=1M skip=100 count=8 iflag=direct 2>/dev/null || fail "dd read"
cmp /tmp/src /tmp/back || fail "read-back differs"
log "dd conv=fsync + iflag=direct read-back identical"
# A discard reaches the backend: the range reads as zeroes afterwards.
fio --eta=never --name=trim --filename=/dev/ublkb0 --rw=trim --bs=1M --offset=100M --size=8M --ioengine=psync \
    --output=/tmp/fio-trim.log || fail "fio trim"
dd if=/dev/ublkb0 of=/tmp/back bs=1M skip=100 count=8 iflag=direct 2>/dev/null
dd if=/dev/zero of=/tmp/zero bs=1M count=8 2>/dev/null
cmp /tmp/zero /tmp/back || fail "discarded range does not read as zeroes"
log "discard ok"
kill -TERM $EXPORT
wait $EXPORT || fail "export exit status"
[ ! -e /dev/ublkb0 ] || fail "/dev/ublkb0 still exists after a clean shutdown"
log "clean shutdown removed the device"
