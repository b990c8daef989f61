//! Service A, `validate`: turns payment commands into ledger legs, and refuses bad ones.
//!
//! Input: [`PaymentCommand`] JSON, keyed by the owner account (any key is accepted).
//!
//! - A valid transfer becomes its **debit leg** ([`Transfer`], `leg = debit`) keyed by `from`;
//!   a valid deposit becomes its **credit leg** keyed by `to`. The credit leg of a transfer is
//!   emitted later by the ledger, only once the debit succeeded (see [`crate::ledger`]).
//! - **Every refused command goes to the dead-letter topic in one shape**: the original key,
//!   value and headers plus the framework's `exactly.*` error headers
//!   ([`exactly::dead_letter_headers`]). Records that are not even a command (bad JSON, wrong
//!   types, missing fields) are dead-lettered by the framework's
//!   [`ErrorPolicy::DeadLetter`](exactly::ErrorPolicy) (the binary configures it; kind
//!   `decode-value`); well-formed commands that break a business rule
//!   ([`PaymentCommand::validate`]) are written there by this processor itself, with kind
//!   [`INVALID_COMMAND_KIND`]. Doing the latter explicitly (instead of returning an error)
//!   keeps them out of the error metrics and logs: an invalid command is an expected outcome,
//!   not a failure of the service.
//!
//! The processor is stateless (`State = ()`).

use exactly::{
    dead_letter_headers, Json, Output, OutputRecord, ProcessError, Processor, Raw, Record, Utf8,
};

use crate::payments::{PaymentCommand, Transfer};

/// `exactly.error.kind` of commands refused by [`PaymentCommand::validate`].
pub const INVALID_COMMAND_KIND: &str = "invalid-command";

/// The `validate` processor.
#[derive(Debug, Clone)]
pub struct Validate {
    /// Where the ledger legs go (the ledger's input topic).
    pub ledger_topic: String,
    /// Where refused commands go.
    pub dead_letter_topic: String,
}

impl Processor for Validate {
    type State = ();
    type Key = Raw;
    type Value = Json<PaymentCommand>;

    fn process(
        &self,
        _state: &mut (),
        record: &Record<'_, Option<Vec<u8>>, PaymentCommand>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let command = record.value();
        match command.validate() {
            Ok(()) => {
                if let Some(leg) = command.first_leg() {
                    out.send_as::<Utf8, Json<Transfer>>(&self.ledger_topic, &leg.account, &leg)?;
                }
            }
            Err(invalid) => out.send(self.dead_letter(record, &invalid.to_string())),
        }
        Ok(())
    }
}

