//! The benchmark's input records and the stateful count every engine computes from them.
//!
//! Record `i`: key `key-NNNNNNN` (`i % keys`), value a JSON object of about 100 bytes,
//! `{"seq": i, "amount": a, "pad": "..."}`. Every engine keeps, per key, the count of records
//! and the sum of `amount`, and emits `{"count": c, "sum": s}` under the same key for every
//! input record (Quix's script, `examples/bench/quix_count.py`, does the same).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use exactly::{Json, Output, OutputRecord, ProcessError, Processor, Raw, Record, Utf8};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::producer::{send_waiting, DeliveryCounter};

/// Target size of a record value in bytes.
pub const VALUE_BYTES: usize = 100;

/// The key of record `index` among `keys` distinct keys.
pub fn key(index: u64, keys: u64) -> String {
    format!("key-{:07}", index % keys.max(1))
}

/// An input value as the processors read it (`pad` only makes the record its size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// Position of the record in the input.
    pub seq: u64,
    /// The quantity summed per key.
    pub amount: i64,
}

/// The value of record `index`: JSON of about [`VALUE_BYTES`] bytes.
pub fn value(index: u64) -> Vec<u8> {
    let amount = (index.wrapping_mul(2_654_435_761) % 1_000) as i64;
    let head = format!("{{\"seq\":{index},\"amount\":{amount},\"pad\":\"");
    let pad = VALUE_BYTES.saturating_sub(head.len() + 2);
    let mut value = head.into_bytes();
    value.resize(value.len() + pad, b'x');
    value.extend_from_slice(b"\"}");
    value
}

/// Per-key count and sum: the state of [`CountProcessor`] and the value it emits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Records seen for the key.
    pub count: u64,
    /// Sum of their `amount`.
    pub sum: i64,
}

/// The exactly processor of the benchmark: per-key [`Totals`], one output per input.
#[derive(Debug, Clone)]
pub struct CountProcessor {
    /// Where the totals go.
    pub output_topic: String,
}

impl Processor for CountProcessor {
    type State = HashMap<String, Totals>;
    type Key = Utf8;
    type Value = Json<Reading>;

    fn process(
        &self,
        state: &mut Self::State,
        record: &Record<'_, String, Reading>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let totals = state.entry(record.key().clone()).or_default();
        totals.count += 1;
        totals.sum += record.value().amount;
        out.send_json(&self.output_topic, record.key(), totals)?;
        Ok(())
    }
}

/// An exactly processor without state or decoding: every input record goes to the output
/// topic as it came (key and value bytes). Run beside [`CountProcessor`], it tells the
/// framework's own cost from the count's.
#[derive(Debug, Clone)]
pub struct PassThrough {
    /// Where the records go.
    pub output_topic: String,
}

impl Processor for PassThrough {
    type State = ();
    type Key = Raw;
    type Value = Raw;

    fn process(
        &self,
        _state: &mut (),
        record: &Record<'_, Option<Vec<u8>>, Option<Vec<u8>>>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let mut copy = OutputRecord::new(self.output_topic.as_str());
        copy.key = record.raw_key().map(<[u8]>::to_vec);
        copy.value = record.raw_value().map(<[u8]>::to_vec);
        out.send(copy);
        Ok(())
    }
}

/// Produces records `0..records` to `topic` (idempotent, so none is written twice) as fast
/// as the broker takes them; returns how long it took.
pub fn produce_input(
    bootstrap: &str,
    topic: &str,
    records: u64,
    keys: u64,
) -> anyhow::Result<Duration> {
    let producer: BaseProducer<DeliveryCounter> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "500000")
        .create_with_context(DeliveryCounter::default())
        .context("creating the input producer")?;
    let started = Instant::now();
    for index in 0..records {
        let key = key(index, keys);
        let value = value(index);
        let record = BaseRecord::<str, [u8]>::to(topic)
            .key(key.as_str())
            .payload(value.as_slice());
        send_waiting(&producer, record)
            .with_context(|| format!("producing input record {index} to {topic}"))?;
    }
    producer
        .flush(Duration::from_secs(120))
        .with_context(|| format!("flushing the input of {topic}"))?;
    let context = producer.context();
    if context.failed() > 0 {
        bail!(
            "{} input records to {topic} were not delivered; first error: {}",
            context.failed(),
            context.first_error()
        );
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly::testing::{RawInput, TestDriver};

    #[test]
    fn values_are_about_100_bytes_and_decode() {
        for index in [0, 7, 123_456, u64::MAX / 3] {
            let v = value(index);
            assert!(
                v.len() >= VALUE_BYTES && v.len() < VALUE_BYTES + 40,
                "{}",
                v.len()
            );
            let reading: Reading = serde_json::from_slice(&v).expect("json");
            assert_eq!(reading.seq, index);
        }
    }

    #[test]
    fn counts_and_sums_per_key() {
        let mut driver = TestDriver::new(CountProcessor {
            output_topic: "out".into(),
        });
        for index in 0..6 {
            driver
                .pipe_raw(RawInput::new("in").key(key(index, 2)).value(value(index)))
                .expect("process");
        }
        driver.check_snapshot_roundtrip().expect("snapshot");
        driver.verify_determinism().expect("deterministic");
        let totals = driver.state("in", 0).expect("state")[&key(1, 2)];
        let expected_sum: i64 = [1, 3, 5]
            .iter()
            .map(|i| (i * 2_654_435_761u64 % 1_000) as i64)
            .sum();
        assert_eq!(
            totals,
            Totals {
                count: 3,
                sum: expected_sum
            }
        );
        assert_eq!(driver.outputs().len(), 6);
    }

    #[test]
    fn the_pass_through_copies_key_and_value() {
        let mut driver = TestDriver::new(PassThrough {
            output_topic: "out".into(),
        });
        driver
            .pipe_raw(RawInput::new("in").key(key(3, 10)).value(value(3)))
            .expect("process");
        let outputs = driver.outputs();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].topic, "out");
        assert_eq!(outputs[0].key.as_deref(), Some(key(3, 10).as_bytes()));
        assert_eq!(outputs[0].value.as_deref(), Some(value(3).as_slice()));
    }
}
