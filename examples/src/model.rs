//! The reference model: from the list of input commands alone, what the chain must produce
//! (which ids on which topic) and what B's balances and C's totals must end at.
//!
//! It is deliberately written without the processors: plain loops over the input in order.
//! It shares only the domain rules ([`PaymentCommand::validate`]) and the JSON decoding.
//!
//! A debit's outcome is decided the way it is decided under *every* interleaving of the
//! partitions: accepted if the payer's own money (deposits minus earlier debits, all in input
//! order) covers it, rejected if even all money ever deposited in its currency would not. If
//! neither holds the outcome depends on timing and [`expect`] refuses the input with
//! [`ModelError::TimingDependent`] (see [`crate::generator`]).

use std::collections::BTreeMap;

use crate::generator::InputCommand;
use crate::payments::{leg_id, CommandKind, Leg, PaymentCommand};
use crate::stats::Totals;

/// `(account, currency)`.
pub type AccountCurrency = (String, String);

/// What the chain must produce for an input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectation {
    /// Command ids expected on A's dead-letter topic (malformed and invalid commands).
    pub dead_letters: Vec<String>,
    /// Leg ids expected on the ledger topic: A's first legs plus B's credit legs.
    pub ledger_legs: Vec<String>,
    /// Leg ids of B's balance events (also of C's summaries: one per event).
    pub balance_events: Vec<String>,
    /// Command ids of B's rejections.
    pub rejections: Vec<String>,
    /// Final balance per account and currency (only those that changed at least once).
    pub balances: BTreeMap<AccountCurrency, i64>,
    /// Final totals per account and currency.
    pub totals: BTreeMap<AccountCurrency, Totals>,
}

/// The input cannot be modelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A debit whose outcome depends on how partitions interleave.
    #[error("command {id}: debit of {amount_cents} from {account} is accepted or refused depending on timing (own money {own_cents}, at most {best_cents}, all money deposited)")]
    TimingDependent {
        /// Command id.
        id: String,
        /// Payer.
        account: String,
        /// Amount.
        amount_cents: i64,
        /// Money the payer certainly has.
        own_cents: i64,
        /// Money the payer could have at most (all money deposited in the currency).
        best_cents: i64,
    },
}

