//! The `btrship` binary: sets up logging, parses the command line, runs the
//! command (`src/cli/`), and maps the outcome to one exit code and at most
//! one error line on stderr.

mod cli;

use std::io::Write;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BTRSHIP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err((code, line)) => {
            if let Some(line) = line {
                eprintln!("btrship: error: {line}");
            }
            std::process::exit(i32::from(code));
        }
    };
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
            eprintln!("btrship: error: {}{also}", one_line(&e));
            btrship::exit::code_of(&e)
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code));
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
