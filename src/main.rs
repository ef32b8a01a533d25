//! The `btrship` binary: sets up logging, parses the command line, runs the
//! command (`src/cli/`), and maps the outcome to one exit code and at most
//! one error line on stderr.

mod cli;

use std::io::Write;

fn main() {
    bound_malloc();
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err((code, line)) => {
            if let Some(line) = line {
                eprintln!("btrship: error: {line}");
            }
            std::process::exit(i32::from(code));
        }
    };
    let structured = init_logging(cli.log_format());
    let result = cli::run(cli);
    let warnings = std::mem::take(&mut *cli::WARNINGS.lock().unwrap_or_else(|p| p.into_inner()));
    let code = match result {
        Ok(code) => {
            for w in &warnings {
                eprintln!("btrship: warning: {w}");
            }
            code
        }
        Err(e) => {
            // Still one line: the warnings that came before ride along.
            let also = match warnings.as_slice() {
                [] => String::new(),
                ws => format!(" (warnings before it: {})", ws.join("; ")),
            };
            let line = one_line(&e);
            let code = btrship::exit::code_of(&e);
            if structured {
                // The journal (or the JSON stream) gets the error as a
                // record with its kind; stderr still gets the one line.
                let kind = if btrship::exit::is_permanent(&e) {
                    "permanent"
                } else {
                    "failure"
                };
                tracing::error!(error_kind = kind, exit_code = code, "{line}");
            }
            eprintln!("btrship: error: {line}{also}");
            code
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code));
}

/// Log records go to journald (under systemd, or when asked), as JSON
/// lines, or as plain text on stderr; the level is BTRSHIP_LOG's (default
/// warn). A journald that cannot be reached falls back to text. Returns
/// whether records are structured (journald or JSON), not plain stderr.
fn init_logging(format: cli::LogFormat) -> bool {
    use tracing_subscriber::prelude::*;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("BTRSHIP_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    let journald = match format {
        cli::LogFormat::Journald => true,
        cli::LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
        _ => false,
    };
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Fields as journalctl queries them: SHARE=office.
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("btrship".into());
                tracing_subscriber::registry()
                    .with(layer.with_filter(filter()))
                    .init();
                return true;
            }
            Err(e) => {
                eprintln!("btrship: warning: journald not reachable ({e}); logging to stderr")
            }
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    if format == cli::LogFormat::Json {
        tracing_subscriber::registry()
            .with(fmt.json().with_filter(filter()))
            .init();
        true
    } else {
        tracing_subscriber::registry()
            .with(
                fmt.without_time()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(filter()),
            )
            .init();
        false
    }
}

/// The error chain on one line, skipping causes whose text the line
/// already holds (many errors print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

/// glibc's malloc raises its mmap threshold each time a big block is freed
/// (up to 32 MiB) and keeps one arena per busy thread: with packs of 16 MiB
/// and chunks of up to 4 MiB moving between the reading and sealing
/// threads, freed buffers then stay in the arenas and a first ship's peak
/// RSS doubles (313 MiB instead of 145 on the benchmark's share, wall time
/// unchanged). A fixed threshold hands every buffer over 4 MiB back to the
/// kernel when freed; two arenas are plenty for two kinds of worker.
fn bound_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; called first thing,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, (4 << 20) + 1);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
