use std::time::Duration;

use keyfleet_core::ServerKind;
use rand::Rng;

/// How one fake server behaves apart from injected faults.
#[derive(Clone, Debug)]
pub struct FakeServerConfig {
    pub kind: ServerKind,
    /// Applied to every request before it is handled, inside the in-flight window.
    pub latency: Latency,
    /// Extra latency per existing user on a create, like Outline rewriting its whole config. When
    /// non-zero, creates also queue behind each other, as on the real server.
    pub create_latency_per_key: Duration,
    /// What a V2Ray create with an email that already exists does.
    pub duplicate_policy: DuplicatePolicy,
    /// Reported by Outline's `GET /server`. Below 1.8.0 (unless `outline_key_ids` says otherwise),
    /// `PUT /access-keys/{id}` and `GET /access-keys/{id}` answer 405 like an old server.
    pub outline_version: String,
    /// Whether Outline has `PUT`/`GET /access-keys/{id}`; `None`: as `outline_version` says. A
    /// server built from source reports `"dev"` whatever it has.
    pub outline_key_ids: Option<bool>,
    /// Seed of the RNG behind latency and probabilistic faults.
    pub seed: u64,
}

impl FakeServerConfig {
    pub fn new(kind: ServerKind) -> Self {
        Self {
            kind,
            latency: Latency::Zero,
            create_latency_per_key: Duration::ZERO,
            duplicate_policy: DuplicatePolicy::Conflict409,
            outline_version: "1.9.0".to_owned(),
            outline_key_ids: None,
            seed: 0,
        }
    }

    pub fn v2ray() -> Self {
        Self::new(ServerKind::V2ray)
    }

    pub fn outline() -> Self {
        Self::new(ServerKind::Outline)
    }

    pub fn with_latency(self, latency: Latency) -> Self {
        Self { latency, ..self }
    }

    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    pub fn with_duplicate_policy(self, duplicate_policy: DuplicatePolicy) -> Self {
        Self {
            duplicate_policy,
            ..self
        }
    }

    pub fn with_create_latency_per_key(self, create_latency_per_key: Duration) -> Self {
        Self {
            create_latency_per_key,
            ..self
        }
    }

    pub fn with_outline_version(self, version: impl Into<String>) -> Self {
        Self {
            outline_version: version.into(),
            ..self
        }
    }

    /// Says whether Outline has `PUT`/`GET /access-keys/{id}`, whatever the version reads.
    pub fn with_outline_key_ids(self, key_ids: bool) -> Self {
        Self {
            outline_key_ids: Some(key_ids),
            ..self
        }
    }

    /// Whether Outline has `PUT`/`GET /access-keys/{id}`: as set, else by the version (>= 1.8.0).
    /// A version that does not parse counts as new.
    pub(crate) fn outline_has_key_ids(&self) -> bool {
        if let Some(key_ids) = self.outline_key_ids {
            return key_ids;
        }
        let mut parts = self
            .outline_version
            .trim()
            .trim_start_matches('v')
            .split('.');
        let mut next = || parts.next().map(|p| p.parse::<u64>());
        match (next(), next()) {
            (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (1, 8),
            (Some(Ok(major)), None) => major >= 2,
            _ => true,
        }
    }
}

/// What a V2Ray panel does on a create with an email that already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplicatePolicy {
    /// `409 {"detail": ...}`.
    Conflict409,
    /// Stores a second user with the same email, as some panels do.
    SilentDuplicate,
}

/// Latency distribution of a server.
#[derive(Clone, Debug)]
pub enum Latency {
    Zero,
    Fixed(Duration),
    Uniform {
        min: Duration,
        max: Duration,
    },
    /// Lognormal fitted to the median and the 99th percentile, capped at `max`.
    HeavyTail {
        median: Duration,
        p99: Duration,
        max: Duration,
    },
}

/// The standard normal quantile at 0.99.
const Z_99: f64 = 2.326_347_874_040_841;

impl Latency {
    pub(crate) fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        match *self {
            Self::Zero => Duration::ZERO,
            Self::Fixed(d) => d,
            Self::Uniform { min, max } => {
                let (lo, hi) = if min <= max { (min, max) } else { (max, min) };
                let nanos = rng.random_range(as_nanos(lo)..=as_nanos(hi));
                Duration::from_nanos(nanos)
            }
            Self::HeavyTail { median, p99, max } => {
                if median.is_zero() {
                    return Duration::ZERO;
                }
                let mu = median.as_secs_f64().ln();
                let sigma = ((p99.as_secs_f64().ln() - mu) / Z_99).max(0.0);
                let secs = (mu + sigma * standard_normal(rng)).exp();
                Duration::try_from_secs_f64(secs).unwrap_or(max).min(max)
            }
        }
    }
}

fn as_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Box-Muller transform.
fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // 1 - u keeps u1 in (0, 1], so ln(u1) is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn quantile(sorted: &[Duration], q: f64) -> f64 {
        sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64()
    }

    #[test]
    fn heavy_tail_matches_median_and_p99_and_respects_the_cap() {
        let latency = Latency::HeavyTail {
            median: Duration::from_millis(20),
            p99: Duration::from_millis(200),
            max: Duration::from_millis(400),
        };
        let mut rng = StdRng::seed_from_u64(7);
        let mut samples: Vec<Duration> = (0..50_000).map(|_| latency.sample(&mut rng)).collect();
        samples.sort();
        let median = quantile(&samples, 0.5);
        let p99 = quantile(&samples, 0.99);
        assert!((median - 0.020).abs() < 0.002, "median {median}");
        assert!((p99 - 0.200).abs() < 0.025, "p99 {p99}");
        assert!(samples.last().unwrap() <= &Duration::from_millis(400));
    }

    #[test]
    fn uniform_stays_in_range_and_is_deterministic_per_seed() {
        let latency = Latency::Uniform {
            min: Duration::from_millis(5),
            max: Duration::from_millis(10),
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..100)
                .map(|_| latency.sample(&mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert!(
            a.iter()
                .all(|d| (Duration::from_millis(5)..=Duration::from_millis(10)).contains(d))
        );
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
    }

    #[test]
    fn outline_version_gate() {
        let with = |v: &str| {
            FakeServerConfig::outline()
                .with_outline_version(v)
                .outline_has_key_ids()
        };
        assert!(with("1.9.0"));
        assert!(with("1.8.0"));
        assert!(with("2"));
        assert!(!with("1.7.2"));
        assert!(!with("1"));
        assert!(with("garbage"));
        let dev = FakeServerConfig::outline().with_outline_version("dev");
        assert!(dev.clone().with_outline_key_ids(true).outline_has_key_ids());
        assert!(!dev.with_outline_key_ids(false).outline_has_key_ids());
    }
}
