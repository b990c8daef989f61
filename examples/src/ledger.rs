//! Service B, `ledger`: account balances; applies transfer legs, refuses overdrafts.
//!
//! Input: [`Transfer`] legs keyed by account. Kafka's partitioner sends all legs of one account
//! to one partition, and the framework keeps one state per input partition, so each account's
//! balance lives in exactly one partition's state and every change to it is applied there, in
//! offset order.
//!
//! # Debit first
//!
//! A transfer touches two accounts, usually in two partitions. `validate` emits only its
//! **debit** leg (keyed by `from`). The ledger applies the debit if `from` has the funds in
//! that currency; then, **in the same transaction**, it emits
//! - a [`BalanceChanged`] for `from`, and
//! - the transfer's **credit** leg keyed by `to`, to its *own* input topic,
//!
//! so the credit exists exactly when the debit committed, and is applied later by whichever
//! partition owns `to` (credits are never refused). If the funds are missing it emits a
//! [`Rejection`] instead and no credit ever exists: money is neither created nor lost.
//! A deposit arrives as a credit leg without counterparty.
//!
//! Balances start at zero; accounts exist from their first leg.
//!
//! # State
//!
//! The accounts live in a keyed [`Store`] (RocksDB on local disk): a commit writes only the
//! accounts its batch changed, a restart on the same machine resumes from the local store, and
//! the number of accounts is bounded by disk, not memory.

use std::collections::BTreeMap;

use exactly::{Json, Output, ProcessError, Processor, Record, Store, Utf8};
use serde::{Deserialize, Serialize};

use crate::payments::{BalanceChanged, Leg, Rejection, Transfer};

/// One account: its balance per currency and how many changes it has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Balance changes applied so far (all currencies).
    pub version: u64,
    /// Balance per currency, in minor units.
    pub balances: BTreeMap<String, i64>,
}

/// The ledger's state for one input partition: the accounts that hash to it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LedgerState {
    /// Accounts by id.
    pub accounts: Store<Utf8, Json<Account>>,
}

/// The `ledger` processor.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Its own input topic: where the credit legs of accepted debits go.
    pub ledger_topic: String,
    /// Where [`BalanceChanged`] events go.
    pub balances_topic: String,
    /// Where [`Rejection`]s go.
    pub rejections_topic: String,
}

impl Processor for Ledger {
    type State = LedgerState;
    type Key = Utf8;
    type Value = Json<Transfer>;

    fn process(
        &self,
        state: &mut LedgerState,
        record: &Record<'_, String, Transfer>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let leg = record.value();
        if *record.key() != leg.account {
            return Err(format!(
                "leg {} is keyed by {:?} but changes account {:?}: it would be applied in the wrong partition",
                leg.leg_id(),
                record.key(),
                leg.account
            )
            .into());
        }
        if leg.amount_cents <= 0 {
            return Err(format!(
                "leg {} has a non-positive amount {}",
                leg.leg_id(),
                leg.amount_cents
            )
            .into());
        }
        let mut account = state.accounts.get(&leg.account)?.unwrap_or_default();
        let balance = account.balances.get(&leg.currency).copied().unwrap_or(0);
        // Everything is checked before the state changes (a failed record must leave it as is).
        let (delta, credit) = match leg.leg {
            Leg::Credit => (leg.amount_cents, None),
            Leg::Debit => {
                let Some(to) = &leg.counterparty else {
                    return Err(format!("debit leg {} has no counterparty", leg.leg_id()).into());
                };
                if balance < leg.amount_cents {
                    let rejection = Rejection {
                        id: leg.id.clone(),
                        account: leg.account.clone(),
                        amount_cents: leg.amount_cents,
                        currency: leg.currency.clone(),
                        balance_cents: balance,
                        reason: "insufficient funds".into(),
                        ts: leg.ts,
                    };
                    out.send_as::<Utf8, Json<Rejection>>(
                        &self.rejections_topic,
                        &leg.account,
                        &rejection,
                    )?;
                    return Ok(());
                }
                let credit = Transfer {
                    id: leg.id.clone(),
                    leg: Leg::Credit,
                    account: to.clone(),
                    counterparty: Some(leg.account.clone()),
                    amount_cents: leg.amount_cents,
                    currency: leg.currency.clone(),
                    ts: leg.ts,
                };
                (-leg.amount_cents, Some(credit))
            }
        };
        let new_balance = balance.checked_add(delta).ok_or_else(|| {
            format!(
                "balance of {} in {} would overflow applying {}",
                leg.account,
                leg.currency,
                leg.leg_id()
            )
        })?;
        account.balances.insert(leg.currency.clone(), new_balance);
        account.version += 1;
        state.accounts.put(&leg.account, &account)?;
        let event = BalanceChanged {
            id: leg.id.clone(),
            leg: leg.leg,
            account: leg.account.clone(),
            currency: leg.currency.clone(),
            delta_cents: delta,
            balance_cents: new_balance,
            version: account.version,
            ts: leg.ts,
        };
        out.send_as::<Utf8, Json<BalanceChanged>>(&self.balances_topic, &leg.account, &event)?;
        if let Some(credit) = credit {
            out.send_as::<Utf8, Json<Transfer>>(&self.ledger_topic, &credit.account, &credit)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly::testing::TestDriver;

    fn driver() -> TestDriver<Ledger> {
        TestDriver::new(Ledger {
            ledger_topic: "ledger".into(),
            balances_topic: "balances".into(),
            rejections_topic: "rejections".into(),
        })
    }

    fn leg(id: &str, leg: Leg, account: &str, counterparty: Option<&str>, cents: i64) -> Transfer {
        Transfer {
            id: id.into(),
            leg,
            account: account.into(),
            counterparty: counterparty.map(Into::into),
            amount_cents: cents,
            currency: "EUR".into(),
            ts: 1,
        }
    }

    fn account(d: &TestDriver<Ledger>, id: &str) -> Account {
        let state = d.state("ledger", 0).expect("partition 0 has state");
        state
            .accounts
            .get(&id.to_owned())
            .unwrap()
            .expect("account exists")
    }

    fn pipe(d: &mut TestDriver<Ledger>, t: &Transfer) -> Result<(), exactly::testing::TestError> {
        d.pipe("ledger", &t.account.clone(), t)
    }

    #[test]
    fn deposit_then_transfer_emits_balance_and_credit_leg() {
        let mut d = driver();
        pipe(&mut d, &leg("d1", Leg::Credit, "alice", None, 1000)).unwrap();
        pipe(&mut d, &leg("t1", Leg::Debit, "alice", Some("bob"), 300)).unwrap();
        let events: Vec<(String, BalanceChanged)> = d.read_as::<Utf8, Json<_>>("balances").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].1.balance_cents, 700);
        assert_eq!(events[1].1.delta_cents, -300);
        assert_eq!(events[1].1.version, 2);
        let credits: Vec<(String, Transfer)> = d.read_as::<Utf8, Json<_>>("ledger").unwrap();
        assert_eq!(
            credits,
            [(
                "bob".to_string(),
                leg("t1", Leg::Credit, "bob", Some("alice"), 300)
            )]
        );
        // The credit leg, fed back, lands on bob.
        pipe(&mut d, &credits[0].1).unwrap();
        assert_eq!(account(&d, "bob").balances["EUR"], 300);
        assert_eq!(d.verify_determinism().unwrap(), 3);
    }

