//! The fraud example's seeded input and its reference model: the outputs the detector must
//! produce, computed from the input alone, without the framework (no windows, no timers: a
//! direct reading of the rules).

use std::collections::BTreeMap;

use exactly::testing::default_partition;

use super::{
    broken_rule, Alert, CardHour, Expired, Late, Profile, Spend, Transaction, GRACE_MS, HOUR_MS,
    IDLE_MS,
};

/// Record time of the first transaction (ms): 2023-11-14T22:13:20Z.
pub const START_MS: i64 = 1_700_000_000_000;
/// Record time between two transactions of the input, on average.
pub const STEP_MS: i64 = 18_000;

/// A transaction of the input, with where and when it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The card (the key).
    pub card: String,
    /// Its partition (Kafka's default partitioner on the card).
    pub partition: i32,
    /// The record timestamp.
    pub timestamp: i64,
    /// The value.
    pub tx: Transaction,
}

/// SplitMix64: a small seeded generator, so the input is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `count` transactions of `cards` cards over `partitions` partitions, in production order,
/// about one every [`STEP_MS`] of record time. Some arrive out of order (up to a minute), some
/// over an hour late; every 200th starts a burst of six more on its card within six minutes
/// (a `count` alert), and one in a hundred is large (with company, an `amount` alert).
pub fn generate(seed: u64, count: usize, cards: u64, partitions: i32) -> Vec<Input> {
    let mut rng = Rng(seed);
    let mut inputs = Vec::with_capacity(count + count / 30);
    let mut i = 0usize;
    while inputs.len() < count {
        let base = START_MS + i as i64 * STEP_MS;
        let card = format!("card-{:05}", rng.below(cards));
        let burst = if i % 200 == 0 { 7 } else { 1 };
        for b in 0..burst {
            if inputs.len() >= count {
                break;
            }
            let jitter = rng.below(120_000) as i64 - 60_000;
            let late = rng.below(150) == 0;
            let timestamp = if late {
                base - 80 * 60_000
            } else {
                base + jitter + b as i64 * 50_000
            };
            let cents = if rng.below(100) == 0 {
                45_000
            } else {
                100 + rng.below(19_900)
            };
            inputs.push(Input {
                partition: default_partition(card.as_bytes(), partitions),
                card: card.clone(),
                timestamp,
                tx: Transaction {
                    id: format!("tx-{:07}", inputs.len()),
                    cents,
                },
            });
        }
        i += 1;
    }
    inputs
}

/// A card's profile, with its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileInput {
    /// The card (the key).
    pub card: String,
    /// Its partition (as the transactions').
    pub partition: i32,
    /// The value.
    pub profile: Profile,
}

/// A profile for each of `cards` cards: a limit of 300.00, 500.00 or 800.00 an hour; one card
/// in fifty blocked. Produced before the transactions, with older timestamps.
pub fn profiles(seed: u64, cards: u64, partitions: i32) -> Vec<ProfileInput> {
    let mut rng = Rng(seed ^ 0x5EED);
    (0..cards)
        .map(|n| {
            let card = format!("card-{n:05}");
            ProfileInput {
                partition: default_partition(card.as_bytes(), partitions),
                card,
                profile: Profile {
                    limit_cents: [30_000, 50_000, 80_000][rng.below(3) as usize],
                    blocked: rng.below(50) == 0,
                },
            }
        })
        .collect()
}

/// What one partition holds at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionEnd {
    /// Cards kept (not expired).
    pub cards: u64,
    /// Alerts raised.
    pub alerts: u64,
    /// Transactions processed.
    pub transactions: u64,
    /// Card profiles held.
    pub profiles: u64,
}

/// Everything the detector must have produced once it processed the whole input.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Closed hours.
    pub card_hours: Vec<CardHour>,
    /// Alerts.
    pub alerts: Vec<Alert>,
    /// Expired cards.
    pub expired: Vec<Expired>,
    /// Late transactions (card, record).
    pub late: Vec<(String, Late)>,
    /// Each partition's end state.
    pub partitions: BTreeMap<i32, PartitionEnd>,
}

