//! Formats: how record keys and values are turned into Rust values and back.
//!
//! A [`Processor`](crate::Processor) names one [`Format`] for its input keys and one for its
//! input values; the runtime decodes every record with them before calling `process`, so the
//! processor sees typed values. Outputs are encoded the same way (see
//! [`Output::send_as`](crate::Output::send_as) and [`Output::send_json`](crate::Output::send_json)).
//!
//! Built-in formats: [`Raw`], [`Utf8`], [`Json<T>`]; how each treats absent (null) keys and
//! values is tabled on [`Format`], the public page. Implement [`Format`] yourself for anything
//! else (protobuf, Avro, ...).

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

/// How a Rust value becomes the bytes of a record key or value: the half of a [`Format`]
/// that [`Output::send_as`](crate::Output::send_as) needs. [`Json<T>`] encodes any
/// `T: Serialize` (borrowed values too: `Json<&String>`), while decoding needs
/// `T: DeserializeOwned`.
pub trait Encode {
    /// The value to encode.
    type Item;
    /// Encodes a key or value; `Ok(None)` = absent (null).
    fn encode(item: &Self::Item) -> Result<Option<Vec<u8>>, EncodeError>;
}

/// How the bytes of a record key or value map to a Rust value, and back ([`Encode`]).
///
/// `None` bytes stand for an absent (null) key or value, e.g. a tombstone.
///
/// # Absent (null) keys and values
///
/// A Kafka record may have no key or no value at all (null; a null value is a tombstone),
/// which is not the same as an empty one (zero bytes). The built-in formats treat null so:
///
/// | format | `Item` | a null key/value decodes to (what [`Record::key`] / [`Record::value`] give) | encodes to null |
/// |---|---|---|---|
/// | [`Raw`] | `Option<Vec<u8>>` | `None` | `None` |
/// | [`Utf8`] | `String` | [`DecodeError::Null`] | never (`""` is an empty key/value, not a null one) |
/// | [`Json<T>`] | `T` | `T` read from JSON `null`: `None` for `Option<_>`, `()` for `()`, `Value::Null` for `serde_json::Value`; [`DecodeError::Null`] for any other `T` | every item that serializes to JSON `null` (`None`, `()`, `Value::Null`) |
///
/// A record whose key or value does not decode never reaches
/// [`Processor::process`]: the runtime (and [`TestDriver`]) hands it to the configured
/// [`ErrorPolicy`] as a [`RecordError::Decode`] (kind `decode-key` or `decode-value`); the
/// default policy, `Fail`, stops the partition. So a topic with tombstones or keyless records
/// needs a format that decodes null for that part (`Raw`, `Json<Option<_>>`, ...).
///
/// `Json<T>` decodes a value of the four bytes `null` just like an absent one;
/// [`Record::raw_key`] / [`Record::raw_value`] tell them apart. Empty bytes decode to
/// `Some(vec![])` with `Raw`, to `""` with `Utf8`, and fail with `Json<T>` (not JSON).
///
/// [`Output::send_json`] does not use a format: it always writes a key and a value, so `None`
/// becomes the bytes `null`. Write a tombstone with [`Output::send_as`] and a format that
/// encodes to null, or with an [`OutputRecord`] without a value.
///
/// ```
/// use exactly::{DecodeError, Encode, Format, Json, Output, Raw, Utf8};
///
/// assert_eq!(Raw::decode(None).unwrap(), None);
/// assert_eq!(Raw::encode(&None).unwrap(), None);
/// assert!(matches!(Utf8::decode(None), Err(DecodeError::Null { .. })));
/// assert_eq!(Utf8::encode(&String::new()).unwrap(), Some(vec![]));
/// assert_eq!(Json::<Option<u32>>::decode(None).unwrap(), None);
/// assert_eq!(Json::<Option<u32>>::decode(Some(b"null")).unwrap(), None);
/// assert_eq!(Json::<serde_json::Value>::decode(None).unwrap(), serde_json::Value::Null);
/// assert!(matches!(Json::<u32>::decode(None), Err(DecodeError::Null { .. })));
/// assert_eq!(Json::<Option<u32>>::encode(&None).unwrap(), None);
///
/// let mut out = Output::new();
/// out.send_json("t", "k", &None::<u32>).unwrap();
/// assert_eq!(out.records()[0].value.as_deref(), Some(&b"null"[..]));
/// out.send_as::<Utf8, Json<Option<u32>>>("t", &"k".to_string(), &None).unwrap();
/// assert_eq!(out.records()[1].value, None); // a tombstone
/// ```
///
/// [`Record::key`]: crate::Record::key
/// [`Record::value`]: crate::Record::value
/// [`Record::raw_key`]: crate::Record::raw_key
/// [`Record::raw_value`]: crate::Record::raw_value
/// [`Processor::process`]: crate::Processor::process
/// [`TestDriver`]: crate::testing::TestDriver
/// [`ErrorPolicy`]: crate::ErrorPolicy
/// [`RecordError::Decode`]: crate::RecordError::Decode
/// [`Output::send_json`]: crate::Output::send_json
/// [`Output::send_as`]: crate::Output::send_as
/// [`OutputRecord`]: crate::OutputRecord
///
/// # Your own format
///
/// ```
/// use exactly::{DecodeError, Encode, EncodeError, Format};
///
/// /// Big-endian u64 keys.
/// struct U64Be;
///
/// impl Encode for U64Be {
///     type Item = u64;
///     fn encode(item: &u64) -> Result<Option<Vec<u8>>, EncodeError> {
///         Ok(Some(item.to_be_bytes().to_vec()))
///     }
/// }
///
/// impl Format for U64Be {
///     fn decode(bytes: Option<&[u8]>) -> Result<u64, DecodeError> {
///         let bytes = bytes.ok_or(DecodeError::Null { expected: "an 8-byte key" })?;
///         let array: [u8; 8] = bytes.try_into().map_err(|_| {
///             DecodeError::custom(format!("expected 8 bytes, got {}", bytes.len()))
///         })?;
///         Ok(u64::from_be_bytes(array))
///     }
/// }
///
/// assert_eq!(U64Be::decode(Some(&[0, 0, 0, 0, 0, 0, 1, 2])).unwrap(), 258);
/// assert!(U64Be::decode(None).is_err());
/// ```
pub trait Format: Encode {
    /// Decodes a key or value; `None` = absent (null).
    fn decode(bytes: Option<&[u8]>) -> Result<Self::Item, DecodeError>;
}

