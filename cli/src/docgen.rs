//! `lockstep completions SHELL` and `lockstep man`: shell completion scripts and manual pages
//! generated from the command line's own definition, so they never disagree with it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash (`lockstep completions bash > /etc/bash_completion.d/lockstep`), zsh
    /// (a file `_lockstep` in a directory of $fpath), fish (~/.config/fish/completions/lockstep.fish),
    /// elvish, powershell.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write lockstep.1 and one page per subcommand (lockstep-primary.1, …) into DIR instead
    /// of printing lockstep.1 (`lockstep man | man -l -`).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Print the completion script of `cmd` for `a.shell`.
pub fn completions(a: CompletionsArgs, mut cmd: clap::Command) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    clap_complete::generate(a.shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

/// Print `cmd`'s manual page, or write every page into `a.dir`.
pub fn man(a: ManArgs, cmd: clap::Command) -> anyhow::Result<()> {
    match a.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))?;
            println!("manual pages written to {}", dir.display());
        }
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("writing the manual page")?,
    }
    Ok(())
}