impl Expected {
    /// Stream-time timers that fired: closed hours plus expired cards.
    pub fn timers_fired(&self) -> usize {
        self.card_hours.len() + self.expired.len()
    }
}

/// The rules, partition by partition, in the order records arrive, every card's profile
/// known from the start.
pub fn expect(inputs: &[Input], cards: &[ProfileInput]) -> Expected {
    let profiles: BTreeMap<&str, Profile> =
        cards.iter().map(|p| (p.card.as_str(), p.profile)).collect();
    let mut expected = Expected::default();
    let mut by_partition: BTreeMap<i32, Vec<&Input>> = BTreeMap::new();
    for input in inputs {
        by_partition.entry(input.partition).or_default().push(input);
    }
    let mut profiles_of: BTreeMap<i32, u64> = BTreeMap::new();
    for card in cards {
        *profiles_of.entry(card.partition).or_default() += 1;
    }
    for (partition, inputs) in by_partition {
        let model = PartitionModel {
            profiles: &profiles,
            stream_time: i64::MIN,
            hours: BTreeMap::new(),
            last_seen: BTreeMap::new(),
            end: PartitionEnd::default(),
        };
        let mut end = model.run(&inputs, &mut expected);
        end.profiles = profiles_of.get(&partition).copied().unwrap_or(0);
        expected.partitions.insert(partition, end);
    }
    expected
}

struct PartitionModel<'p> {
    profiles: &'p BTreeMap<&'p str, Profile>,
    stream_time: i64,
    /// Open hours by (card, start).
    hours: BTreeMap<(String, i64), Spend>,
    /// Known cards' latest transaction time.
    last_seen: BTreeMap<String, i64>,
    end: PartitionEnd,
}

