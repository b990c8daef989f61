//! End-to-end verification of the chain A → B → C against the reference model.
//!
//! [`verify_chain`] reads every output topic back with read_committed (the exactly-once
//! checker of `exactly-tests`), compares the ids on each with what [`crate::model::expect`]
//! says must be there exactly once, and compares B's final balances and C's final totals
//! with the model's. The demo and the chaos suite's workload both print their result lines
//! from the [`Verdict`].
//!
//! ```no_run
//! # async fn run(bootstrap: &str) -> anyhow::Result<()> {
//! use exactly_examples::{generator, model, verify};
//! use exactly_tests::eos::CheckOptions;
//!
//! let commands = generator::generate(42, 1_000, 100);
//! let expectation = model::expect(&commands)?;
//! let topics = verify::OutputTopics {
//!     dead_letters: "payments.dead-letters",
//!     ledger: "payments.ledger",
//!     balances: "payments.balances",
//!     rejections: "payments.rejections",
//!     stats: "payments.stats",
//! };
//! let verdict =
//!     verify::verify_chain(bootstrap, &topics, &expectation, &CheckOptions::default()).await?;
//! assert!(verdict.is_clean(), "{:?}", verdict.state.problems);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use exactly_tests::eos::{check_topic_with, CheckOptions, EosError, EosReport, Observed};
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::model::{AccountCurrency, Expectation};
use crate::payments::{
    leg_id, AccountSummary, BalanceChanged, Rejection, Transfer, PAYMENT_ID_HEADER,
};
use crate::stats::Totals;

/// The chain's output topics: everything [`verify_chain`] reads back.
#[derive(Debug, Clone, Copy)]
pub struct OutputTopics<'a> {
    /// A's dead letters (malformed and invalid commands).
    pub dead_letters: &'a str,
    /// A's ledger legs plus B's credit legs.
    pub ledger: &'a str,
    /// B's balance events.
    pub balances: &'a str,
    /// B's rejections (refused overdrafts).
    pub rejections: &'a str,
    /// C's account summaries.
    pub stats: &'a str,
}

/// The exactly-once report of one output topic, with a short name for summaries.
#[derive(Debug, Clone)]
pub struct TopicCheck {
    /// `dead-letters`, `ledger legs`, `balances`, `rejections` or `summaries`.
    pub label: &'static str,
    /// What the checker found on the topic.
    pub report: EosReport,
}

/// B's last balance and C's last totals per (account, currency), as read from their topics.
///
/// "Last" is by the per-account sequence number each record carries (B's `version`, C's
/// `updates`), not by read order: one account's records are in one partition, but a check
/// must not depend on that.
#[derive(Debug, Clone, Default)]
pub struct ObservedState {
    /// `(version, balance_cents)` of the latest balance event.
    balances: BTreeMap<AccountCurrency, (u64, i64)>,
    /// `(updates, totals)` of the latest summary.
    totals: BTreeMap<AccountCurrency, (u64, Totals)>,
}

impl ObservedState {
    /// Takes one of B's balance events into account.
    pub fn record_balance(&mut self, event: &BalanceChanged) {
        let slot = self
            .balances
            .entry((event.account.clone(), event.currency.clone()))
            .or_insert((0, 0));
        if event.version >= slot.0 {
            *slot = (event.version, event.balance_cents);
        }
    }

    /// Takes one of C's summaries into account.
    pub fn record_summary(&mut self, summary: &AccountSummary) {
        let slot = self
            .totals
            .entry((summary.account.clone(), summary.currency.clone()))
            .or_insert((0, Totals::default()));
        if summary.updates >= slot.0 {
            *slot = (
                summary.updates,
                Totals {
                    debit_count: summary.debit_count,
                    credit_count: summary.credit_count,
                    debited_cents: summary.debited_cents,
                    credited_cents: summary.credited_cents,
                    balance_cents: summary.balance_cents,
                },
            );
        }
    }

