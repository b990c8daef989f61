//! The payments domain shared by the three services: the records on every topic of the chain
//! (all JSON) and the validation rules of a payment command.
//!
//! ```text
//!  payments.commands ──A validate──► payments.ledger ──B ledger──► payments.balances ──C stats──► payments.stats
//!   (PaymentCommand,      │           (Transfer legs,   │  ▲        (BalanceChanged,              (AccountSummary,
//!    key = owner acct)    │            key = account)   │  │         key = account)                key = account)
//!                         ▼                             │  └─ credit legs of accepted debits
//!                 payments.dead-letters                 ▼
//!                 (original record + headers)     payments.rejections (Rejection, key = account)
//! ```

use serde::{Deserialize, Serialize};

/// Currencies the bank keeps accounts in; a command in any other currency is invalid.
pub const KNOWN_CURRENCIES: &[&str] = &["EUR", "USD", "GBP", "CHF", "JPY"];

/// Longest account id accepted.
pub const MAX_ACCOUNT_ID_LEN: usize = 64;

/// Header every producer of payment commands sets to the command id, so that even a command
/// whose value is unreadable can be traced (dead letters keep the original headers).
pub const PAYMENT_ID_HEADER: &str = "payment-id";

/// What a payment command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Move money from `from` to `to`.
    #[default]
    Transfer,
    /// Money enters the bank into `to` (cash, an incoming wire); `from` must be absent.
    Deposit,
}

/// A payment command as clients submit it (input of `validate`).
///
/// ```
/// use exactly_examples::payments::PaymentCommand;
///
/// let c: PaymentCommand = serde_json::from_str(
///     r#"{"id":"p-1","from":"alice","to":"bob","amount_cents":250,"currency":"EUR","ts":1700000000000}"#,
/// ).unwrap();
/// assert_eq!(c.owner_account(), Some("alice"));
/// assert!(c.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCommand {
    /// Unique command id (idempotency key of the client).
    pub id: String,
    /// Transfer (default) or deposit.
    #[serde(default)]
    pub kind: CommandKind,
    /// Debited account (transfers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Credited account.
    pub to: String,
    /// Amount in the currency's minor unit; must be positive.
    pub amount_cents: i64,
    /// ISO 4217 code, one of [`KNOWN_CURRENCIES`].
    pub currency: String,
    /// When the client issued the command (ms since the Unix epoch).
    pub ts: i64,
}

/// Why a command is refused by `validate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCommand {
    /// The id is empty.
    #[error("command id is empty")]
    EmptyId,
    /// Zero or negative amount.
    #[error("amount_cents must be positive, got {0}")]
    NonPositiveAmount(i64),
    /// Currency not in [`KNOWN_CURRENCIES`].
    #[error("unknown currency {0:?}")]
    UnknownCurrency(String),
    /// A transfer without `from`.
    #[error("a transfer needs a `from` account")]
    MissingFrom,
    /// A deposit with `from`.
    #[error("a deposit must not have a `from` account (got {0:?})")]
    DepositWithFrom(String),
    /// `from == to`.
    #[error("transfer from account {0:?} to itself")]
    SameAccount(String),
    /// An empty, too long or whitespace-containing account id.
    #[error(
        "invalid account id {0:?}: must be 1..={MAX_ACCOUNT_ID_LEN} characters without whitespace"
    )]
    BadAccount(String),
}

fn check_account(account: &str) -> Result<(), InvalidCommand> {
    if account.is_empty()
        || account.len() > MAX_ACCOUNT_ID_LEN
        || account.chars().any(char::is_whitespace)
    {
        return Err(InvalidCommand::BadAccount(account.to_owned()));
    }
    Ok(())
}

impl PaymentCommand {
    /// The business rules of a command, independent of any balance.
    pub fn validate(&self) -> Result<(), InvalidCommand> {
        if self.id.is_empty() {
            return Err(InvalidCommand::EmptyId);
        }
        if self.amount_cents <= 0 {
            return Err(InvalidCommand::NonPositiveAmount(self.amount_cents));
        }
        if !KNOWN_CURRENCIES.contains(&self.currency.as_str()) {
            return Err(InvalidCommand::UnknownCurrency(self.currency.clone()));
        }
        check_account(&self.to)?;
        match (self.kind, &self.from) {
            (CommandKind::Transfer, None) => Err(InvalidCommand::MissingFrom),
            (CommandKind::Transfer, Some(from)) => {
                check_account(from)?;
                if *from == self.to {
                    return Err(InvalidCommand::SameAccount(from.clone()));
                }
                Ok(())
            }
            (CommandKind::Deposit, Some(from)) => {
                Err(InvalidCommand::DepositWithFrom(from.clone()))
            }
            (CommandKind::Deposit, None) => Ok(()),
        }
    }

