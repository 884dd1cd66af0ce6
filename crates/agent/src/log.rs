//! The agent's log: `tracing` events as one line each on standard error, with a UTC timestamp,
//! the level and the target — `2026-12-01T19:30:00.123Z  INFO weft_agent::agent: leased 10.244.3.0/24`
//! — filtered like `RUST_LOG`: a default level (`info`) and per-target levels, e.g.
//! `RUST_LOG=warn,weft_agent=debug`. (A small subscriber of its own: the agent needs nothing
//! more, and it keeps the build lean.)

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, LevelFilter, Metadata, Subscriber};

/// `RUST_LOG`-style directives: a default level and `target=level` pairs (the longest matching
/// target prefix wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
}

fn level(text: &str) -> Option<LevelFilter> {
    Some(match text.trim().to_ascii_lowercase().as_str() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

impl Filter {
    /// Parses `RUST_LOG`; what it cannot read is reported and ignored.
    pub fn parse(text: &str) -> (Filter, Vec<String>) {
        // As RUST_LOG reads: with only `target=level` directives, every other target is off;
        // nothing at all means `info`.
        let bare = text.split(',').map(str::trim).any(|d| !d.is_empty() && !d.contains('='));
        let named = text.split(',').any(|d| d.contains('='));
        let default = if named && !bare { LevelFilter::OFF } else { LevelFilter::INFO };
        let mut filter = Filter { default, targets: Vec::new() };
        let mut bad = Vec::new();
        for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match directive.split_once('=') {
                None => match level(directive) {
                    Some(l) => filter.default = l,
                    // A bare target means everything of it.
                    None if !directive.contains(char::is_whitespace) => {
                        filter.targets.push((directive.to_string(), LevelFilter::TRACE))
                    }
                    None => bad.push(directive.to_string()),
                },
                Some((target, l)) => match level(l) {
                    Some(l) => filter.targets.push((target.trim().to_string(), l)),
                    None => bad.push(directive.to_string()),
                },
            }
        }
        (filter, bad)
    }

    /// Whether an event of `level` from `target` is written.
    pub fn allows(&self, target: &str, level: &Level) -> bool {
        let limit = self
            .targets
            .iter()
            .filter(|(t, _)| target == t || target.starts_with(&format!("{t}::")))
            .max_by_key(|(t, _)| t.len())
            .map_or(self.default, |(_, l)| *l);
        limit >= *level
    }

    fn max(&self) -> LevelFilter {
        self.targets.iter().map(|(_, l)| *l).fold(self.default, std::cmp::max)
    }
}

/// `2026-12-01T19:30:00.123Z`.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        d.subsec_millis()
    )
}

/// Collects an event's message and fields as `message key=value ...`.
#[derive(Default)]
struct Line(String, String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value}", field.name());
        }
    }
}

struct Stderr {
    filter: Filter,
    next_span: AtomicU64,
}

impl Subscriber for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.allows(metadata.target(), metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.max())
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed).max(1))
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line::default();
        event.record(&mut line);
        let meta = event.metadata();
        let text =
            format!("{} {:>5} {}: {}{}\n", timestamp(SystemTime::now()), meta.level(), meta.target(), line.0, line.1);
        let _ = std::io::stderr().write_all(text.as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// Installs the log for this process, filtered by `RUST_LOG` (default `info`).
pub fn init() {
    let (filter, bad) = Filter::parse(&std::env::var("RUST_LOG").unwrap_or_default());
    let installed = tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(Stderr {
        filter,
        next_span: AtomicU64::new(1),
    }));
    if installed.is_ok() && !bad.is_empty() {
        tracing::warn!("RUST_LOG: ignoring {}", bad.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_like_rust_log() {
        let (f, bad) = Filter::parse("warn,weft_agent=debug,weft_agent::reconcile=off,nonsense=loud");
        assert_eq!(bad, ["nonsense=loud"]);
        assert!(f.allows("weft_agent::agent", &Level::DEBUG));
        assert!(!f.allows("weft_agent::agent", &Level::TRACE));
        assert!(!f.allows("weft_agent::reconcile", &Level::ERROR));
        assert!(!f.allows("weft_lease::etcd", &Level::INFO));
        assert!(f.allows("weft_lease::etcd", &Level::WARN));
        assert!(!f.allows("weft_agentx", &Level::DEBUG), "a prefix of a name is not its target");
        let (f, _) = Filter::parse("");
        assert!(f.allows("anything", &Level::INFO) && !f.allows("anything", &Level::DEBUG));
        let (f, _) = Filter::parse("weft_lease=warn");
        assert!(f.allows("weft_lease::etcd", &Level::WARN) && !f.allows("weft_agent::agent", &Level::ERROR));
    }

    #[test]
    fn timestamps_in_utc() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_796_153_400_123);
        assert_eq!(timestamp(t), "2026-12-01T19:30:00.123Z");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