impl PartitionModel<'_> {
    fn run(mut self, inputs: &[&Input], expected: &mut Expected) -> PartitionEnd {
        for input in inputs {
            self.record(input, expected);
            self.close_hours(expected);
            self.expire_cards(expected);
        }
        self.end.cards = self.last_seen.len() as u64;
        self.end
    }

    fn record(&mut self, input: &Input, expected: &mut Expected) {
        let at = input.timestamp;
        self.stream_time = self.stream_time.max(at);
        self.end.transactions += 1;
        let start = at - at.rem_euclid(HOUR_MS);
        if self.stream_time >= start + HOUR_MS + GRACE_MS {
            let late = Late {
                id: input.tx.id.clone(),
                timestamp: at,
            };
            expected.late.push((input.card.clone(), late));
        } else {
            let spend = self.hours.entry((input.card.clone(), start)).or_default();
            spend.cents += input.tx.cents;
            spend.count += 1;
        }
        let last = self.last_seen.entry(input.card.clone()).or_insert(at);
        *last = (*last).max(at);
    }

    fn close_hours(&mut self, expected: &mut Expected) {
        let now = self.stream_time;
        let closed: Vec<(String, i64)> = self
            .hours
            .keys()
            .filter(|(_, start)| start + HOUR_MS + GRACE_MS <= now)
            .cloned()
            .collect();
        for key in closed {
            let spend = self.hours.remove(&key).unwrap_or_default();
            let hour = CardHour {
                card: key.0,
                start: key.1,
                cents: spend.cents,
                count: spend.count,
            };
            let profile = self.profiles.get(hour.card.as_str()).copied();
            if let Some(rule) = broken_rule(spend, profile) {
                self.end.alerts += 1;
                expected.alerts.push(Alert {
                    hour: hour.clone(),
                    rule: rule.to_owned(),
                });
            }
            expected.card_hours.push(hour);
        }
    }

    fn expire_cards(&mut self, expected: &mut Expected) {
        let now = self.stream_time;
        let idle: Vec<(String, i64)> = self
            .last_seen
            .iter()
            .filter(|(_, last)| **last + IDLE_MS <= now)
            .map(|(card, last)| (card.clone(), *last))
            .collect();
        for (card, last_seen) in idle {
            self.last_seen.remove(&card);
            expected.expired.push(Expired { card, last_seen });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use exactly::testing::{RawInput, TestDriver};

    use super::*;
    use crate::fraud::{FraudDetector, Report, Topics};

    fn detector() -> FraudDetector {
        FraudDetector {
            profiles_topic: "profiles".into(),
            topics: Topics::with_prefix("f"),
            report_every: Duration::from_secs(1),
        }
    }

    fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
        v.sort();
        v
    }

    #[test]
    fn the_input_has_late_records_bursts_and_large_amounts() {
        let inputs = generate(7, 3_000, 300, 4);
        assert_eq!(inputs.len(), 3_000);
        assert_eq!(generate(7, 3_000, 300, 4), inputs, "seeded");
        let expected = expect(&inputs, &profiles(7, 300, 4));
        assert!(!expected.late.is_empty());
        assert!(expected.alerts.iter().any(|a| a.rule == "count"));
        assert!(expected.alerts.iter().any(|a| a.rule == "amount"));
        assert!(expected.alerts.iter().any(|a| a.rule == "blocked"));
        assert!(!expected.expired.is_empty());
    }

    /// The detector, run by the test driver (as the runtime runs it: profiles and
    /// transactions as one unit per partition, with wall-clock ticks and a full snapshot on
    /// the way), produces exactly what the model says, and replays.
    #[test]
    fn the_detector_matches_the_model_and_replays_exactly() {
        let inputs = generate(11, 4_000, 400, 4);
        let cards = profiles(11, 400, 4);
        let expected = expect(&inputs, &cards);
        let mut driver = TestDriver::new(detector()).co_partitioned(["transactions", "profiles"]);
        for card in &cards {
            let value = serde_json::to_vec(&card.profile).unwrap();
            driver
                .pipe_raw(
                    RawInput::new("profiles")
                        .partition(card.partition)
                        .timestamp(START_MS - 1)
                        .key(card.card.as_str())
                        .value(value),
                )
                .unwrap();
        }
        for (i, input) in inputs.iter().enumerate() {
            let value = serde_json::to_vec(&input.tx).unwrap();
            driver
                .pipe_raw(
                    RawInput::new("transactions")
                        .partition(input.partition)
                        .timestamp(input.timestamp)
                        .key(input.card.as_str())
                        .value(value),
                )
                .unwrap();
            if i % 700 == 0 {
                driver.advance_wall_clock(Duration::from_secs(1)).unwrap();
            }
            if i == 2_500 {
                driver.full_snapshot().unwrap();
            }
        }
        driver.advance_wall_clock(Duration::from_secs(1)).unwrap();
        let topics = Topics::with_prefix("f");
        let hours: Vec<(String, CardHour)> = driver.read_json(&topics.card_hours).unwrap();
        let hours = hours.into_iter().map(|(_, h)| h).collect();
        assert_eq!(sorted(hours), sorted(expected.card_hours.clone()));
        let alerts: Vec<(String, Alert)> = driver.read_json(&topics.alerts).unwrap();
        let alerts = alerts.into_iter().map(|(_, a)| a).collect();
        assert_eq!(sorted(alerts), sorted(expected.alerts.clone()));
        let expired: Vec<(String, Expired)> = driver.read_json(&topics.expired).unwrap();
        let expired = expired.into_iter().map(|(_, e)| e).collect();
        assert_eq!(sorted(expired), sorted(expected.expired.clone()));
        let late: Vec<(String, Late)> = driver.read_json(&topics.late).unwrap();
        assert_eq!(sorted(late), sorted(expected.late.clone()));
        let reports: Vec<(String, Report)> = driver.read_json(&topics.reports).unwrap();
        for (partition, end) in &expected.partitions {
            let last = reports
                .iter()
                .rev()
                .find(|(_, r)| r.partition == *partition)
                .map(|(_, r)| r)
                .unwrap();
            let got = PartitionEnd {
                cards: last.cards,
                alerts: last.alerts,
                transactions: last.transactions,
                profiles: last.profiles,
            };
            assert_eq!(got, *end, "partition {partition}");
        }
        driver.verify_determinism().unwrap();
    }
}
