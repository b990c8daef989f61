//! Formats: how record keys and values are turned into Rust values and back.
//!
//! A [`Processor`](crate::Processor) names one [`Format`] for its input keys and one for its
//! input values; the runtime decodes every record with them before calling `process`, so the
//! processor sees typed values. Outputs are encoded the same way (see
//! [`Output::send_as`](crate::Output::send_as) and [`Output::send_json`](crate::Output::send_json)).
//!
//! Built-in formats:
//!
//! | format | `Item` | absent (null) key/value |
//! |---|---|---|
//! | [`Raw`] | `Option<Vec<u8>>` | `None` |
//! | [`Utf8`] | `String` | decode error |
//! | [`Json<T>`] | `T` | `T` is decoded from JSON `null`: fine for `Option<_>`, `()` and the like, a decode error otherwise |
//!
//! Implement [`Format`] yourself for anything else (protobuf, Avro, ...).

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Error boxed inside [`DecodeError::Custom`] / [`EncodeError::Custom`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A key or value could not be decoded.
///
/// The runtime wraps it in a [`RecordError::Decode`](crate::RecordError::Decode) that names the
/// topic, partition and offset of the record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record has no key/value (null) and the format needs one.
    #[error("expected {expected} but it is absent (null)")]
    Null {
        /// What the format expected, e.g. "UTF-8 text".
        expected: &'static str,
    },
    /// The bytes are not valid UTF-8.
    #[error("not valid UTF-8: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    /// The bytes are not valid JSON for the expected type.
    #[error("invalid JSON for {type_name}: {source}")]
    Json {
        /// The Rust type the JSON was decoded into.
        type_name: &'static str,
        /// What serde_json reported (includes line and column).
        #[source]
        source: serde_json::Error,
    },
    /// Raised by a user-defined [`Format`].
    #[error("{0}")]
    Custom(BoxError),
}

impl DecodeError {
    /// Wraps an error of a user-defined [`Format`].
    pub fn custom(error: impl Into<BoxError>) -> Self {
        DecodeError::Custom(error.into())
    }
}

/// A key or value could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// serde_json refused the value (e.g. a map with non-string keys).
    #[error("cannot encode {type_name} as JSON: {source}")]
    Json {
        /// The Rust type that was encoded.
        type_name: &'static str,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },
    /// Raised by a user-defined [`Format`].
    #[error("{0}")]
    Custom(BoxError),
}

impl EncodeError {
    /// Wraps an error of a user-defined [`Format`].
    pub fn custom(error: impl Into<BoxError>) -> Self {
        EncodeError::Custom(error.into())
    }
}

/// How the bytes of a record key or value map to a Rust value.
///
/// `None` bytes stand for an absent (null) key or value, e.g. a tombstone.
///
/// ```
/// use exactly::{DecodeError, EncodeError, Format};
///
/// /// Big-endian u64 keys.
/// struct U64Be;
///
/// impl Format for U64Be {
///     type Item = u64;
///     fn decode(bytes: Option<&[u8]>) -> Result<u64, DecodeError> {
///         let bytes = bytes.ok_or(DecodeError::Null { expected: "an 8-byte key" })?;
///         let array: [u8; 8] = bytes.try_into().map_err(|_| {
///             DecodeError::custom(format!("expected 8 bytes, got {}", bytes.len()))
///         })?;
///         Ok(u64::from_be_bytes(array))
///     }
///     fn encode(item: &u64) -> Result<Option<Vec<u8>>, EncodeError> {
///         Ok(Some(item.to_be_bytes().to_vec()))
///     }
/// }
///
/// assert_eq!(U64Be::decode(Some(&[0, 0, 0, 0, 0, 0, 1, 2])).unwrap(), 258);
/// assert!(U64Be::decode(None).is_err());
/// ```
pub trait Format {
    /// The decoded value.
    type Item;
    /// Decodes a key or value; `None` = absent (null).
    fn decode(bytes: Option<&[u8]>) -> Result<Self::Item, DecodeError>;
    /// Encodes a key or value; `Ok(None)` = absent (null).
    fn encode(item: &Self::Item) -> Result<Option<Vec<u8>>, EncodeError>;
}

/// The bytes as they are: `Item = Option<Vec<u8>>` (`None` = absent/null).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Format for Raw {
    type Item = Option<Vec<u8>>;
    fn decode(bytes: Option<&[u8]>) -> Result<Self::Item, DecodeError> {
        Ok(bytes.map(<[u8]>::to_vec))
    }
    fn encode(item: &Self::Item) -> Result<Option<Vec<u8>>, EncodeError> {
        Ok(item.clone())
    }
}

