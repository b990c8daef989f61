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
    /// Offsets just recovered are in the group already, or come with the first transaction.
    pub(super) fn new(interval: Duration) -> Self {
        GroupOffsets {
            interval,
            sent: Instant::now(),
            behind_since: None,
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
        let mut offsets = GroupOffsets::new(SECOND);
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
        let mut offsets = GroupOffsets::new(SECOND);
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
        let mut offsets = GroupOffsets::new(Duration::ZERO);
        offsets.committed(true, start);
        assert!(offsets.due(start));
    }
}
