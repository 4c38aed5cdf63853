//! When a sweep is due. Pure: the scheduler loop claims what this says is due.

use chrono::{DateTime, TimeDelta, Utc};

/// A sweep's cron schedule (6 fields, with seconds: `0 */10 * * * *`).
#[derive(Debug, Clone)]
pub struct Schedule(cron::Schedule);

impl Schedule {
    pub fn parse(what: &str, expr: &str) -> anyhow::Result<Self> {
        expr.parse::<cron::Schedule>().map(Self).map_err(|e| {
            anyhow::anyhow!(
                "{what}: {expr:?} is not a cron schedule (sec min hour day month weekday): {e}"
            )
        })
    }

    /// The tick to fire now, if any: the latest scheduled time after `last` (the last tick fired,
    /// or when this scheduler started if none ever fired) that is not in the future. Ticks missed
    /// while no scheduler ran collapse into this one: caught up once, not once per missed tick.
    pub fn due(
        &self,
        last: Option<DateTime<Utc>>,
        started: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        // Looking back further than a day only costs iterations: the answer is the latest tick.
        let from = last.unwrap_or(started).max(now - TimeDelta::days(1));
        self.0.after(&from).take_while(|t| *t <= now).last()
    }

    /// The next scheduled time after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.after(&now).next()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, h, m, s).unwrap()
    }

    #[test]
    fn fires_each_tick_once_and_catches_up_missed_ticks_once() {
        let every_minute = Schedule::parse("--reconcile", "0 * * * * *").unwrap();
        let started = at(10, 0, 30);
        assert_eq!(
            every_minute.due(None, started, at(10, 0, 59)),
            None,
            "nothing before the first tick"
        );
        assert_eq!(
            every_minute.due(None, started, at(10, 1, 0)),
            Some(at(10, 1, 0))
        );
        assert_eq!(
            every_minute.due(Some(at(10, 1, 0)), started, at(10, 1, 40)),
            None,
            "already fired"
        );
        // Down from 10:01:30 to 10:07:10: one catch-up firing for 10:07, not six.
        assert_eq!(
            every_minute.due(Some(at(10, 1, 0)), started, at(10, 7, 10)),
            Some(at(10, 7, 0))
        );
        assert_eq!(every_minute.next_after(at(10, 7, 10)), Some(at(10, 8, 0)));
    }

    #[test]
    fn a_bad_expression_names_the_flag() {
        let err = Schedule::parse("--traffic", "every now and then")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--traffic"), "{err}");
    }
}