    /// Compares the state with the model's final balances and totals.
    pub fn compare(&self, expectation: &Expectation) -> StateComparison {
        let mut problems = Vec::new();
        let balances_matching = compare_finals(
            ("B balance", "no event"),
            &self.balances,
            &expectation.balances,
            &mut problems,
        );
        let totals_matching = compare_finals(
            ("C totals", "no summary"),
            &self.totals,
            &expectation.totals,
            &mut problems,
        );
        StateComparison {
            balances_matching,
            totals_matching,
            problems,
        }
    }
}

/// Compares the last value read per key (`(offset, value)`) with the model's; returns how
/// many match and adds a line per difference to `problems`.
fn compare_finals<V: PartialEq + std::fmt::Debug>(
    (what, absent): (&str, &str),
    actual: &BTreeMap<AccountCurrency, (u64, V)>,
    expected: &BTreeMap<AccountCurrency, V>,
    problems: &mut Vec<String>,
) -> usize {
    let mut matching = 0;
    for (k, expected) in expected {
        match actual.get(k) {
            Some((_, actual)) if actual == expected => matching += 1,
            Some((_, actual)) => {
                problems.push(format!("{what} of {k:?}: {actual:?}, model {expected:?}"))
            }
            None => problems.push(format!("{what} of {k:?}: {absent}, model {expected:?}")),
        }
    }
    for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("{what} of {k:?}: not in the model"));
    }
    matching
}

/// How B's balances and C's totals compare with the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateComparison {
    /// (account, currency) entries whose final balance equals the model's.
    pub balances_matching: usize,
    /// (account, currency) entries whose final totals equal the model's.
    pub totals_matching: usize,
    /// Every difference, described: B's balances first, then C's totals.
    pub problems: Vec<String>,
}

impl StateComparison {
    /// True when every balance and every total equals the model's, and nothing else exists.
    pub fn matches(&self) -> bool {
        self.problems.is_empty()
    }

    /// `match` or `mismatch`: the `state=` value of the demo's and the workload's result lines.
    pub fn verdict(&self) -> &'static str {
        if self.matches() {
            "match"
        } else {
            "mismatch"
        }
    }
}

/// The outcome of [`verify_chain`].
#[derive(Debug, Clone)]
pub struct Verdict {
    /// One report per output topic, in the order of [`OutputTopics`]' fields.
    pub topics: Vec<TopicCheck>,
    /// B's final balances and C's final totals against the model.
    pub state: StateComparison,
}

impl Verdict {
    /// True when every topic holds each expected id exactly once, nothing else and in order,
    /// and the state matches the model.
    pub fn is_clean(&self) -> bool {
        self.topics.iter().all(|t| t.report.is_clean()) && self.state.matches()
    }

    /// Records read, summed over the topics.
    pub fn records_read(&self) -> u64 {
        self.topics.iter().map(|t| t.report.records_read).sum()
    }

    /// Ids read more than once, summed over the topics.
    pub fn duplicates(&self) -> usize {
        self.sum(|r| r.duplicate_count)
    }

    /// Expected ids never read, summed over the topics.
    pub fn missing(&self) -> usize {
        self.sum(|r| r.missing_count)
    }

    /// Ids read that the model does not expect, summed over the topics.
    pub fn unexpected(&self) -> usize {
        self.sum(|r| r.unexpected_count)
    }

    /// Per-key sequence numbers out of order, summed over the topics.
    pub fn order_violations(&self) -> usize {
        self.sum(|r| r.order_violation_count)
    }

    fn sum(&self, count: fn(&EosReport) -> usize) -> usize {
        self.topics.iter().map(|t| count(&t.report)).sum()
    }
}

