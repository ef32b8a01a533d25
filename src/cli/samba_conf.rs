//! `btrship samba-conf NAME`: the smb.conf lines that show `btrship
//! mount`'s moments in Windows' Previous Versions tab.

use super::{print_json, App};
use anyhow::Result;
use btrship::exit::{self, UserError};
use std::path::PathBuf;

/// Print the smb.conf lines for Windows Previous Versions of a share.
#[derive(clap::Args)]
#[command(
    long_about = "Print the lines to add to the share's section of smb.conf so that Explorer's \
Previous Versions tab lists every moment `btrship mount NAME` serves (Samba's vfs_shadow_copy2, \
reading the @GMT- directories of the mount). The share's own path comes from its btrship config; \
the mount directory is /run/btrship/NAME unless --dir says otherwise. Keep any other vfs modules \
the share uses in the `vfs objects` line, with shadow_copy2 after acl_xattr.",
    after_help = "Examples:
  btrship samba-conf office
  btrship samba-conf office --dir /srv/history/office
  btrship samba-conf office --json | jq -r '.lines[]'"
)]
pub struct Args {
    /// The share.
    name: String,
    /// Where `btrship mount` mounts the moments [default: /run/btrship/NAME].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The share's path as smb.conf names it [default: the btrship config's].
    #[arg(long, value_name = "PATH")]
    path: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// The option lines, in smb.conf syntax.
pub fn lines(share_path: &str, dir: &str) -> Vec<String> {
    vec![
        "vfs objects = acl_xattr shadow_copy2".into(),
        "store dos attributes = yes".into(),
        format!("shadow:mountpoint = {share_path}"),
        format!("shadow:basedir = {share_path}"),
        format!("shadow:snapdir = {dir}"),
        "shadow:format = @GMT-%Y.%m.%d-%H.%M.%S".into(),
        "shadow:localtime = no".into(),
        "shadow:sort = desc".into(),
    ]
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    btrship::config::validate_name(&args.name)?;
    let share_path = match args.path {
        Some(p) => p,
        None => {
            app.load_config(&args.name)
                .map_err(|e| {
                    UserError::new(
                        exit::NOT_FOUND,
                        format!("{e:#} (on a machine without the share's config, give --path)"),
                    )
                })?
                .path
        }
    };
    let dir = args
        .dir
        .unwrap_or_else(|| PathBuf::from("/run/btrship").join(&args.name));
    let (Some(share), Some(dirs)) = (share_path.to_str(), dir.to_str()) else {
        return Err(UserError::new(exit::USAGE, "smb.conf needs UTF-8 paths").into());
    };
    for (what, p) in [("share path", share), ("mount directory", dirs)] {
        if !p.starts_with('/') || p.contains(['\n', '\r']) {
            return Err(UserError::new(
                exit::USAGE,
                format!("the {what} {p:?} must be absolute and on one line"),
            )
            .into());
        }
    }
    let lines = lines(share, dirs);
    if args.json {
        print_json(&serde_json::json!({
            "version": 1, "share": args.name, "path": share, "dir": dirs, "lines": lines
        }))?;
        return Ok(exit::OK);
    }
    println!(
        "# btrship: Windows Previous Versions for share {} (every moment `btrship mount {}` serves).",
        args.name, args.name
    );
    println!("# Add to the share's section of smb.conf (path = {share}), then:");
    println!(
        "#   systemctl enable --now btrship-mount@{}.service && smbcontrol smbd reload-config",
        args.name
    );
    for l in &lines {
        println!("   {l}");
    }
    Ok(exit::OK)
}
