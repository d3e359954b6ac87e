//! The `pubwarden` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pubwarden::config::{LogFormat, Overrides, Settings};
use pubwarden::policy::{self, Policy};

/// Exit status for unusable configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "pubwarden",
    version,
    about = "A transparent, pub/sub-aware RESP proxy for Redis"
)]
struct Cli {
    /// Settings file (YAML). Without one, built-in defaults are used.
    #[arg(short, long, env = "PUBWARDEN_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address clients connect to, e.g. 127.0.0.1:6380 (wins over the file).
    #[arg(long, env = "PUBWARDEN_LISTEN", global = true)]
    listen: Option<String>,
    /// Backing Redis as host:port, e.g. 127.0.0.1:6379 (wins over the file).
    #[arg(long, env = "PUBWARDEN_UPSTREAM", global = true)]
    upstream: Option<String>,
    /// Admin HTTP address for /healthz and /readyz (wins over the file).
    #[arg(long, env = "PUBWARDEN_ADMIN_LISTEN", global = true)]
    admin_listen: Option<String>,
    /// Policy file (users, channel ACL, rate limits); wins over `policy:` in the file.
    #[arg(long, env = "PUBWARDEN_POLICY", global = true)]
    policy: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Run,
    /// Validate a settings file (and its policy) and print what they mean.
    CheckConfig {
        /// The settings file to check.
        file: PathBuf,
    },
    /// Read a password on stdin and print the `sha256:` line for a policy file.
    HashPassword,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        admin_listen: cli.admin_listen.clone(),
        policy: cli.policy.clone(),
    };
    match cli.command {
        Some(Cmd::CheckConfig { file }) => check_config(&file, &overrides),
        Some(Cmd::HashPassword) => hash_password(),
        None | Some(Cmd::Run) => run(cli.config.as_deref(), &overrides),
    }
}

fn load(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Settings, ExitCode> {
    let loaded = match file {
        Some(path) => Settings::load(path, overrides),
        None => Settings::from_overrides(overrides),
    };
    loaded.map_err(|errors| {
        let source = file.map_or_else(|| "settings".to_string(), |p| p.display().to_string());
        eprintln!("pubwarden: {} problem(s) in {source}:", errors.0.len());
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn load_policy(settings: &Settings) -> Result<Option<Policy>, ExitCode> {
    let Some(path) = &settings.policy else {
        return Ok(None);
    };
    policy::schema::load(path).map(Some).map_err(|errors| {
        eprintln!(
            "pubwarden: {} problem(s) in policy {}:",
            errors.0.len(),
            path.display()
        );
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check_config(file: &std::path::Path, overrides: &Overrides) -> ExitCode {
    // A report piped into `head` ends quietly, as other Unix tools do, not
    // with a panic over a broken pipe. Only here: the server keeps SIGPIPE
    // ignored so a vanished client is an error on its socket.
    // SAFETY: restoring a default disposition, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let settings = match load(Some(file), overrides) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let policy = match load_policy(&settings) {
        Ok(p) => p,
        Err(code) => return code,
    };
    println!("# {}: valid. Effective settings:", file.display());
    print!("{settings}");
    match policy {
        Some(p) => {
            println!();
            println!("# What the policy allows:");
            for line in p
                .explain(&policy::commands::CommandTable::built_in())
                .lines()
            {
                println!("# {line}");
            }
        }
        None => println!("# No policy: pubwarden is transparent; AUTH and ACL are Redis's."),
    }
    ExitCode::SUCCESS
}

fn hash_password() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
        eprintln!("pubwarden: cannot read the password from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!(
            "pubwarden: empty password (type it on stdin, e.g. `printf %s 'secret' | pubwarden hash-password`)"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    println!(
        "{}",
        policy::format_hash(&policy::hash_password(password.as_bytes()))
    );
    ExitCode::SUCCESS
}

fn run(file: Option<&std::path::Path>, overrides: &Overrides) -> ExitCode {
    let settings = match load(file, overrides) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let policy = match load_policy(&settings) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Err(e) = init_logging(&settings) {
        eprintln!("pubwarden: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // On one CPU (a sidecar limited to one core, or a pinned process) a
    // single-threaded runtime avoids the work-stealing scheduler's overhead.
    let threads = match settings.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pubwarden: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(pubwarden::run(settings, policy, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pubwarden: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log.level).map_err(|e| {
        format!(
            "log.level `{}` is not a valid filter: {e}",
            settings.log.level
        )
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match settings.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C will stop pubwarden");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