/// Reads every output topic of the chain back with read_committed and checks it against
/// `expectation`: ids exactly once per topic, per-account order of B's events and C's
/// summaries, and B's and C's final state.
///
/// The topics are read one after the other, each within `options.timeout`; `options`
/// also sets how many offending records each report lists. A violation is not an error:
/// it is in the [`Verdict`]. An error means the check itself could not be done (a topic is
/// missing or unreadable, a record cannot be decoded, the end was not reached in time).
pub async fn verify_chain(
    bootstrap: &str,
    topics: &OutputTopics<'_>,
    expectation: &Expectation,
    options: &CheckOptions,
) -> Result<Verdict, EosError> {
    let state: Arc<Mutex<ObservedState>> = Arc::default();
    let check = |label, topic, expected| TopicSpec {
        bootstrap,
        label,
        topic,
        expected,
        options,
    };
    let mut checks = Vec::with_capacity(5);
    checks.push(
        check(
            "dead-letters",
            topics.dead_letters,
            &expectation.dead_letters,
        )
        .run(dead_letter_id)
        .await?,
    );
    checks.push(
        check("ledger legs", topics.ledger, &expectation.ledger_legs)
            .run(|m: &BorrowedMessage<'_>| Ok(Some(Observed::id(json::<Transfer>(m)?.leg_id()))))
            .await?,
    );
    let seen = Arc::clone(&state);
    checks.push(
        check("balances", topics.balances, &expectation.balance_events)
            .run(move |m: &BorrowedMessage<'_>| {
                let event: BalanceChanged = json(m)?;
                lock(&seen).record_balance(&event);
                Ok(Some(Observed {
                    id: leg_id(&event.id, event.leg),
                    key: Some(event.account),
                    seq: Some(event.version),
                }))
            })
            .await?,
    );
    checks.push(
        check("rejections", topics.rejections, &expectation.rejections)
            .run(|m: &BorrowedMessage<'_>| Ok(Some(Observed::id(json::<Rejection>(m)?.id))))
            .await?,
    );
    // C emits one summary per balance event, identified by the event's leg id.
    let seen = Arc::clone(&state);
    checks.push(
        check("summaries", topics.stats, &expectation.balance_events)
            .run(move |m: &BorrowedMessage<'_>| {
                let summary: AccountSummary = json(m)?;
                lock(&seen).record_summary(&summary);
                Ok(Some(Observed {
                    id: summary.event,
                    key: Some(summary.account),
                    seq: Some(summary.updates),
                }))
            })
            .await?,
    );
    let state = lock(&state).compare(expectation);
    Ok(Verdict {
        topics: checks,
        state,
    })
}

/// One topic's check, before it is given its extractor.
struct TopicSpec<'a> {
    bootstrap: &'a str,
    label: &'static str,
    topic: &'a str,
    expected: &'a [String],
    options: &'a CheckOptions,
}

impl TopicSpec<'_> {
    async fn run<F>(self, extractor: F) -> Result<TopicCheck, EosError>
    where
        F: Fn(&BorrowedMessage<'_>) -> Result<Option<Observed>, String> + Send + 'static,
    {
        let expected = self.expected.iter().cloned();
        let report = check_topic_with(
            self.bootstrap,
            self.topic,
            expected,
            extractor,
            self.options,
        )
        .await?;
        Ok(TopicCheck {
            label: self.label,
            report,
        })
    }
}

/// The state is only touched by one extractor at a time; a poisoned lock (a panic in an
/// extractor, which would already have failed the check) still holds valid data.
fn lock(state: &Mutex<ObservedState>) -> std::sync::MutexGuard<'_, ObservedState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A dead letter carries the original command's bytes, which need not decode; its id is the
/// producer's payment-id header, which dead-lettering keeps.
fn dead_letter_id(m: &BorrowedMessage<'_>) -> Result<Option<Observed>, String> {
    let id = m
        .headers()
        .and_then(|h| {
            h.iter()
                .filter(|h| h.key == PAYMENT_ID_HEADER)
                .last()
                .and_then(|h| h.value)
        })
        .ok_or_else(|| {
            format!(
                "dead letter at {}/{} has no {PAYMENT_ID_HEADER} header",
                m.partition(),
                m.offset()
            )
        })?;
    Ok(Some(Observed::id(String::from_utf8_lossy(id).into_owned())))
}

