//! Progress of long recovery steps, in the log: a recovery that takes more than a few seconds
//! (a large snapshot to fetch, a long replay) says every few seconds how far it got, how fast it
//! goes and how long it still needs, instead of going silent until it is done.

use std::time::{Duration, Instant};

use crate::metrics::PartitionMetrics;

/// No progress line before this: short recoveries log only their outcome.
const FIRST_REPORT_AFTER: Duration = Duration::from_secs(3);
/// Between two progress lines.
const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How often the recovery gauges of the metrics endpoint are brought up to date.
const GAUGE_INTERVAL: Duration = Duration::from_millis(500);

/// One recovery step of one partition, `total` units long.
pub(crate) struct Progress<'a> {
    step: &'static str,
    unit: &'static str,
    topic: &'a str,
    partition: i32,
    total: u64,
    started: Instant,
    next_report: Instant,
    updates: u32,
    /// Updates between two looks at the clock.
    clock_every: u32,
    /// Gauges to keep current (the metrics endpoint), and whether this is the fetch step.
    gauges: Option<(&'a PartitionMetrics, bool)>,
    next_gauge_update: Instant,
}

impl<'a> Progress<'a> {
    pub(crate) fn new(
        step: &'static str,
        unit: &'static str,
        topic: &'a str,
        partition: i32,
        total: u64,
    ) -> Self {
        let started = Instant::now();
        Progress {
            step,
            unit,
            topic,
            partition,
            total,
            started,
            next_report: started + FIRST_REPORT_AFTER,
            updates: 0,
            clock_every: 1,
            gauges: None,
            next_gauge_update: started,
        }
    }

    /// Looks at the clock only every `updates` updates (for steps with many tiny units).
    pub(crate) fn clock_every(mut self, updates: u32) -> Self {
        self.clock_every = updates.max(1);
        self
    }

    /// `done` of `total` units are done; logs a line when one is due.
    /// Also keeps `metrics`' recovery gauges current (at most every [`GAUGE_INTERVAL`]).
    /// `fetching`: this is the full snapshot fetch (chunks), else the replay (offsets).
    pub(crate) fn publish_to(
        mut self,
        metrics: Option<&'a PartitionMetrics>,
        fetching: bool,
    ) -> Self {
        self.gauges = metrics.map(|m| (m, fetching));
        self
    }

    pub(crate) fn update(&mut self, done: u64) {
        self.updates = self.updates.wrapping_add(1);
        if self.updates % self.clock_every != 0 {
            return;
        }
        let now = Instant::now();
        if let Some((metrics, fetching)) = self.gauges {
            if now >= self.next_gauge_update {
                self.next_gauge_update = now + GAUGE_INTERVAL;
                let estimate = Estimate::new(done, self.total, now - self.started);
                metrics.recovery_progress(fetching, done, self.total, estimate.eta_s.unwrap_or(0));
            }
        }
        if now < self.next_report {
            return;
        }
        self.next_report = now + REPORT_INTERVAL;
        let estimate = Estimate::new(done, self.total, now - self.started);
        tracing::info!(
            topic = self.topic,
            partition = self.partition,
            step = self.step,
            done,
            total = self.total,
            unit = self.unit,
            percent = estimate.percent,
            per_second = estimate.per_second,
            eta_s = estimate.eta_s,
            "recovery in progress"
        );
    }
}

/// How far, how fast, how long still.
#[derive(Debug, PartialEq)]
struct Estimate {
    percent: u64,
    per_second: u64,
    /// Unknown (None) until something is done.
    eta_s: Option<u64>,
}

impl Estimate {
    fn new(done: u64, total: u64, elapsed: Duration) -> Self {
        let done = done.min(total);
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        let seconds = elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            done as f64 / seconds
        } else {
            0.0
        };
        let eta_s = (rate > 0.0).then(|| ((total - done) as f64 / rate).ceil() as u64);
        Estimate {
            percent,
            per_second: rate as u64,
            eta_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_the_rate_so_far() {
        let e = Estimate::new(250, 1000, Duration::from_secs(5));
        assert_eq!(
            e,
            Estimate {
                percent: 25,
                per_second: 50,
                eta_s: Some(15)
            }
        );
    }

    #[test]
    fn nothing_done_yet_has_no_eta() {
        let e = Estimate::new(0, 1000, Duration::from_secs(5));
        assert_eq!((e.percent, e.per_second, e.eta_s), (0, 0, None));
    }

    #[test]
    fn an_empty_or_overrun_total_is_complete() {
        assert_eq!(Estimate::new(0, 0, Duration::from_secs(1)).percent, 100);
        let over = Estimate::new(1200, 1000, Duration::from_secs(10));
        assert_eq!((over.percent, over.eta_s), (100, Some(0)));
    }
}
