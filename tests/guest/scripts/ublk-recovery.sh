# ublk user recovery: kill -9 the daemon under fio, restart it with the same device id,
# fio finishes without an I/O error and its verify passes.
. /scripts/common.sh
start() {
  lockstep export --disk /tmp/disk.img --size 256M --ublk --ublk-id 0 --listen 127.0.0.1:10809 >> /tmp/export.log 2>&1 &
  EXPORT=$!
}
start
wait_for "[ -b /dev/ublkb0 ]" 30 || fail "/dev/ublkb0 did not appear"
fio --eta=never --name=rec --filename=/dev/ublkb0 --rw=randwrite --bs=4k --size=48M --ioengine=io_uring \
    --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output=/tmp/fio-rec.log &
FIO=$!
sleep 2
kill -9 $EXPORT
wait $EXPORT 2>/dev/null || true
log "daemon killed with fio running"
sleep 1
kill -0 $FIO 2>/dev/null || fail "fio ended while the device had no daemon"
start
wait_for 'grep -q "recovering /dev/ublkb0" /tmp/export.log && [ "$(grep -c "serving /dev/ublkb0" /tmp/export.log)" -ge 2 ]' 30 || fail "recovery did not start"
log "daemon restarted, device recovered"
wait $FIO || fail "fio failed after recovery"
grep -q "err= 0" /tmp/fio-rec.log || fail "fio reported errors"
log "fio finished: no I/O error, verify passed"
kill -TERM $EXPORT; wait $EXPORT || fail "export exit status"
