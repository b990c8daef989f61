//! A fraud detector: what a stateful service made of time looks like on `exactly`.
//!
//! Inputs, co-partitioned ([`AppConfig::co_partitioned`](exactly::AppConfig::co_partitioned),
//! key = card): transactions ([`Transaction`], timestamp = when it happened) and card
//! profiles ([`Profile`]: the card's hourly limit, whether it is blocked), joined in the state
//! (a stream–table join, [`Table`]). Per card:
//! - its spending per **hour of record time** ([`TimeWindows`], 5 minutes of grace): every
//!   hour that closes goes to `card-hours`, and an hour of a blocked card, over the card's
//!   limit (its profile's, else [`ALERT_CENTS`]) or with [`ALERT_COUNT`] transactions or more
//!   raises an [`Alert`]; a transaction for an hour that already closed goes to `late` (a side
//!   output);
//! - **idle expiry** by a stream-time timer: a card without a transaction for [`IDLE_MS`] of
//!   record time is forgotten, announced on `expired`;
//! - a **report** per partition by the wall clock ([`Processor::on_wall_clock`]), numbered,
//!   with the cards it knows and the alerts it raised, on `reports`.
//!
//! Everything here replays exactly: windows and timers depend on record timestamps only, and
//! the reports' ticks are recorded with each transaction. [`model`] computes the expected
//! outputs from the input without the framework; [`check`] runs the detector on Kafka
//! through kill -9 restarts and compares (`cargo run --release -p exactly-examples --bin fraud
//! -- --check`).

pub mod check;
pub mod model;

use std::time::Duration;

use exactly::join::Table;
use exactly::window::{TimeWindows, WindowError, WindowedAggregates};
use exactly::{Json, Output, ProcessError, Processor, Raw, Record, Store, Timer, Timers, Utf8};
use serde::{Deserialize, Serialize};

/// An hour in ms.
pub const HOUR_MS: i64 = 3_600_000;
/// How long an hour stays open for late transactions.
pub const GRACE_MS: i64 = 5 * 60_000;
/// Record time without a transaction after which a card is forgotten.
pub const IDLE_MS: i64 = HOUR_MS;
/// An hour spending at least this much raises an alert.
pub const ALERT_CENTS: u64 = 50_000;
/// An hour with at least this many transactions raises an alert.
pub const ALERT_COUNT: u64 = 6;

/// A card transaction (the value; the key is the card).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// Unique id.
    pub id: String,
    /// Amount in cents.
    pub cents: u64,
}

/// A card's profile (the value of the profiles input; the key is the card).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Spending per hour that raises an alert.
    pub limit_cents: u64,
    /// Every hour of a blocked card raises an alert.
    pub blocked: bool,
}

/// One closed hour of a card (`card-hours`; key = card).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CardHour {
    /// The card.
    pub card: String,
    /// Start of the hour (ms).
    pub start: i64,
    /// Spent in the hour.
    pub cents: u64,
    /// Transactions in the hour.
    pub count: u64,
}

/// An hour over a limit (`alerts`; key = card).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Alert {
    /// The hour.
    pub hour: CardHour,
    /// `"blocked"`, `"amount"` or `"count"`.
    pub rule: String,
}

/// A card forgotten after being idle (`expired`; key = card).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Expired {
    /// The card.
    pub card: String,
    /// Its last transaction's time.
    pub last_seen: i64,
}

/// A transaction for an hour that had closed (`late`; key = card).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Late {
    /// The transaction's id.
    pub id: String,
    /// Its time.
    pub timestamp: i64,
}

/// A partition's report by the wall clock (`reports`; key = the partition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The input partition.
    pub partition: i32,
    /// 1, 2, ... per partition: exactly once means no gap and no repeat.
    pub seq: u64,
    /// Cards it keeps.
    pub cards: u64,
    /// Alerts it raised so far.
    pub alerts: u64,
    /// Transactions it processed so far.
    pub transactions: u64,
    /// Card profiles it holds.
    pub profiles: u64,
    /// The wall-clock time of the tick.
    pub time_ms: i64,
}

/// The detector's output topics.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Closed hours.
    pub card_hours: String,
    /// Alerts.
    pub alerts: String,
    /// Expired cards.
    pub expired: String,
    /// Late transactions.
    pub late: String,
    /// Wall-clock reports.
    pub reports: String,
}

impl Topics {
    /// `<prefix>.card-hours`, `<prefix>.alerts`, ...
    pub fn with_prefix(prefix: &str) -> Self {
        Topics {
            card_hours: format!("{prefix}.card-hours"),
            alerts: format!("{prefix}.alerts"),
            expired: format!("{prefix}.expired"),
            late: format!("{prefix}.late"),
            reports: format!("{prefix}.reports"),
        }
    }

    /// Every output topic.
    pub fn all(&self) -> [&str; 5] {
        [
            &self.card_hours,
            &self.alerts,
            &self.expired,
            &self.late,
            &self.reports,
        ]
    }
}

/// An hour's spending so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    /// Cents.
    pub cents: u64,
    /// Transactions.
    pub count: u64,
}

