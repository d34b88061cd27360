//! `--metrics`: both nodes of a pair serve Prometheus metrics; a scrape with curl is parsed
//! by the Prometheus client library's own text-format parser (Debian's
//! python3-prometheus-client) and its numbers checked against what the pair did.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use lockstep_tests::control::{checkpoint, T};
use lockstep_tests::pair::{ack_flags, Pair};
use lockstep_tests::{free_port, owned, require, run, run_ok, scratch};

/// The samples of an exposition as `name{k="v",…}` → value, through prometheus_client's
/// parser (which rejects malformed text).
fn parse(text: &str, dir: &std::path::Path) -> HashMap<String, f64> {
    let file = dir.join("scrape.txt");
    std::fs::write(&file, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
kinds = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    kinds[fam.name] = fam.type
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps({"samples": out, "types": kinds}))
"#;
    let out = run(
        "/usr/bin/python3",
        &["-c", script, file.to_str().unwrap()],
        T,
    );
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (name, kind) in v["types"].as_object().unwrap() {
        assert!(
            ["gauge", "counter", "histogram"].contains(&kind.as_str().unwrap()),
            "{name}: {kind}"
        );
    }
    let mut m: HashMap<String, f64> = v["samples"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    // The family types, as `type:NAME` → 1 (histogram 2, counter 3), for the assertions.
    for (name, kind) in v["types"].as_object().unwrap() {
        let k = match kind.as_str().unwrap() {
            "histogram" => 2.0,
            "counter" => 3.0,
            _ => 1.0,
        };
        m.insert(format!("type:{name}"), k);
    }
    m
}

fn scrape(addr: &str) -> String {
    run_ok(
        "curl",
        &[
            "-sSf",
            "--max-time",
            "10",
            &format!("http://{addr}/metrics"),
        ],
        T,
    )
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no {key} in the scrape: {:?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn both_nodes_serve_metrics_that_a_prometheus_parser_reads() {
    require("curl", "curl");
    require("qemu-io", "qemu-utils");
    let out = run(
        "/usr/bin/python3",
        &["-c", "import prometheus_client.parser"],
        T,
    );
    assert!(
        out.status.success(),
        "the Prometheus text-format parser is missing: apt-get install python3-prometheus-client"
    );
    let dir = scratch();
    let p_metrics = format!("127.0.0.1:{}", free_port());
    let s_metrics = format!("127.0.0.1:{}", free_port());
    let mut pflags = ack_flags("received", "100ms");
    pflags.extend(owned(&["--metrics", &p_metrics]));
    let (mut pair, _) = Pair::start_full(
        dir.path(),
        "32M",
        &pflags,
        &owned(&["--metrics", &s_metrics]),
        false,
    );
    pair.wait_synced(Duration::from_secs(30), 1);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 0 4M", &pair.uri()],
        T,
    );
    checkpoint(&pair.p_sock).expect("checkpoint");
    checkpoint(&pair.p_sock).expect("checkpoint");

    let p = parse(&scrape(&p_metrics), dir.path());
    assert_eq!(get(&p, r#"lockstep_mode{mode="replicating"}"#), 1.0);
    assert_eq!(get(&p, r#"lockstep_mode{mode="paused"}"#), 0.0);
    assert_eq!(get(&p, "lockstep_protected"), 1.0);
    assert_eq!(
        get(&p, "type:lockstep_checkpoint_pause_seconds"),
        2.0,
        "a histogram"
    );
    assert_eq!(get(&p, "type:lockstep_forwarded_bytes"), 3.0, "a counter");
    assert!(get(&p, "lockstep_checkpoints_total") >= 2.0);
    let n = get(&p, "lockstep_checkpoint_pause_seconds_count");
    assert!(n >= 2.0);
    assert_eq!(
        get(&p, r#"lockstep_checkpoint_pause_seconds_bucket{le="+Inf"}"#),
        n
    );
    assert!(get(&p, r#"lockstep_checkpoint_pause_seconds_bucket{le="10"}"#) <= n);
    assert!(get(&p, "lockstep_checkpoint_duration_seconds_sum") > 0.0);
    assert!(get(&p, "lockstep_forwarded_bytes_total") >= f64::from(4u32 << 20));
    assert_eq!(get(&p, "lockstep_dirty_blocks"), 0.0);
    assert_eq!(get(&p, "lockstep_resync_active"), 0.0);
    assert!(get(&p, "lockstep_resyncs_completed_total") >= 1.0);
    assert!(
        p.contains_key(r#"lockstep_info{role="primary",version="0.1.0"}"#),
        "{p:?}"
    );

    let s = parse(&scrape(&s_metrics), dir.path());
    assert_eq!(get(&s, r#"lockstep_mode{mode="replicating"}"#), 1.0);
    assert_eq!(get(&s, "lockstep_consistent"), 1.0);
    assert!(get(&s, "lockstep_received_bytes_total") >= f64::from(4u32 << 20));
    assert!(get(&s, "lockstep_committed_epoch") >= 2.0);

    // Anything but GET /metrics is refused.
    let out = run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{p_metrics}/x"),
        ],
        T,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let logs = pair.logs();
    pair.stop_and_cmp("after the scrapes", &logs);
}