    /// The account whose balance the command acts on first: `from` of a transfer, `to` of a
    /// deposit. Producers key commands by it, so that one account's commands stay in order.
    pub fn owner_account(&self) -> Option<&str> {
        match self.kind {
            CommandKind::Transfer => self.from.as_deref(),
            CommandKind::Deposit => Some(&self.to),
        }
    }

    /// The first ledger leg of a valid command: the debit of a transfer (keyed by `from`), or
    /// the credit of a deposit (keyed by `to`). `None` for an invalid command.
    pub fn first_leg(&self) -> Option<Transfer> {
        self.validate().ok()?;
        Some(match self.kind {
            CommandKind::Transfer => Transfer {
                id: self.id.clone(),
                leg: Leg::Debit,
                account: self.from.clone()?,
                counterparty: Some(self.to.clone()),
                amount_cents: self.amount_cents,
                currency: self.currency.clone(),
                ts: self.ts,
            },
            CommandKind::Deposit => Transfer {
                id: self.id.clone(),
                leg: Leg::Credit,
                account: self.to.clone(),
                counterparty: None,
                amount_cents: self.amount_cents,
                currency: self.currency.clone(),
                ts: self.ts,
            },
        })
    }
}

/// Which side of a transfer a ledger record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Leg {
    /// Money leaves `account` (may be refused for insufficient funds).
    Debit,
    /// Money enters `account` (always applied).
    Credit,
}

impl Leg {
    /// `"debit"` or `"credit"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Debit => "debit",
            Leg::Credit => "credit",
        }
    }
}

/// One leg of a validated transfer, keyed by `account` (input of `ledger`).
///
/// `validate` emits the debit leg of a transfer (or the credit leg of a deposit); `ledger`
/// emits the credit leg of a transfer once its debit succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The payment command's id.
    pub id: String,
    /// Debit or credit.
    pub leg: Leg,
    /// The account this leg changes (also the record key).
    pub account: String,
    /// The other account of a transfer; `None` for a deposit.
    pub counterparty: Option<String>,
    /// Positive amount in minor units.
    pub amount_cents: i64,
    /// Currency.
    pub currency: String,
    /// The command's timestamp.
    pub ts: i64,
}

impl Transfer {
    /// Unique id of this leg: `<command id>:<debit|credit>`.
    pub fn leg_id(&self) -> String {
        leg_id(&self.id, self.leg)
    }
}

/// `<command id>:<debit|credit>`: the unique id of one leg and of the events it causes.
pub fn leg_id(command_id: &str, leg: Leg) -> String {
    format!("{command_id}:{}", leg.as_str())
}

/// An applied leg: the account's new balance (output of `ledger`, keyed by `account`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceChanged {
    /// The payment command's id.
    pub id: String,
    /// Which leg was applied.
    pub leg: Leg,
    /// The account (also the record key).
    pub account: String,
    /// Currency of the balance.
    pub currency: String,
    /// Signed change: negative for a debit.
    pub delta_cents: i64,
    /// Balance in `currency` after the change.
    pub balance_cents: i64,
    /// Number of balance changes of this account so far (all currencies), starting at 1:
    /// orders the events of one account.
    pub version: u64,
    /// The command's timestamp.
    pub ts: i64,
}

/// A command refused by the ledger (output of `ledger`, keyed by `account`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The payment command's id.
    pub id: String,
    /// The account that could not pay.
    pub account: String,
    /// Requested amount.
    pub amount_cents: i64,
    /// Currency.
    pub currency: String,
    /// The account's balance when it was refused.
    pub balance_cents: i64,
    /// Human-readable reason.
    pub reason: String,
    /// The command's timestamp.
    pub ts: i64,
}

/// Running totals of one account in one currency (output of `stats`, keyed by `account`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSummary {
    /// The account (also the record key).
    pub account: String,
    /// Currency of the totals.
    pub currency: String,
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
    /// Balance events of this account seen so far (all currencies): orders the summaries.
    pub updates: u64,
    /// Leg id (`<command id>:<leg>`) of the balance event that caused this summary.
    pub event: String,
}