/// A partition's state.
#[derive(Default, Serialize, Deserialize)]
pub struct FraudState {
    /// The profiles input, materialized.
    profiles: Table<Json<Profile>>,
    /// Spending per card and hour.
    hours: WindowedAggregates<Json<Spend>>,
    /// Each known card's latest transaction time.
    last_seen: Store<Utf8, Json<i64>>,
    /// One idle timer per card, at its latest transaction + [`IDLE_MS`].
    idle: Timers,
    /// The input partition (known from the first record of either input; reports start
    /// then).
    partition: Option<i32>,
    cards: u64,
    alerts: u64,
    transactions: u64,
    reports: u64,
}

/// The detector.
pub struct FraudDetector {
    /// The profiles input (every other input is transactions).
    pub profiles_topic: String,
    /// Where it writes.
    pub topics: Topics,
    /// How often each partition reports.
    pub report_every: Duration,
}

/// The hours of record time, with their grace.
pub fn hours() -> TimeWindows {
    TimeWindows::tumbling(Duration::from_millis(HOUR_MS as u64))
        .grace(Duration::from_millis(GRACE_MS as u64))
}

/// The rule an hour of a card with `profile` breaks, if any.
pub fn broken_rule(spend: Spend, profile: Option<Profile>) -> Option<&'static str> {
    let limit = profile.map_or(ALERT_CENTS, |p| p.limit_cents);
    if profile.is_some_and(|p| p.blocked) {
        Some("blocked")
    } else if spend.cents >= limit {
        Some("amount")
    } else if spend.count >= ALERT_COUNT {
        Some("count")
    } else {
        None
    }
}

impl Processor for FraudDetector {
    type State = FraudState;
    type Key = Utf8;
    type Value = Raw;

    fn process(
        &self,
        state: &mut FraudState,
        record: &Record<'_, String, Option<Vec<u8>>>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        state.partition.get_or_insert(record.partition());
        if record.topic() == self.profiles_topic {
            let profile = record.decode_value::<Json<Option<Profile>>>()?;
            state.profiles.update(record.key(), profile.as_ref())?;
            return Ok(());
        }
        let tx = record.decode_value::<Json<Transaction>>()?;
        self.transaction(state, record, &tx, out)
    }

    fn on_timer(
        &self,
        state: &mut FraudState,
        timer: &Timer,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        if let Some(closed) = state.hours.on_timer(timer)? {
            let hour = CardHour {
                card: closed.key,
                start: closed.window.start,
                cents: closed.value.cents,
                count: closed.value.count,
            };
            out.send_json(&self.topics.card_hours, &hour.card, &hour)?;
            let profile = state.profiles.get(&hour.card)?;
            if let Some(rule) = broken_rule(closed.value, profile) {
                state.alerts += 1;
                let alert = Alert {
                    hour: hour.clone(),
                    rule: rule.to_owned(),
                };
                out.send_json(&self.topics.alerts, &hour.card, &alert)?;
            }
        } else if state.idle.owns(timer) {
            state.last_seen.delete(&timer.key)?;
            state.cards -= 1;
            let expired = Expired {
                card: timer.key.clone(),
                last_seen: timer.time - IDLE_MS,
            };
            out.send_json(&self.topics.expired, &timer.key, &expired)?;
        }
        Ok(())
    }

    fn wall_clock_interval(&self) -> Option<Duration> {
        Some(self.report_every)
    }

    fn on_wall_clock(
        &self,
        state: &mut FraudState,
        now_ms: i64,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let Some(partition) = state.partition else {
            return Ok(());
        };
        state.reports += 1;
        let report = Report {
            partition,
            seq: state.reports,
            cards: state.cards,
            alerts: state.alerts,
            transactions: state.transactions,
            profiles: state.profiles.len(),
            time_ms: now_ms,
        };
        out.send_json(&self.topics.reports, &partition.to_string(), &report)?;
        Ok(())
    }
}

impl FraudDetector {
    /// A transaction: into its hour, and the card's idle timer moves.
    fn transaction(
        &self,
        state: &mut FraudState,
        record: &Record<'_, String, Option<Vec<u8>>>,
        tx: &Transaction,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let card = record.key();
        let at = record.timestamp().unwrap_or_default();
        state.transactions += 1;
        let cents = tx.cents;
        let added = state.hours.add(&hours(), card, at, |spend| {
            let spend = spend.unwrap_or_default();
            Spend {
                cents: spend.cents + cents,
                count: spend.count + 1,
            }
        });
        match added {
            Ok(_) => {}
            Err(WindowError::Late { .. }) => {
                let late = Late {
                    id: tx.id.clone(),
                    timestamp: at,
                };
                out.send_json(&self.topics.late, card, &late)?;
            }
            Err(other) => return Err(other.into()),
        }
        self.seen(state, card, at)
    }

    /// Notes the card's transaction at `at`: its idle timer moves to its latest transaction
    /// plus [`IDLE_MS`].
    fn seen(&self, state: &mut FraudState, card: &String, at: i64) -> Result<(), ProcessError> {
        let last = state.last_seen.get(card)?;
        let latest = last.map_or(at, |last| last.max(at));
        if last == Some(latest) {
            return Ok(());
        }
        match last {
            Some(last) => {
                state.idle.cancel(last + IDLE_MS, card)?;
            }
            None => state.cards += 1,
        }
        state.last_seen.put(card, &latest)?;
        state.idle.schedule(latest + IDLE_MS, card)?;
        Ok(())
    }
}
