//! A deterministic (seeded) generator of payment commands for the demo, with some malformed,
//! invalid and overdrawing ones.
//!
//! # Why the generator avoids borderline overdrafts
//!
//! A transfer's credit reaches the payee's partition asynchronously (see [`crate::ledger`]),
//! so whether a *borderline* debit finds enough money can depend on timing: on whether some
//! credit to the payer was applied just before it or just after. The ledger handles that
//! correctly, but no reference model computed from the input alone can predict it. So the
//! generator only creates transfers whose outcome is the same under every interleaving:
//! - ordinary transfers are covered by the payer's **own** money (its deposits minus its
//!   earlier debits, which reach its partition in input order because commands are keyed by
//!   the owner account), without counting any incoming transfer;
//! - overdrafts ask for [`OVERDRAFT_CENTS`], more than all money ever deposited.
//!
//! [`crate::model::expect`] checks this property and refuses inputs that break it.

use std::collections::BTreeMap;

use crate::payments::{CommandKind, PaymentCommand, PAYMENT_ID_HEADER};

/// Amount of the generated overdrafts: above any possible balance (deposits are at most
/// [`MAX_DEPOSIT_CENTS`] each, so this holds for up to 10^10 commands).
pub const OVERDRAFT_CENTS: i64 = 1_000_000_000_000_000;
/// Largest generated deposit.
pub const MAX_DEPOSIT_CENTS: i64 = 100_000;
/// Largest generated transfer.
pub const MAX_TRANSFER_CENTS: i64 = 50_000;
/// Timestamp of the first generated command (2026-01-01T00:00:00Z).
const BASE_TS: i64 = 1_767_225_600_000;

/// One generated input record: what the demo produces to the commands topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputCommand {
    /// Command id, also in the [`PAYMENT_ID_HEADER`] header.
    pub id: String,
    /// Record key: the owner account.
    pub key: String,
    /// Record value: JSON (or deliberately broken bytes).
    pub value: Vec<u8>,
    /// What the generator meant it to be (for the summary; the model does not use it).
    pub intent: Intent,
}

impl InputCommand {
    /// The headers to produce with the record.
    pub fn headers(&self) -> [(&'static str, &str); 1] {
        [(PAYMENT_ID_HEADER, self.id.as_str())]
    }
}

/// What a generated command is meant to test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Intent {
    /// A funded transfer.
    Transfer,
    /// A deposit.
    Deposit,
    /// A transfer no account can pay.
    Overdraft,
    /// Well-formed JSON that breaks a business rule.
    Invalid,
    /// Not a decodable command.
    Malformed,
}

/// SplitMix64: a tiny PRNG whose sequence for a seed never changes (unlike `rand`'s
/// `StdRng`, which may change between versions), so `--seed` reproduces a run's input.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi - lo).max(0) as u64 + 1;
        lo + self.below(span) as i64
    }
}

/// Account `i`'s id.
pub fn account(i: u64) -> String {
    format!("acct-{i:05}")
}