/// The bytes as they are: `Item = Option<Vec<u8>>` (`None` = absent/null).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Encode for Raw {
    type Item = Option<Vec<u8>>;
    fn encode(item: &Self::Item) -> Result<Option<Vec<u8>>, EncodeError> {
        Ok(item.clone())
    }
}

impl Format for Raw {
    fn decode(bytes: Option<&[u8]>) -> Result<Self::Item, DecodeError> {
        Ok(bytes.map(<[u8]>::to_vec))
    }
}

/// UTF-8 text: `Item = String`. An absent (null) key/value is a decode error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Encode for Utf8 {
    type Item = String;
    fn encode(item: &String) -> Result<Option<Vec<u8>>, EncodeError> {
        Ok(Some(item.as_bytes().to_vec()))
    }
}

impl Format for Utf8 {
    fn decode(bytes: Option<&[u8]>) -> Result<String, DecodeError> {
        let bytes = bytes.ok_or(DecodeError::Null {
            expected: "UTF-8 text",
        })?;
        Ok(std::str::from_utf8(bytes)?.to_owned())
    }
}

/// JSON via serde_json: `Item = T`.
///
/// An absent (null) key/value decodes as JSON `null`, so `Json<Option<T>>` reads it as `None`
/// and types that JSON `null` does not deserialize into report [`DecodeError::Null`].
/// Symmetrically, a key or value that encodes to JSON `null` (e.g. `None`) is written as an
/// absent one (a null value is a tombstone). See the table on [`Format`].
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

impl<T: Serialize> Encode for Json<T> {
    type Item = T;
    fn encode(item: &T) -> Result<Option<Vec<u8>>, EncodeError> {
        let bytes = to_json(item)?;
        Ok(if bytes == b"null" { None } else { Some(bytes) })
    }
}

impl<T: Serialize + DeserializeOwned> Format for Json<T> {
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
}

/// JSON-encodes any serializable value, naming the type on failure.
pub(crate) fn to_json<T: Serialize + ?Sized>(item: &T) -> Result<Vec<u8>, EncodeError> {
    serde_json::to_vec(item).map_err(|source| EncodeError::Json {
        type_name: std::any::type_name::<T>(),
        source,
    })
}

/// A key for [`Output::send_json`](crate::Output::send_json): text keys as their UTF-8 bytes
/// (`ada`, not `"ada"`: what other clients write and expect), any other key as JSON.
pub(crate) fn json_key<K: Serialize + ?Sized>(key: &K) -> Result<Vec<u8>, EncodeError> {
    let json = to_json(key)?;
    if json.first() == Some(&b'"') {
        if let Ok(text) = serde_json::from_slice::<String>(&json) {
            return Ok(text.into_bytes());
        }
    }
    Ok(json)
}

/// Reads a key written by [`json_key`]: JSON, or else text as a JSON string.
pub(crate) fn decode_json_key<K: Serialize + DeserializeOwned>(
    bytes: Option<&[u8]>,
) -> Result<K, DecodeError> {
    let json_error = match Json::<K>::decode(bytes) {
        Ok(key) => return Ok(key),
        Err(error) => error,
    };
    let text = std::str::from_utf8(bytes.unwrap_or_default()).map_err(|_| json_error)?;
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|source| {
        DecodeError::Json {
            type_name: std::any::type_name::<K>(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn json_keys_are_text_when_they_are_text() {
        assert_eq!(json_key("ada").unwrap(), b"ada");
        assert_eq!(json_key(&"a \"b\"".to_string()).unwrap(), b"a \"b\"");
        assert_eq!(json_key(&42u32).unwrap(), b"42");
        assert_eq!(json_key(&("a", 1)).unwrap(), br#"["a",1]"#);
        assert_eq!(decode_json_key::<String>(Some(b"ada")).unwrap(), "ada");
        assert_eq!(decode_json_key::<String>(Some(b"42")).unwrap(), "42");
        assert_eq!(decode_json_key::<u32>(Some(b"42")).unwrap(), 42);
        assert_eq!(
            decode_json_key::<(String, u8)>(Some(br#"["a",1]"#)).unwrap(),
            ("a".to_string(), 1)
        );
        assert!(decode_json_key::<u32>(Some(b"ada")).is_err());
    }

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
