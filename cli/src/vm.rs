//! `lockstep vm-resume`: continue a protected VM on the node that took over, from the device
//! state of the committed checkpoint.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use blkrep::epoch::QmpGuest;
use clap::Args;
use serde_json::{json, Value};

#[derive(Debug, Args)]
pub struct VmResumeArgs {
    /// The QMP socket of a QEMU started with the protected VM's command line against this
    /// node's disk and memory region, plus `-incoming defer`.
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    /// The device state the failover put in place (the secondary's --device-state).
    #[arg(long, value_name = "PATH")]
    device_state: PathBuf,
    /// How long loading the state may take.
    #[arg(long, default_value = "60s", value_parser = crate::units::parse_duration)]
    timeout: Duration,
}

pub fn resume(a: VmResumeArgs) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&a.device_state)
        .with_context(|| format!("device state {}", a.device_state.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let q = QmpGuest::new(&a.qmp, Duration::from_secs(10));
        let st = q
            .execute("query-status", None)
            .await
            .map_err(|e| anyhow!(e))?;
        if st["status"] != "inmigrate" {
            bail!(
                "the VM at {} is {} (start QEMU with -incoming defer)",
                a.qmp.display(),
                st["status"]
            );
        }
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        q.execute("migrate-set-capabilities", Some(caps))
            .await
            .map_err(|e| anyhow!(e))?;
        let start = Instant::now();
        let uri = format!("file:{}", a.device_state.display());
        // QEMU 9.1+ can stay up when the state does not load (and say why); QEMU may still
        // exit, older ones always do: a lost QMP connection from here on means "did not load".
        let gone = |e: String| {
            anyhow!(
                "QEMU went away while loading {}: the device state did not load ({e}; QEMU's own log says why)",
                a.device_state.display()
            )
        };
        let keep_up = json!({ "uri": uri, "exit-on-error": false });
        match q.execute("migrate-incoming", Some(keep_up)).await {
            Ok(_) => {}
            Err(e) if e.contains("exit-on-error") => {
                q.execute("migrate-incoming", Some(json!({ "uri": uri })))
                    .await
                    .map_err(gone)?;
            }
            Err(e) if e.contains("QMP error") => bail!(e),
            Err(e) => return Err(gone(e)),
        }
        loop {
            let m = q.execute("query-migrate", None).await.map_err(gone)?;
            match m["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    let why = m
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    bail!(
                        "the device state {} did not load: {why}",
                        a.device_state.display()
                    );
                }
                _ if start.elapsed() > a.timeout => {
                    bail!("the device state did not load within {:?}", a.timeout)
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        let loaded = start.elapsed();
        q.execute("cont", None).await.map_err(|e| anyhow!(e))?;
        println!(
            "VM resumed from {} ({} bytes of device state, loaded in {loaded:?})",
            a.device_state.display(),
            meta.len()
        );
        Ok(())
    })
}