impl Validate {
    /// The original record plus the same error headers the framework's dead-letter policy
    /// writes.
    fn dead_letter(
        &self,
        record: &Record<'_, Option<Vec<u8>>, PaymentCommand>,
        reason: &str,
    ) -> OutputRecord {
        let mut dead = OutputRecord::new(&self.dead_letter_topic);
        dead.key = record.raw_key().map(<[u8]>::to_vec);
        dead.value = record.raw_value().map(<[u8]>::to_vec);
        for (name, value) in record.headers() {
            dead = dead.header(name, value.unwrap_or_default());
        }
        dead.header(dead_letter_headers::ERROR_KIND, INVALID_COMMAND_KIND)
            .header(dead_letter_headers::ERROR_MESSAGE, reason)
            .header(dead_letter_headers::SOURCE_TOPIC, record.topic())
            .header(
                dead_letter_headers::SOURCE_PARTITION,
                record.partition().to_string(),
            )
            .header(
                dead_letter_headers::SOURCE_OFFSET,
                record.offset().to_string(),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payments::{CommandKind, Leg, PAYMENT_ID_HEADER};
    use exactly::testing::{RawInput, TestDriver};
    use exactly::ErrorPolicy;

    fn driver() -> TestDriver<Validate> {
        TestDriver::new(Validate {
            ledger_topic: "ledger".into(),
            dead_letter_topic: "dlq".into(),
        })
        .with_error_policy(ErrorPolicy::DeadLetter {
            topic: "dlq".into(),
        })
    }

    fn command(
        id: &str,
        from: Option<&str>,
        to: &str,
        cents: i64,
        currency: &str,
    ) -> PaymentCommand {
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
            currency: currency.into(),
            ts: 1_700_000_000_000,
        }
    }

    fn pipe(d: &mut TestDriver<Validate>, c: &PaymentCommand) {
        let value = serde_json::to_vec(c).unwrap();
        d.pipe_raw(
            RawInput::new("commands")
                .key(c.owner_account().unwrap_or("x").to_owned())
                .value(value)
                .header(PAYMENT_ID_HEADER, c.id.clone()),
        )
        .unwrap();
    }

    fn header<'a>(r: &'a OutputRecord, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn valid_transfer_becomes_a_debit_keyed_by_from() {
        let mut d = driver();
        pipe(&mut d, &command("p1", Some("alice"), "bob", 250, "EUR"));
        let legs: Vec<(String, Transfer)> = d.read_as::<Utf8, Json<_>>("ledger").unwrap();
        assert_eq!(legs.len(), 1);
        let (key, leg) = &legs[0];
        assert_eq!(key, "alice");
        assert_eq!(leg.leg, Leg::Debit);
        assert_eq!(leg.counterparty.as_deref(), Some("bob"));
        assert_eq!(leg.amount_cents, 250);
        assert_eq!(d.outputs_to("dlq").count(), 0);
        d.verify_determinism().unwrap();
    }

    #[test]
    fn deposit_becomes_a_credit_keyed_by_to() {
        let mut d = driver();
        pipe(&mut d, &command("d1", None, "carol", 1000, "USD"));
        let legs: Vec<(String, Transfer)> = d.read_as::<Utf8, Json<_>>("ledger").unwrap();
        assert_eq!(legs[0].0, "carol");
        assert_eq!(legs[0].1.leg, Leg::Credit);
        assert_eq!(legs[0].1.counterparty, None);
    }

    #[test]
    fn invalid_commands_are_dead_lettered_with_reason_and_original_bytes() {
        let mut d = driver();
        let bad = [
            command("n", Some("a"), "b", 0, "EUR"),
            command("s", Some("a"), "a", 5, "EUR"),
            command("c", Some("a"), "b", 5, "XYZ"),
            command("w", Some("a b"), "c", 5, "EUR"),
        ];
        for c in &bad {
            pipe(&mut d, c);
        }
        let mut deposit_with_from = command("f", Some("a"), "b", 5, "EUR");
        deposit_with_from.kind = CommandKind::Deposit;
        pipe(&mut d, &deposit_with_from);
        assert_eq!(d.outputs_to("ledger").count(), 0);
        let dead: Vec<&OutputRecord> = d.outputs_to("dlq").collect();
        assert_eq!(dead.len(), 5);
        let reasons: Vec<&str> = dead
            .iter()
            .map(|r| header(r, dead_letter_headers::ERROR_MESSAGE).unwrap())
            .collect();
        assert!(reasons[0].contains("positive"), "{reasons:?}");
        assert!(reasons[1].contains("itself"), "{reasons:?}");
        assert!(reasons[2].contains("XYZ"), "{reasons:?}");
        assert!(reasons[3].contains("account id"), "{reasons:?}");
        assert!(reasons[4].contains("deposit"), "{reasons:?}");
        for (r, c) in dead.iter().zip(bad.iter()) {
            assert_eq!(
                header(r, dead_letter_headers::ERROR_KIND),
                Some(INVALID_COMMAND_KIND)
            );
            assert_eq!(header(r, PAYMENT_ID_HEADER), Some(c.id.as_str()));
            assert_eq!(
                r.value.as_deref(),
                Some(&serde_json::to_vec(c).unwrap()[..])
            );
        }
        assert_eq!(
            header(dead[1], dead_letter_headers::SOURCE_OFFSET),
            Some("1")
        );
        d.verify_determinism().unwrap();
    }

    #[test]
    fn undecodable_records_are_dead_lettered_by_the_framework() {
        let mut d = driver();
        d.pipe_raw(
            RawInput::new("commands")
                .key("a")
                .value(r#"{"id":"x","to":"b","amount_cents":"#)
                .header(PAYMENT_ID_HEADER, "x"),
        )
        .unwrap();
        d.pipe_raw(RawInput::new("commands").value(r#"{"id":"y"}"#))
            .unwrap();
        pipe(&mut d, &command("ok", Some("a"), "b", 1, "EUR"));
        let dead: Vec<&OutputRecord> = d.outputs_to("dlq").collect();
        assert_eq!(dead.len(), 2);
        assert_eq!(
            header(dead[0], dead_letter_headers::ERROR_KIND),
            Some("decode-value")
        );
        assert_eq!(header(dead[0], PAYMENT_ID_HEADER), Some("x"));
        assert_eq!(d.outputs_to("ledger").count(), 1);
        assert_eq!(d.verify_determinism().unwrap(), 3);
    }
}