fn json<T: serde::de::DeserializeOwned>(m: &BorrowedMessage<'_>) -> Result<T, String> {
    let bytes = m
        .payload()
        .ok_or_else(|| format!("record at {}/{} has no value", m.partition(), m.offset()))?;
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "undecodable record at {}/{}: {e}",
            m.partition(),
            m.offset()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payments::Leg;

    fn key(account: &str) -> AccountCurrency {
        (account.into(), "EUR".into())
    }

    fn balance(account: &str, version: u64, balance_cents: i64) -> BalanceChanged {
        BalanceChanged {
            id: format!("p{version}"),
            leg: Leg::Credit,
            account: account.into(),
            currency: "EUR".into(),
            delta_cents: 0,
            balance_cents,
            version,
            ts: 0,
        }
    }

    fn summary(account: &str, updates: u64, balance_cents: i64) -> AccountSummary {
        AccountSummary {
            account: account.into(),
            currency: "EUR".into(),
            debit_count: 0,
            credit_count: updates,
            debited_cents: 0,
            credited_cents: balance_cents,
            balance_cents,
            updates,
            event: format!("p{updates}:credit"),
        }
    }

    fn totals(credits: u64, balance_cents: i64) -> Totals {
        Totals {
            credit_count: credits,
            credited_cents: balance_cents,
            balance_cents,
            ..Totals::default()
        }
    }

    #[test]
    fn the_highest_sequence_number_wins_whatever_the_read_order() {
        let mut state = ObservedState::default();
        state.record_balance(&balance("a", 2, 30));
        state.record_balance(&balance("a", 1, 10));
        state.record_summary(&summary("a", 2, 30));
        state.record_summary(&summary("a", 1, 10));
        let expectation = Expectation {
            balances: [(key("a"), 30)].into(),
            totals: [(key("a"), totals(2, 30))].into(),
            ..Expectation::default()
        };
        let comparison = state.compare(&expectation);
        assert_eq!(
            comparison,
            StateComparison {
                balances_matching: 1,
                totals_matching: 1,
                problems: Vec::new(),
            }
        );
        assert!(comparison.matches());
        assert_eq!(comparison.verdict(), "match");
    }

    #[test]
    fn every_kind_of_difference_is_described() {
        let mut state = ObservedState::default();
        state.record_balance(&balance("a", 1, 10));
        state.record_balance(&balance("stray", 1, 5));
        state.record_summary(&summary("a", 1, 99));
        let expectation = Expectation {
            balances: [(key("a"), 30), (key("b"), 7)].into(),
            totals: [(key("a"), totals(1, 10))].into(),
            ..Expectation::default()
        };
        let comparison = state.compare(&expectation);
        assert_eq!(comparison.balances_matching, 0);
        assert_eq!(comparison.totals_matching, 0);
        assert_eq!(
            comparison.problems,
            [
                r#"B balance of ("a", "EUR"): 10, model 30"#,
                r#"B balance of ("b", "EUR"): no event, model 7"#,
                r#"B balance of ("stray", "EUR"): not in the model"#,
                r#"C totals of ("a", "EUR"): Totals { debit_count: 0, credit_count: 1, debited_cents: 0, credited_cents: 99, balance_cents: 99 }, model Totals { debit_count: 0, credit_count: 1, debited_cents: 0, credited_cents: 10, balance_cents: 10 }"#,
            ]
        );
        assert_eq!(comparison.verdict(), "mismatch");
    }

    #[test]
    fn verdict_sums_the_topics_and_needs_everything_clean() {
        let report = |topic: &str, records_read, duplicate_count, missing_count| EosReport {
            topic: topic.into(),
            records_read,
            records_ignored: 0,
            expected_count: 0,
            distinct_seen: 0,
            duplicate_count,
            extra_deliveries: 0,
            duplicates: Vec::new(),
            missing_count,
            missing: Vec::new(),
            unexpected_count: 0,
            unexpected: Vec::new(),
            order_violation_count: 0,
            order_violations: Vec::new(),
        };
        let clean = Verdict {
            topics: vec![
                TopicCheck {
                    label: "balances",
                    report: report("b", 5, 0, 0),
                },
                TopicCheck {
                    label: "summaries",
                    report: report("s", 7, 0, 0),
                },
            ],
            state: StateComparison::default(),
        };
        assert!(clean.is_clean());
        assert_eq!(clean.records_read(), 12);

        let mut broken = clean.clone();
        broken.topics[1].report = report("s", 7, 2, 3);
        assert!(!broken.is_clean());
        assert_eq!((broken.duplicates(), broken.missing()), (2, 3));

        let mut drifted = clean;
        drifted.state.problems.push("B balance differs".into());
        assert!(!drifted.is_clean());
    }
}