/// Computes the [`Expectation`] of `commands` (in production order).
pub fn expect(commands: &[InputCommand]) -> Result<Expectation, ModelError> {
    let valid: Vec<PaymentCommand> = commands
        .iter()
        .filter_map(|c| serde_json::from_slice::<PaymentCommand>(&c.value).ok())
        .filter(|c| c.validate().is_ok())
        .collect();
    let mut e = Expectation::default();
    let valid_ids: std::collections::HashSet<&str> = valid.iter().map(|c| c.id.as_str()).collect();
    // Ids come from the generator's header, which is how the demo reads dead letters back.
    e.dead_letters = commands
        .iter()
        .filter(|c| {
            serde_json::from_slice::<PaymentCommand>(&c.value)
                .map(|p| p.id != c.id || !valid_ids.contains(c.id.as_str()))
                .unwrap_or(true)
        })
        .map(|c| c.id.clone())
        .collect();

    // No balance can ever exceed all the money deposited in its currency (transfers only
    // move money): the upper bound of what an account could have at any moment.
    let mut deposited: BTreeMap<String, i64> = BTreeMap::new();
    for c in valid.iter().filter(|c| c.kind == CommandKind::Deposit) {
        *deposited.entry(c.currency.clone()).or_default() += c.amount_cents;
    }
    let mut own: BTreeMap<AccountCurrency, i64> = BTreeMap::new();
    let credit = |e: &mut Expectation, account: &str, currency: &str, cents: i64| {
        let k = (account.to_owned(), currency.to_owned());
        *e.balances.entry(k.clone()).or_default() += cents;
        let t = e.totals.entry(k.clone()).or_default();
        t.credit_count += 1;
        t.credited_cents += cents;
        t.balance_cents = e.balances[&k];
    };
    for c in &valid {
        match (c.kind, &c.from) {
            (CommandKind::Deposit, _) => {
                *own.entry((c.to.clone(), c.currency.clone())).or_default() += c.amount_cents;
                e.ledger_legs.push(leg_id(&c.id, Leg::Credit));
                e.balance_events.push(leg_id(&c.id, Leg::Credit));
                credit(&mut e, &c.to, &c.currency, c.amount_cents);
            }
            (CommandKind::Transfer, Some(from)) => {
                e.ledger_legs.push(leg_id(&c.id, Leg::Debit));
                let k = (from.clone(), c.currency.clone());
                let own_cents = own.get(&k).copied().unwrap_or(0);
                let best_cents = deposited.get(&c.currency).copied().unwrap_or(0);
                if own_cents >= c.amount_cents {
                    *own.entry(k.clone()).or_default() -= c.amount_cents;
                    *e.balances.entry(k.clone()).or_default() -= c.amount_cents;
                    let t = e.totals.entry(k.clone()).or_default();
                    t.debit_count += 1;
                    t.debited_cents += c.amount_cents;
                    t.balance_cents = e.balances[&k];
                    e.balance_events.push(leg_id(&c.id, Leg::Debit));
                    e.ledger_legs.push(leg_id(&c.id, Leg::Credit));
                    e.balance_events.push(leg_id(&c.id, Leg::Credit));
                    credit(&mut e, &c.to, &c.currency, c.amount_cents);
                } else if best_cents < c.amount_cents {
                    e.rejections.push(c.id.clone());
                } else {
                    return Err(ModelError::TimingDependent {
                        id: c.id.clone(),
                        account: from.clone(),
                        amount_cents: c.amount_cents,
                        own_cents,
                        best_cents,
                    });
                }
            }
            // `validate` guarantees a transfer has `from`.
            (CommandKind::Transfer, None) => {}
        }
    }
    // `balance_cents` of a total is the final balance: the last event of the account wins.
    for (k, t) in &mut e.totals {
        t.balance_cents = e.balances[k];
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{generate, Intent};
    use crate::ledger::Ledger;
    use crate::payments::{BalanceChanged, Transfer};
    use crate::stats::Stats;
    use crate::validate::Validate;
    use exactly::testing::{RawInput, TestDriver};
    use exactly::{ErrorPolicy, Json, Utf8};

    fn input(id: &str, command: &PaymentCommand) -> InputCommand {
        InputCommand {
            id: id.into(),
            key: command.owner_account().unwrap_or("x").into(),
            value: serde_json::to_vec(command).unwrap(),
            intent: Intent::Transfer,
        }
    }

    fn cmd(id: &str, from: Option<&str>, to: &str, cents: i64) -> PaymentCommand {
        PaymentCommand {
            id: id.into(),
            kind: if from.is_some() {
                CommandKind::Transfer
            } else {
                CommandKind::Deposit
            },
            from: from.map(Into::into),
            to: to.into(),
            amount_cents: cents,
            currency: "EUR".into(),
            ts: 0,
        }
    }

    #[test]
    fn small_example_by_hand() {
        let commands = [
            input("d1", &cmd("d1", None, "a", 100)),
            input("t1", &cmd("t1", Some("a"), "b", 60)),
            input("t2", &cmd("t2", Some("a"), "b", 1000)),
            input("t3", &cmd("t3", Some("a"), "a", 1)),
        ];
        let e = expect(&commands).unwrap();
        assert_eq!(e.dead_letters, ["t3"]);
        assert_eq!(e.rejections, ["t2"]);
        assert_eq!(
            e.ledger_legs,
            ["d1:credit", "t1:debit", "t1:credit", "t2:debit"]
        );
        assert_eq!(e.balance_events, ["d1:credit", "t1:debit", "t1:credit"]);
        assert_eq!(e.balances[&("a".into(), "EUR".into())], 40);
        assert_eq!(e.balances[&("b".into(), "EUR".into())], 60);
        let a = &e.totals[&("a".into(), "EUR".into())];
        assert_eq!(
            (
                a.debit_count,
                a.credit_count,
                a.debited_cents,
                a.credited_cents
            ),
            (1, 1, 60, 100)
        );
    }

    #[test]
    fn timing_dependent_debit_is_refused() {
        // b's debit of 50 succeeds only if a's transfer reached b first.
        let commands = [
            input("d1", &cmd("d1", None, "a", 100)),
            input("t1", &cmd("t1", Some("a"), "b", 60)),
            input("t2", &cmd("t2", Some("b"), "c", 50)),
        ];
        assert!(matches!(
            expect(&commands),
            Err(ModelError::TimingDependent { .. })
        ));
    }

    #[test]
    fn generated_input_is_never_timing_dependent() {
        for seed in 0..5 {
            expect(&generate(seed, 5000, 40)).unwrap();
        }
    }

    /// The processors, run in one process in the simplest order (A on everything, then B
    /// until no credit legs are left, then C), end where the model says.
    #[test]
    fn processors_agree_with_the_model() {
        let commands = generate(11, 4000, 30);
        let e = expect(&commands).unwrap();
        let mut a = TestDriver::new(Validate {
            ledger_topic: "ledger".into(),
            dead_letter_topic: "dlq".into(),
        })
        .with_error_policy(ErrorPolicy::DeadLetter {
            topic: "dlq".into(),
        });
        for c in &commands {
            a.pipe_raw(
                RawInput::new("commands")
                    .key(c.key.clone())
                    .value(c.value.clone())
                    .header("payment-id", c.id.clone()),
            )
            .unwrap();
        }
        a.verify_determinism().unwrap();
        assert_eq!(a.outputs_to("dlq").count(), e.dead_letters.len());
        let mut b = TestDriver::new(Ledger {
            ledger_topic: "ledger".into(),
            balances_topic: "balances".into(),
            rejections_topic: "rejections".into(),
        });
        let mut legs: Vec<(String, Transfer)> = a.read_as::<Utf8, Json<_>>("ledger").unwrap();
        let mut all_legs = legs.len();
        let mut events: Vec<(String, BalanceChanged)> = Vec::new();
        let mut rejections = 0;
        // Partition by a hash of the key, like Kafka would (any stable function does).
        let part = |k: &str| (k.bytes().map(u32::from).sum::<u32>() % 4) as i32;
        while !legs.is_empty() {
            for (k, leg) in &legs {
                b.pipe_to("ledger", part(k), k, leg).unwrap();
            }
            let mut next = Vec::new();
            for r in b.take_outputs() {
                let k = String::from_utf8(r.key.unwrap()).unwrap();
                let v = r.value.unwrap();
                match r.topic.as_str() {
                    "ledger" => next.push((k, serde_json::from_slice(&v).unwrap())),
                    "balances" => events.push((k, serde_json::from_slice(&v).unwrap())),
                    _ => rejections += 1,
                }
            }
            legs = next;
            all_legs += legs.len();
        }
        assert_eq!(all_legs, e.ledger_legs.len());
        assert_eq!(events.len(), e.balance_events.len());
        assert_eq!(rejections, e.rejections.len());
        b.verify_determinism().unwrap();
        let mut balances = BTreeMap::new();
        for p in 0..4 {
            for (account, acc) in b.state("ledger", p).unwrap().accounts.range(..).unwrap() {
                for (cur, bal) in &acc.balances {
                    balances.insert((account.clone(), cur.clone()), *bal);
                }
            }
        }
        assert_eq!(balances, e.balances);

        let mut c = TestDriver::new(Stats {
            summaries_topic: "stats".into(),
        });
        for (k, event) in &events {
            c.pipe_to("balances", part(k), k, event).unwrap();
        }
        c.verify_determinism().unwrap();
        let mut totals = BTreeMap::new();
        for p in 0..4 {
            for (account, stats) in c.state("balances", p).unwrap() {
                for (cur, t) in &stats.currencies {
                    totals.insert((account.clone(), cur.clone()), t.clone());
                }
            }
        }
        assert_eq!(totals, e.totals);
    }
}
