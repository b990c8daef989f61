//! Deploying a new version of a service, as code (the README's "Deploying a new version").
//!
//! Version 1 of a card-spending service keeps, per card, the amount spent. Version 2 tracks it
//! per currency: its state type changes incompatibly (`spent_cents` becomes a map), so it
//! declares a new [`Processor::version`] and converts version 1's state in
//! [`Processor::migrate_state`]. The tests below check the upgrade with
//! [`TestDriver::upgrade`](exactly::testing::TestDriver::upgrade) before it is deployed.

use std::collections::BTreeMap;

use exactly::{BoxError, Json, OldState, Output, ProcessError, Processor, Record, Utf8};
use serde::{Deserialize, Serialize};

/// A card payment: the input value, keyed by card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payment {
    /// Amount in cents.
    pub cents: i64,
    /// ISO currency code.
    pub currency: String,
}

/// Version 1's state per card.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SpentV1 {
    /// Everything the card spent, whatever the currency.
    pub spent_cents: i64,
}

/// Version 2's state per card: spending per currency.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SpentV2 {
    /// Spent per currency.
    pub spent_cents: BTreeMap<String, i64>,
}

/// Version 1: total spent per card, sent to `spent`.
pub struct SpendingV1;

impl Processor for SpendingV1 {
    type State = BTreeMap<String, SpentV1>;
    type Key = Utf8;
    type Value = Json<Payment>;

    fn process(
        &self,
        cards: &mut Self::State,
        payment: &Record<'_, String, Payment>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let card = cards.entry(payment.key().clone()).or_default();
        card.spent_cents += payment.value().cents;
        out.send_json("spent", payment.key(), &card.spent_cents)?;
        Ok(())
    }
}

/// Version 2: spent per card and currency, sent to `spent` as `{"EUR": 1250}`.
pub struct SpendingV2;

/// Version 1's spending had no currency: it is booked in this one.
pub const LEGACY_CURRENCY: &str = "EUR";

impl Processor for SpendingV2 {
    type State = BTreeMap<String, SpentV2>;
    type Key = Utf8;
    type Value = Json<Payment>;

    fn process(
        &self,
        cards: &mut Self::State,
        payment: &Record<'_, String, Payment>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let Payment { cents, currency } = payment.value();
        let card = cards.entry(payment.key().clone()).or_default();
        *card.spent_cents.entry(currency.clone()).or_default() += cents;
        out.send_json("spent", payment.key(), &card.spent_cents)?;
        Ok(())
    }

    /// 2: spending per currency (state and outputs changed).
    fn version(&self) -> u32 {
        2
    }

    fn migrate_state(
        &self,
        from_version: u32,
        old: &OldState<'_>,
    ) -> Result<Option<Self::State>, BoxError> {
        if from_version >= 2 {
            return Ok(None);
        }
        let cards: BTreeMap<String, SpentV1> = old.decode()?;
        Ok(Some(
            cards
                .into_iter()
                .map(|(card, v1)| {
                    let spent = BTreeMap::from([(LEGACY_CURRENCY.to_owned(), v1.spent_cents)]);
                    (card, SpentV2 { spent_cents: spent })
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly::testing::TestDriver;

    fn payment(cents: i64, currency: &str) -> Payment {
        Payment {
            cents,
            currency: currency.to_owned(),
        }
    }

    #[test]
    fn version_2_takes_over_version_1s_state() {
        let mut v1 = TestDriver::new(SpendingV1);
        let card = "card-7".to_string();
        v1.pipe_by_key("payments", 8, &card, &payment(1200, "EUR"))
            .unwrap();
        v1.pipe_by_key("payments", 8, &card, &payment(50, "EUR"))
            .unwrap();

        let mut v2 = v1.upgrade(SpendingV2).unwrap();
        v2.pipe_by_key("payments", 8, &card, &payment(300, "USD"))
            .unwrap();
        let spent: Vec<(String, BTreeMap<String, i64>)> = v2.read_json("spent").unwrap();
        let expected = BTreeMap::from([("EUR".to_owned(), 1250), ("USD".to_owned(), 300)]);
        assert_eq!(spent, [(card, expected)]);
        // A crash now replays version 2's records from the migrated snapshot: same result.
        v2.verify_determinism().unwrap();
    }

    #[test]
    fn without_the_migration_the_upgrade_is_refused_naming_the_field() {
        struct Unmigrated;
        impl Processor for Unmigrated {
            type State = BTreeMap<String, SpentV2>;
            type Key = Utf8;
            type Value = Json<Payment>;
            fn process(
                &self,
                cards: &mut Self::State,
                payment: &Record<'_, String, Payment>,
                out: &mut Output,
            ) -> Result<(), ProcessError> {
                SpendingV2.process(cards, payment, out)
            }
        }
        let mut v1 = TestDriver::new(SpendingV1);
        v1.pipe("payments", &"card-7".to_string(), &payment(1, "EUR"))
            .unwrap();
        let error = v1.upgrade(Unmigrated).err().expect("refused").to_string();
        assert!(error.contains("at `card-7.spent_cents`"), "{error}");
        assert!(error.contains("Processor::migrate_state"), "{error}");
    }
}
