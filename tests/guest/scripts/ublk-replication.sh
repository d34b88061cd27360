# A replication pair in the guest: primary with --ublk, secondary on loopback. fio writes on
# /dev/ublkb0, the primary is killed with SIGKILL, the secondary fails over and its image
# is verified against the last checkpoint.
. /scripts/common.sh
lockstep secondary --disk /tmp/s.img --size 128M --listen 127.0.0.1:10900 --control /tmp/s.sock \
    --export 127.0.0.1:10810 > /tmp/secondary.log 2>&1 &
SEC=$!
lockstep primary --disk /tmp/p.img --size 128M --export 127.0.0.1:10809 --secondary 127.0.0.1:10900 \
    --control /tmp/p.sock --ack received --checkpoint-interval 100ms --ublk --ublk-id 0 > /tmp/primary.log 2>&1 &
PRI=$!
wait_for "[ -b /dev/ublkb0 ]" 60 || fail "/dev/ublkb0 did not appear"
fio --eta=never --name=load --filename=/dev/ublkb0 --rw=randwrite --bs=4k --size=64M --ioengine=io_uring \
    --iodepth=16 --direct=1 --time_based --runtime=30 --verify_state_save=0 --output=/tmp/fio-load.log &
FIO=$!
sleep 4
lockstep status --control /tmp/p.sock --json > /tmp/pstatus.json || fail "primary status"
SEEN=$(json_field /tmp/pstatus.json committed_epoch)
log "primary committed epoch $SEEN; killing the primary"
kill -9 $PRI
wait $PRI 2>/dev/null || true
lockstep failover --control /tmp/s.sock --to checkpoint --verify --json > /tmp/failover.json || fail "failover"
cat /tmp/failover.json
[ "$(json_field /tmp/failover.json verified)" = "true" ] || fail "the secondary image does not match the checkpoint"
GOT=$(json_field /tmp/failover.json committed_epoch)
[ "$GOT" -ge "$SEEN" ] || fail "failed over to epoch $GOT, the primary had committed $SEEN"
log "failover verified at epoch $GOT (primary had reported $SEEN)"
# The dead primary's device: delete it, so fio's waiting I/O fails and fio exits.
lockstep ublk-delete --id 0 || fail "ublk-delete"
wait $FIO || true
kill -TERM $SEC; wait $SEC || fail "secondary exit status"
