use std::time::Duration;

use rand::Rng;

/// Delay before retry number `attempt` (1 = after the first failure): exponential backoff with
/// full jitter, uniformly random in `[0, min(cap, base * 2^(attempt-1))]`, but never sooner than the
/// server asked for with `Retry-After`.
pub fn backoff(
    attempt: u32,
    base: Duration,
    cap: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = base.saturating_mul(
        1u32.checked_shl(attempt.saturating_sub(1).min(30))
            .unwrap_or(u32::MAX),
    );
    let ceiling = exp.min(cap);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64));
    match retry_after {
        Some(floor) => jittered.max(floor),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_honours_retry_after() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for _ in 0..200 {
            assert!(backoff(1, base, cap, None) <= base);
            assert!(backoff(4, base, cap, None) <= Duration::from_millis(800));
            assert!(backoff(40, base, cap, None) <= cap);
            assert!(backoff(1, base, cap, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        }
        let spread: std::collections::HashSet<_> =
            (0..50).map(|_| backoff(6, base, cap, None)).collect();
        assert!(spread.len() > 10, "full jitter spreads retries out");
    }
}