    #[test]
    fn overdraft_is_rejected_without_credit_or_state_change() {
        let mut d = driver();
        pipe(&mut d, &leg("d1", Leg::Credit, "alice", None, 100)).unwrap();
        pipe(&mut d, &leg("t1", Leg::Debit, "alice", Some("bob"), 101)).unwrap();
        let rejections: Vec<(String, Rejection)> =
            d.read_as::<Utf8, Json<_>>("rejections").unwrap();
        assert_eq!(rejections.len(), 1);
        assert_eq!(rejections[0].1.id, "t1");
        assert_eq!(rejections[0].1.balance_cents, 100);
        assert_eq!(d.outputs_to("ledger").count(), 0);
        assert_eq!(d.outputs_to("balances").count(), 1);
        let alice = account(&d, "alice");
        assert_eq!((alice.version, alice.balances["EUR"]), (1, 100));
        // Exactly the balance is fine.
        pipe(&mut d, &leg("t2", Leg::Debit, "alice", Some("bob"), 100)).unwrap();
        assert_eq!(account(&d, "alice").balances["EUR"], 0);
        d.verify_determinism().unwrap();
    }

    #[test]
    fn currencies_are_separate() {
        let mut d = driver();
        pipe(&mut d, &leg("d1", Leg::Credit, "alice", None, 100)).unwrap();
        let mut usd = leg("t1", Leg::Debit, "alice", Some("bob"), 50);
        usd.currency = "USD".into();
        pipe(&mut d, &usd).unwrap();
        assert_eq!(d.outputs_to("rejections").count(), 1);
    }

    #[test]
    fn mis_keyed_or_malformed_legs_fail_loudly() {
        let mut d = driver();
        let t = leg("t1", Leg::Debit, "alice", Some("bob"), 5);
        let err = d.pipe("ledger", &"bob".to_string(), &t).unwrap_err();
        assert!(err.to_string().contains("wrong partition"), "{err}");
        let mut d = driver();
        let err = pipe(&mut d, &leg("t2", Leg::Debit, "alice", None, 5)).unwrap_err();
        assert!(err.to_string().contains("counterparty"), "{err}");
        let mut d = driver();
        pipe(&mut d, &leg("d", Leg::Credit, "alice", None, i64::MAX)).unwrap();
        let err = pipe(&mut d, &leg("d2", Leg::Credit, "alice", None, 1)).unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
    }

    #[test]
    fn many_accounts_survive_snapshot_and_replay() {
        let mut d = driver().with_max_chunk_bytes(64);
        for i in 0..50 {
            let account = format!("acct-{}", i % 7);
            pipe(
                &mut d,
                &leg(&format!("d{i}"), Leg::Credit, &account, None, 100 + i),
            )
            .unwrap();
        }
        d.full_snapshot().unwrap();
        for i in 0..30 {
            let account = format!("acct-{}", i % 7);
            let to = format!("acct-{}", (i + 1) % 7);
            pipe(
                &mut d,
                &leg(&format!("t{i}"), Leg::Debit, &account, Some(&to), 40),
            )
            .unwrap();
        }
        assert_eq!(d.verify_determinism().unwrap(), 30);
    }
}
