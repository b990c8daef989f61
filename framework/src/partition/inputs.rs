//! The inputs of a co-partitioned unit (DESIGN §8): records wait per input until they are
//! handed to the processor in timestamp order, and the order actually used is recorded with
//! each transaction, so that a replay follows it instead of choosing again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::processor::RawRecord;

/// The source of a wall-clock tick in an interleaving (inputs are 0, 1, ...).
pub(crate) const TICK_SOURCE: u32 = u32::MAX;

/// A unit's records waiting per input, and the open transaction's interleaving.
pub(super) struct Interleave {
    /// Per input: records received, with when they arrived.
    waiting: Vec<VecDeque<(RawRecord, Instant)>>,
    /// How long a record waits for the other inputs to have one too.
    max_idle: Duration,
    /// The open transaction's steps: (source, count) pairs.
    order: Vec<u32>,
}

impl Interleave {
    pub(super) fn new(inputs: usize, max_idle: Duration) -> Self {
        Interleave {
            waiting: (0..inputs).map(|_| VecDeque::new()).collect(),
            max_idle,
            order: Vec::new(),
        }
    }

    /// A record of input `input` arrived.
    pub(super) fn push(&mut self, input: usize, record: RawRecord) {
        if let Some(queue) = self.waiting.get_mut(input) {
            queue.push_back((record, Instant::now()));
        }
    }

    /// The next record to process, if one may go now: the earliest by timestamp (then input)
    /// when every input has one waiting; else, once the longest-waiting record has waited
    /// `max_idle`, the earliest of those waiting.
    pub(super) fn next(&mut self, now: Instant) -> Option<(usize, RawRecord)> {
        let all_have_one = self.waiting.iter().all(|q| !q.is_empty());
        let waited_enough = self
            .oldest_arrival()
            .is_some_and(|since| now.saturating_duration_since(since) >= self.max_idle);
        if !all_have_one && !waited_enough {
            return None;
        }
        let input = self
            .waiting
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|(r, _)| (r.timestamp.unwrap_or(i64::MIN), i)))
            .min()
            .map(|(_, i)| i)?;
        let (record, _) = self.waiting[input].pop_front()?;
        Some((input, record))
    }

    /// How long until a waiting record may go without the other inputs (`None`: nothing waits).
    pub(super) fn until_due(&self, now: Instant) -> Option<Duration> {
        let since = self.oldest_arrival()?;
        Some((since + self.max_idle).saturating_duration_since(now))
    }

    fn oldest_arrival(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .filter_map(|q| q.front().map(|(_, at)| *at))
            .min()
    }

    /// Whether no record waits.
    pub(super) fn is_empty(&self) -> bool {
        self.waiting.iter().all(VecDeque::is_empty)
    }

    /// Notes a step of the open transaction: a record of input `source`, or a tick.
    pub(super) fn record_step(&mut self, source: u32) {
        match self.order.as_mut_slice() {
            [.., last, count] if *last == source => *count += 1,
            _ => self.order.extend([source, 1]),
        }
    }

    /// The open transaction's interleaving; empty afterwards.
    pub(super) fn take_order(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.order)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn record(offset: i64, timestamp: i64) -> RawRecord {
        RawRecord {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            timestamp: Some(timestamp),
            key: None,
            value: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn records_go_in_timestamp_order_when_every_input_has_one() {
        let mut inputs = Interleave::new(2, Duration::from_secs(3600));
        let now = Instant::now();
        inputs.push(0, record(0, 50));
        inputs.push(0, record(1, 70));
        assert!(inputs.next(now).is_none(), "input 1 has nothing yet");
        inputs.push(1, record(0, 60));
        let order: Vec<(usize, i64)> = std::iter::from_fn(|| inputs.next(now))
            .map(|(i, r)| (i, r.timestamp.unwrap_or_default()))
            .collect();
        // After input 1's only record, input 0's last waits again.
        assert_eq!(order, [(0, 50), (1, 60)]);
        assert!(!inputs.is_empty());
    }

    #[test]
    fn a_record_goes_alone_after_the_idle_wait() {
        let mut inputs = Interleave::new(2, Duration::ZERO);
        inputs.push(1, record(0, 5));
        assert_eq!(inputs.next(Instant::now()).map(|(i, _)| i), Some(1));
        assert!(inputs.is_empty());
        assert_eq!(inputs.until_due(Instant::now()), None);
    }

    #[test]
    fn the_interleaving_is_run_length_encoded() {
        let mut inputs = Interleave::new(2, Duration::ZERO);
        for source in [0, 0, 1, TICK_SOURCE, 1, 1, 0] {
            inputs.record_step(source);
        }
        assert_eq!(
            inputs.take_order(),
            [0, 2, 1, 1, TICK_SOURCE, 1, 1, 2, 0, 1]
        );
        assert!(inputs.take_order().is_empty());
    }
}
