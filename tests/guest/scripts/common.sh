# Shared helpers for the guest scripts (sourced; busybox sh).
ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up
log() { echo "[guest $(cut -d' ' -f1 /proc/uptime)s] $*"; }
# wait_for TEST SECONDS: poll a shell test until true or fail.
wait_for() {
  n=0
  while ! eval "$1"; do
    n=$((n + 1))
    if [ "$n" -gt $(($2 * 10)) ]; then log "timed out waiting for: $1"; return 1; fi
    sleep 0.1
  done
}
# json_field FILE KEY: a top-level number/bool/string from lockstep's --json output.
json_field() { tr -d '\n ' < "$1" | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p"; }
fail() { log "FAIL: $*"; for f in /tmp/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done; exit 1; }
