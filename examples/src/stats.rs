//! Service C, `stats`: per-account running totals and counts.
//!
//! Input: [`BalanceChanged`] events keyed by account (the ledger's output), so one account's
//! events arrive in one partition, in the order the ledger applied them. For every event it
//! updates the account's totals in the event's currency and emits the new
//! [`AccountSummary`] keyed by account.

use std::collections::BTreeMap;

use exactly::{Json, Output, ProcessError, Processor, Record, Utf8};
use serde::{Deserialize, Serialize};

use crate::payments::{AccountSummary, BalanceChanged, Leg};

/// Totals of one account in one currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Debits applied.
    pub debit_count: u64,
    /// Credits applied.
    pub credit_count: u64,
    /// Sum of debits (positive).
    pub debited_cents: i64,
    /// Sum of credits.
    pub credited_cents: i64,
    /// Latest balance seen.
    pub balance_cents: i64,
}

/// Everything `stats` knows about one account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountStats {
    /// Events seen (all currencies).
    pub updates: u64,
    /// Totals per currency.
    pub currencies: BTreeMap<String, Totals>,
}

/// The `stats` processor.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Where the [`AccountSummary`] records go.
    pub summaries_topic: String,
}

impl Processor for Stats {
    type State = BTreeMap<String, AccountStats>;
    type Key = Utf8;
    type Value = Json<BalanceChanged>;

    fn process(
        &self,
        accounts: &mut Self::State,
        record: &Record<'_, String, BalanceChanged>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let event = record.value();
        let overflow = || format!("totals of {} in {} overflow", event.account, event.currency);
        let amount = event.delta_cents.checked_abs().ok_or_else(overflow)?;
        let stats = accounts.entry(event.account.clone()).or_default();
        let mut totals = stats
            .currencies
            .get(&event.currency)
            .cloned()
            .unwrap_or_default();
        match event.leg {
            Leg::Debit => {
                totals.debit_count += 1;
                totals.debited_cents = totals
                    .debited_cents
                    .checked_add(amount)
                    .ok_or_else(overflow)?;
            }
            Leg::Credit => {
                totals.credit_count += 1;
                totals.credited_cents = totals
                    .credited_cents
                    .checked_add(amount)
                    .ok_or_else(overflow)?;
            }
        }
        totals.balance_cents = event.balance_cents;
        let summary = AccountSummary {
            account: event.account.clone(),
            currency: event.currency.clone(),
            debit_count: totals.debit_count,
            credit_count: totals.credit_count,
            debited_cents: totals.debited_cents,
            credited_cents: totals.credited_cents,
            balance_cents: totals.balance_cents,
            updates: stats.updates + 1,
            event: crate::payments::leg_id(&event.id, event.leg),
        };
        out.send_as::<Utf8, Json<AccountSummary>>(&self.summaries_topic, &event.account, &summary)?;
        // Only now, with nothing left that can fail, does the state change.
        stats.updates += 1;
        stats.currencies.insert(event.currency.clone(), totals);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly::testing::TestDriver;

    fn event(
        id: &str,
        leg: Leg,
        account: &str,
        delta: i64,
        balance: i64,
        currency: &str,
    ) -> BalanceChanged {
        BalanceChanged {
            id: id.into(),
            leg,
            account: account.into(),
            currency: currency.into(),
            delta_cents: delta,
            balance_cents: balance,
            version: 0,
            ts: 1,
        }
    }

    fn driver() -> TestDriver<Stats> {
        TestDriver::new(Stats {
            summaries_topic: "stats".into(),
        })
    }

    #[test]
    fn running_totals_per_account_and_currency() {
        let mut d = driver();
        let events = [
            event("d1", Leg::Credit, "alice", 1000, 1000, "EUR"),
            event("t1", Leg::Debit, "alice", -300, 700, "EUR"),
            event("d2", Leg::Credit, "alice", 50, 50, "USD"),
            event("t2", Leg::Credit, "bob", 300, 300, "EUR"),
        ];
        for e in &events {
            d.pipe("balances", &e.account.clone(), e).unwrap();
        }
        let summaries: Vec<(String, AccountSummary)> = d.read_as::<Utf8, Json<_>>("stats").unwrap();
        assert_eq!(summaries.len(), 4);
        let alice_eur = &summaries[1].1;
        assert_eq!(
            (
                alice_eur.debit_count,
                alice_eur.credit_count,
                alice_eur.debited_cents,
                alice_eur.credited_cents
            ),
            (1, 1, 300, 1000)
        );
        assert_eq!(alice_eur.balance_cents, 700);
        assert_eq!(alice_eur.event, "t1:debit");
        assert_eq!(summaries[2].1.updates, 3);
        assert_eq!(summaries[2].1.currency, "USD");
        assert_eq!(summaries[3].1.updates, 1);
        assert_eq!(d.verify_determinism().unwrap(), 4);
    }

    #[test]
    fn replay_after_snapshot_is_deterministic() {
        let mut d = driver().with_max_chunk_bytes(100);
        for i in 0..40 {
            let e = event(
                &format!("e{i}"),
                if i % 3 == 0 { Leg::Debit } else { Leg::Credit },
                &format!("a{}", i % 5),
                10,
                i,
                "EUR",
            );
            d.pipe_to("balances", i as i32 % 2, &e.account.clone(), &e)
                .unwrap();
            if i == 20 {
                d.full_snapshot().unwrap();
            }
        }
        d.verify_determinism().unwrap();
    }

    #[test]
    fn overflow_fails_without_changing_state() {
        let mut d = driver();
        d.pipe(
            "balances",
            &"a".to_string(),
            &event("x", Leg::Credit, "a", i64::MAX, 0, "EUR"),
        )
        .unwrap();
        let err = d
            .pipe(
                "balances",
                &"a".to_string(),
                &event("y", Leg::Credit, "a", 1, 0, "EUR"),
            )
            .unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
        assert_eq!(d.state("balances", 0).unwrap()["a"].updates, 1);
    }
}