/// Generates `count` commands over `accounts` accounts from `seed`; `generate(s, n, a)` is a
/// prefix of `generate(s, m, a)` for `n < m`. Per 1000 commands, about:
/// 15 malformed, 25 invalid, 15 overdrafts, 245 deposits, the rest funded transfers (a
/// deposit instead when the picked payer has no money yet).
pub fn generate(seed: u64, count: usize, accounts: u64) -> Vec<InputCommand> {
    let accounts = accounts.max(2);
    let mut rng = SplitMix64::new(seed);
    // Money of each (account, currency) that no interleaving can take away: deposits minus
    // the account's own debits.
    let mut own: BTreeMap<(u64, &'static str), i64> = BTreeMap::new();
    let mut commands = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("pay-{i:07}");
        let ts = BASE_TS + i as i64 * 7;
        let currency: &'static str = if rng.below(100) < 85 { "EUR" } else { "USD" };
        let roll = rng.below(1000);
        let a = rng.below(accounts);
        let mut b = rng.below(accounts - 1);
        if b >= a {
            b += 1;
        }
        let command =
            |kind, from: Option<u64>, to: u64, amount_cents, currency: &str| PaymentCommand {
                id: id.clone(),
                kind,
                from: from.map(account),
                to: account(to),
                amount_cents,
                currency: currency.to_owned(),
                ts,
            };
        let (intent, key, value) = if roll < 15 {
            let value = match rng.below(4) {
                0 => format!(
                    r#"{{"id":"{id}","from":"{}","to":"{}","amount_cents":"#,
                    account(a),
                    account(b)
                ),
                1 => format!(
                    r#"{{"id":"{id}","from":"{}","to":"{}","amount_cents":"ten","currency":"EUR","ts":{ts}}}"#,
                    account(a),
                    account(b)
                ),
                2 => format!(r#"{{"id":"{id}","to":"{}"}}"#, account(b)),
                _ => "definitely not json \u{1F4B8}".to_owned(),
            };
            (Intent::Malformed, account(a), value.into_bytes())
        } else if roll < 40 {
            let c = match rng.below(4) {
                0 => command(
                    CommandKind::Transfer,
                    Some(a),
                    b,
                    -rng.between(0, 500),
                    currency,
                ),
                1 => command(
                    CommandKind::Transfer,
                    Some(a),
                    a,
                    rng.between(1, 500),
                    currency,
                ),
                2 => command(
                    CommandKind::Transfer,
                    Some(a),
                    b,
                    rng.between(1, 500),
                    "XTS",
                ),
                _ => command(
                    CommandKind::Deposit,
                    Some(a),
                    b,
                    rng.between(1, 500),
                    currency,
                ),
            };
            (Intent::Invalid, account(a), json(&c))
        } else if roll < 55 {
            let c = command(CommandKind::Transfer, Some(a), b, OVERDRAFT_CENTS, currency);
            (Intent::Overdraft, account(a), json(&c))
        } else {
            // A transfer from a funded payer; a few tries, else fund `a`.
            let payer = (0..8)
                .map(|_| rng.below(accounts))
                .find(|p| own.get(&(*p, currency)).is_some_and(|m| *m > 0));
            match payer.filter(|_| roll >= 300) {
                Some(from) => {
                    let mut to = rng.below(accounts - 1);
                    if to >= from {
                        to += 1;
                    }
                    let funds = own[&(from, currency)];
                    let amount = rng.between(1, funds.min(MAX_TRANSFER_CENTS));
                    *own.entry((from, currency)).or_default() -= amount;
                    let c = command(CommandKind::Transfer, Some(from), to, amount, currency);
                    (Intent::Transfer, account(from), json(&c))
                }
                None => {
                    let amount = rng.between(1, MAX_DEPOSIT_CENTS);
                    *own.entry((a, currency)).or_default() += amount;
                    let c = command(CommandKind::Deposit, None, a, amount, currency);
                    (Intent::Deposit, account(a), json(&c))
                }
            }
        };
        commands.push(InputCommand {
            id,
            key,
            value,
            intent,
        });
    }
    commands
}

fn json(command: &PaymentCommand) -> Vec<u8> {
    // A plain struct of strings and integers always serializes.
    serde_json::to_vec(command).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_commands_and_every_intent_appears() {
        let a = generate(7, 3000, 50);
        assert_eq!(a, generate(7, 3000, 50));
        assert_ne!(a, generate(8, 3000, 50));
        for intent in [
            Intent::Transfer,
            Intent::Deposit,
            Intent::Overdraft,
            Intent::Invalid,
            Intent::Malformed,
        ] {
            assert!(a.iter().any(|c| c.intent == intent), "{intent:?} missing");
        }
        let ids: std::collections::BTreeSet<&str> = a.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 3000);
    }

    #[test]
    fn shorter_runs_are_prefixes_of_longer_ones() {
        // The chaos suite relies on it: the first N commands of a seed are what was produced.
        let long = generate(5, 1000, 20);
        assert_eq!(generate(5, 400, 20), long[..400]);
    }

    #[test]
    fn splitmix_is_stable() {
        // Reference values of SplitMix64 for seed 0.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }
}
