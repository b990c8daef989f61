//! Checks that the group consumer hands over a partition's records from where its worker
//! seeked, in offset order, without jumps of its own.
//!
//! librdkafka can move a fetch position by itself. Partitions are assigned at the logical
//! offset `BEGINNING` (see `runtime`), which the fetcher looks up with a ListOffsets request;
//! when the worker's seek lands while that lookup is in flight, the outdated answer restarts
//! the lookup (librdkafka 2.12 up to its master branch: `rd_kafka_toppar_handle_Offset` retries
//! an outdated response without checking that a seek has since started the fetcher), and some
//! 500 ms later the fetcher jumps from the seek position to the log start. Backwards, that
//! re-reads the log from its start for nothing; forwards — when retention or DeleteRecords
//! moved the log start past what the app has processed — it skips unprocessed input without
//! any error, where a fetch from the seek position would have failed with "offset out of
//! range". Found on real Kafka: records 1–2999 of a partition were never processed.
//!
//! So the consumer thread checks every record against the offset it expects next: behind it,
//! the fetcher is sought back; ahead of it, the gap is normal (transaction markers, aborted or
//! compacted records) unless the log now starts beyond the expected offset, which means input
//! was deleted before it was read.

use std::ffi::CString;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// Where the next record of a live partition must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FetchPosition {
    next: i64,
}

/// What a record polled for a live partition says about its fetch position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Continuity {
    /// The next record (possibly after a gap that offsets normally have): hand it over.
    InOrder,
    /// Behind what was already handed over: the fetcher went back; seek it to `expected`.
    Rewound { expected: i64 },
    /// After a gap the log start explains: records `[expected, log_start)` were deleted
    /// before they were read.
    Deleted { expected: i64, log_start: i64 },
}

impl FetchPosition {
    /// The position right after a seek to `offset`.
    pub(crate) fn new(offset: i64) -> Self {
        FetchPosition { next: offset }
    }

    /// The offset of the next record to hand over.
    pub(crate) fn next(&self) -> i64 {
        self.next
    }

    /// Checks the record at `offset` and advances past it when it is handed over.
    /// `log_start` is asked only after a gap.
    pub(crate) fn check(
        &mut self,
        offset: i64,
        log_start: impl FnOnce() -> Option<i64>,
    ) -> Continuity {
        if offset < self.next {
            return Continuity::Rewound {
                expected: self.next,
            };
        }
        if offset > self.next {
            if let Some(log_start) = log_start().filter(|&start| start > self.next) {
                return Continuity::Deleted {
                    expected: self.next,
                    log_start,
                };
            }
        }
        self.next = offset + 1;
        Continuity::InOrder
    }
}

/// The partition's log start offset as the consumer last saw it in a fetch response (no
/// request is made). None if the consumer has not fetched the partition yet.
pub(crate) fn cached_log_start<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    cached_watermarks(consumer, topic, partition).map(|(low, _)| low)
}

/// (log start, high watermark) of the partition as the consumer last saw them in a fetch
/// response (no request is made). None if the consumer has not fetched the partition yet.
pub(crate) fn cached_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client handle is valid while `consumer` is borrowed; the call only reads the
    // partition's cached watermarks under librdkafka's own lock and writes the two i64s.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && low >= 0)
        .then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_records_are_in_order() {
        let mut p = FetchPosition::new(10);
        for offset in 10..20 {
            assert_eq!(p.check(offset, || panic!("no gap")), Continuity::InOrder);
        }
        assert_eq!(p, FetchPosition::new(20));
    }

    #[test]
    fn a_gap_within_the_log_is_in_order() {
        // 11 is a commit marker; the log starts well before.
        let mut p = FetchPosition::new(10);
        assert_eq!(p.check(10, || None), Continuity::InOrder);
        assert_eq!(p.check(12, || Some(0)), Continuity::InOrder);
        assert_eq!(p.check(13, || panic!("no gap")), Continuity::InOrder);
        // Unknown log start: nothing says input was lost.
        assert_eq!(p.check(20, || None), Continuity::InOrder);
    }

    #[test]
    fn a_jump_to_a_log_start_beyond_the_expected_offset_is_a_deletion() {
        let mut p = FetchPosition::new(0);
        assert_eq!(p.check(0, || None), Continuity::InOrder);
        assert_eq!(
            p.check(3000, || Some(3000)),
            Continuity::Deleted {
                expected: 1,
                log_start: 3000
            }
        );
        // Not handed over: the position stays where the input was lost.
        assert_eq!(
            p.check(3001, || Some(3000)),
            Continuity::Deleted {
                expected: 1,
                log_start: 3000
            }
        );
    }

    #[test]
    fn a_record_behind_the_position_is_a_rewind() {
        let mut p = FetchPosition::new(500);
        assert_eq!(p.check(500, || None), Continuity::InOrder);
        assert_eq!(p.check(0, || None), Continuity::Rewound { expected: 501 });
        assert_eq!(p.check(501, || None), Continuity::InOrder);
    }
}
