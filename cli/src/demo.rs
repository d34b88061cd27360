//! `lockstep demo` (placeholder until written).
use clap::Args;

#[derive(Debug, Args)]
pub struct DemoArgs {}

pub fn run(_a: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
