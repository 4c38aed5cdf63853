use tracing_subscriber::{EnvFilter, fmt};

/// Logs to stderr; `RUST_LOG` filters (default `info`), `KEYFLEET_LOG_FORMAT=json` for JSON lines.
pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if std::env::var("KEYFLEET_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