/// UTF-8 text: `Item = String`. An absent (null) key/value is a decode error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Format for Utf8 {
    type Item = String;
    fn decode(bytes: Option<&[u8]>) -> Result<String, DecodeError> {
        let bytes = bytes.ok_or(DecodeError::Null {
            expected: "UTF-8 text",
        })?;
        Ok(std::str::from_utf8(bytes)?.to_owned())
    }
    fn encode(item: &String) -> Result<Option<Vec<u8>>, EncodeError> {
        Ok(Some(item.as_bytes().to_vec()))
    }
}

/// JSON via serde_json: `Item = T`.
///
/// An absent (null) key/value decodes as JSON `null`, so `Json<Option<T>>` reads it as `None`
/// and other types report [`DecodeError::Null`]. Symmetrically, a value that encodes to JSON
/// `null` (e.g. `None`) is written as an absent value (a tombstone).
///
/// ```
/// use exactly::{Format, Json};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Payment { account: String, cents: i64 }
///
/// let p = Json::<Payment>::decode(Some(br#"{"account":"a-1","cents":250}"#)).unwrap();
/// assert_eq!(p, Payment { account: "a-1".into(), cents: 250 });
/// assert_eq!(Json::<Option<Payment>>::decode(None).unwrap(), None);
/// assert!(Json::<Payment>::decode(None).is_err());
/// ```
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T> fmt::Debug for Json<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Json<{}>", std::any::type_name::<T>())
    }
}

impl<T: Serialize + DeserializeOwned> Format for Json<T> {
    type Item = T;
    fn decode(bytes: Option<&[u8]>) -> Result<T, DecodeError> {
        match bytes {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|source| DecodeError::Json {
                type_name: std::any::type_name::<T>(),
                source,
            }),
            None => serde_json::from_slice(b"null").map_err(|_| DecodeError::Null {
                expected: std::any::type_name::<T>(),
            }),
        }
    }
    fn encode(item: &T) -> Result<Option<Vec<u8>>, EncodeError> {
        let bytes = to_json(item)?;
        Ok(if bytes == b"null" { None } else { Some(bytes) })
    }
}

/// JSON-encodes any serializable value, naming the type on failure.
pub(crate) fn to_json<T: Serialize + ?Sized>(item: &T) -> Result<Vec<u8>, EncodeError> {
    serde_json::to_vec(item).map_err(|source| EncodeError::Json {
        type_name: std::any::type_name::<T>(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn raw_round_trips_including_null() {
        assert_eq!(Raw::decode(None).unwrap(), None);
        assert_eq!(Raw::decode(Some(b"ab")).unwrap(), Some(b"ab".to_vec()));
        assert_eq!(Raw::encode(&None).unwrap(), None);
        assert_eq!(Raw::encode(&Some(vec![1])).unwrap(), Some(vec![1]));
    }

    #[test]
    fn utf8_rejects_null_and_invalid_bytes() {
        assert_eq!(Utf8::decode(Some("héllo".as_bytes())).unwrap(), "héllo");
        assert!(matches!(Utf8::decode(None), Err(DecodeError::Null { .. })));
        let err = Utf8::decode(Some(&[0xff, 0xfe])).unwrap_err();
        assert!(matches!(err, DecodeError::Utf8(_)), "{err}");
        assert_eq!(Utf8::encode(&"x".to_string()).unwrap(), Some(b"x".to_vec()));
    }

    #[test]
    fn json_names_the_type_on_error() {
        let err = Json::<u64>::decode(Some(b"\"nope\"")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("u64"), "{msg}");
        let err = Json::<u64>::decode(None).unwrap_err();
        assert!(
            matches!(err, DecodeError::Null { expected: "u64" }),
            "{err}"
        );
    }

    #[test]
    fn json_null_maps_to_absent_both_ways() {
        assert_eq!(Json::<Option<u8>>::decode(None).unwrap(), None);
        assert_eq!(Json::<Option<u8>>::encode(&None).unwrap(), None);
        assert_eq!(
            Json::<Option<u8>>::encode(&Some(3)).unwrap(),
            Some(b"3".to_vec())
        );
    }

    #[test]
    fn json_encode_error_names_the_type() {
        // serde_json refuses maps whose keys are not strings/numbers.
        let mut m: HashMap<(u8, u8), u8> = HashMap::new();
        m.insert((1, 2), 3);
        let err = Json::<HashMap<(u8, u8), u8>>::encode(&m).unwrap_err();
        assert!(err.to_string().contains("HashMap"), "{err}");
    }
}
