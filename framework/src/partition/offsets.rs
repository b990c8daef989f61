//! When a partition's transactions also commit the consumer group's offsets
//! ([`AppConfig::group_offsets_interval`](crate::AppConfig::group_offsets_interval)).
//!
//! The snapshot topic says where a partition resumes; the group's offsets are for lag tools.
//! Sending them costs every transaction two requests and a marker on the group's one
//! `__consumer_offsets` partition, shared by all partitions of the app, so they go at most
//! once per interval, and once more when the partition goes quiet or is released.

use std::time::{Duration, Instant};

/// The group offsets' schedule of one partition.
#[derive(Debug)]
pub(super) struct GroupOffsets {
    interval: Duration,
    /// When a committed transaction last carried them.
    sent: Instant,
    /// When a transaction last committed without them (they trail the input since).
    behind_since: Option<Instant>,
    /// The next transaction carries them, whatever the interval says (catching up).
    force: bool,
}

impl GroupOffsets {
    /// The schedule of a partition that just started: its first transaction sends them.
    ///
    /// A `recovered` partition (one with committed transactions before, not a fresh start)
    /// counts as behind from the start: its last owner may have committed transactions
    /// without them and lost the partition before it caught up (killed, fenced), and with no
    /// more input the group would trail its snapshots for good (lag tools, and any finish
    /// line that watches the group, would never see the end). Quiet, it commits one small
    /// transaction to send them after one commit interval.
    pub(super) fn new(interval: Duration, recovered: bool) -> Self {
        let now = Instant::now();
        GroupOffsets {
            interval,
            sent: now,
            behind_since: recovered.then_some(now),
            force: true,
        }
    }

    /// Whether the transaction committing now sends them.
    pub(super) fn due(&self, now: Instant) -> bool {
        self.force || self.interval.is_zero() || now.duration_since(self.sent) >= self.interval
    }

    /// A transaction committed, with the offsets (`sent`) or without them.
    pub(super) fn committed(&mut self, sent: bool, now: Instant) {
        if sent {
            self.sent = now;
            self.behind_since = None;
            self.force = false;
        } else {
            self.behind_since = Some(now);
        }
    }

    /// When a partition with no transaction open should commit one only to send them: `quiet`
    /// after the last transaction that went without them. `None`: they are up to date.
    pub(super) fn catch_up_at(&self, quiet: Duration) -> Option<Instant> {
        self.behind_since.map(|since| since + quiet)
    }

    /// The next transaction sends them.
    pub(super) fn catch_up(&mut self) {
        self.force = true;
    }

    /// Whether a transaction committed without them since they were last sent.
    pub(super) fn behind(&self) -> bool {
        self.behind_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);
    const QUIET: Duration = Duration::from_millis(100);

    #[test]
    fn the_first_transaction_sends_them_then_once_per_interval() {
        let start = Instant::now();
        let mut offsets = GroupOffsets::new(SECOND, false);
        assert!(offsets.due(start));
        offsets.committed(true, start);
        let soon = start + Duration::from_millis(300);
        assert!(!offsets.due(soon));
        offsets.committed(false, soon);
        assert!(offsets.behind());
        assert!(offsets.due(start + SECOND));
        offsets.committed(true, start + SECOND);
        assert!(!offsets.behind());
        assert_eq!(offsets.catch_up_at(QUIET), None);
    }

    #[test]
    fn a_quiet_partition_catches_up_after_its_last_transaction() {
        let start = Instant::now();
        let mut offsets = GroupOffsets::new(SECOND, false);
        offsets.committed(true, start);
        let last = start + Duration::from_millis(400);
        offsets.committed(false, last);
        assert_eq!(offsets.catch_up_at(QUIET), Some(last + QUIET));
        offsets.catch_up();
        assert!(offsets.due(last + QUIET));
        offsets.committed(true, last + QUIET);
        assert!(!offsets.due(last + QUIET + QUIET));
        assert_eq!(offsets.catch_up_at(QUIET), None);
    }

    #[test]
    fn a_zero_interval_sends_them_with_every_transaction() {
        let start = Instant::now();
        let mut offsets = GroupOffsets::new(Duration::ZERO, false);
        offsets.committed(true, start);
        assert!(offsets.due(start));
    }

    #[test]
    fn a_recovered_partition_catches_up_once_quiet_and_a_fresh_one_does_not() {
        let fresh = GroupOffsets::new(SECOND, false);
        assert!(!fresh.behind());
        assert_eq!(fresh.catch_up_at(QUIET), None);
        let start = Instant::now();
        let mut recovered = GroupOffsets::new(SECOND, true);
        assert!(recovered.behind());
        let at = recovered.catch_up_at(QUIET).expect("a catch-up");
        assert!(at >= start + QUIET && at <= Instant::now() + QUIET);
        // Input first: its transaction sends them, and nothing is left to catch up.
        assert!(recovered.due(start));
        recovered.committed(true, start);
        assert!(!recovered.behind());
        assert_eq!(recovered.catch_up_at(QUIET), None);
    }
}
