//! `btrship completions SHELL` and the hidden `btrship manpages --out DIR`:
//! shell completions (clap_complete) and man pages (clap_mangen) generated
//! from the same definitions as the parser, so they cannot drift from it.
//! The hidden `btrship units --out DIR` writes the systemd template units
//! (src/systemd.rs, the renderer `init` uses). `scripts/package` puts all
//! three into the Debian package.

use super::{App, Cli};
use anyhow::{Context, Result};
use btrship::exit;
use clap::CommandFactory;
use std::path::PathBuf;

/// Print a shell completion script (bash, zsh, fish, elvish, powershell).
#[derive(clap::Args)]
#[command(after_help = "Examples:
  btrship completions bash > /etc/bash_completion.d/btrship
  btrship completions zsh > /usr/local/share/zsh/site-functions/_btrship
  btrship completions fish > ~/.config/fish/completions/btrship.fish")]
pub struct CompletionArgs {
    shell: clap_complete::Shell,
}

/// Write the man pages: btrship.1 and btrship-COMMAND.1 for each command.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Write the systemd template units (what the Debian package installs in
/// /lib/systemd/system), running `--exe` with the global `--config-dir`
/// and `--state-dir`.
#[derive(clap::Args)]
pub struct UnitArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The binary the units run [default: this one].
    #[arg(long, value_name = "PATH")]
    exe: Option<PathBuf>,
}

pub fn completions(args: CompletionArgs) -> Result<u8> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "btrship", &mut std::io::stdout());
    Ok(exit::OK)
}

pub fn manpages(args: ManArgs) -> Result<u8> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let cmd = Cli::command();
    let write = |name: &str, cmd: clap::Command| -> Result<()> {
        let path = args.out.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("btrship-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("btrship", cmd)?;
    Ok(exit::OK)
}

pub fn units(app: &App, args: UnitArgs) -> Result<u8> {
    let exe = match args.exe {
        Some(e) => e,
        None => std::env::current_exe().context("cannot find the btrship binary")?,
    };
    let units = btrship::systemd::Units {
        exe: std::path::absolute(exe)?,
        config_dir: std::path::absolute(&app.config_dir)?,
        state_dir: std::path::absolute(&app.state_dir)?,
    };
    for p in units.write(&args.out)? {
        println!("{}", p.display());
    }
    Ok(exit::OK)
}
