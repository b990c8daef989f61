//! Structural fingerprints of states and running digests of outputs.
//!
//! Both are 64-bit hashes built from a self-contained SplitMix64-style mix with fixed
//! constants: the same value gives the same hash in every process, on every machine, with every
//! Rust version (unlike `std`'s `RandomState`, which is seeded per process, or `DefaultHasher`,
//! whose algorithm may change). They detect accidental differences (a non-deterministic
//! processor), not adversaries.

use std::fmt;

use serde::ser::{self, Serialize};

use crate::processor::OutputRecord;

/// The SplitMix64 finalizer: a bijection on u64 with good avalanche.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Order-sensitive combination of a running hash with the next value.
#[inline]
fn combine(h: u64, v: u64) -> u64 {
    mix(h.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ v)
}

/// Hashes bytes in 8-byte little-endian words, then the length (so "" and "\0" differ).
fn hash_bytes(tag: u64, bytes: &[u8]) -> u64 {
    let mut h = tag;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = combine(h, u64::from_le_bytes(a));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut a = [0u8; 8];
        a[..rest.len()].copy_from_slice(rest);
        h = combine(h, u64::from_le_bytes(a));
    }
    combine(h, bytes.len() as u64)
}

// One tag per serde data-model kind, so e.g. `None`, `()` and `0u8` hash differently.
const T_BOOL: u64 = 1;
const T_INT: u64 = 2;
const T_UINT: u64 = 3;
const T_F32: u64 = 4;
const T_F64: u64 = 5;
const T_CHAR: u64 = 6;
const T_STR: u64 = 7;
const T_BYTES: u64 = 8;
const T_NONE: u64 = 9;
const T_SOME: u64 = 10;
const T_UNIT: u64 = 11;
const T_UNIT_STRUCT: u64 = 12;
const T_VARIANT: u64 = 13;
const T_NEWTYPE: u64 = 14;
const T_SEQ: u64 = 15;
const T_TUPLE: u64 = 16;
const T_MAP: u64 = 17;
const T_STRUCT: u64 = 18;
const T_ENTRY: u64 = 19;
const T_FIELD: u64 = 20;
const T_I128: u64 = 21;
const T_U128: u64 = 22;
const T_ERROR: u64 = 23;
const T_OUTPUT: u64 = 24;

/// Hash of one entry of a keyed store: the store's fingerprint is the wrapping sum of its
/// entries' hashes, so a write adjusts it in O(1) (subtract the old entry, add the new one)
/// and it does not depend on the order entries were written in.
pub(crate) fn entry_hash(key: &[u8], value: &[u8]) -> u64 {
    mix(combine(
        hash_bytes(T_ENTRY, key),
        hash_bytes(T_BYTES, value),
    ))
}

/// Structural fingerprint of a state.
///
/// Walks the value through serde: scalars and strings are hashed by value; structs, tuples and
/// enums in order, with field names and variant indices; map entries and sequence elements are
/// combined *order-insensitively* (as a multiset: a wrapping sum of mixed per-element hashes,
/// plus the length), because a `HashMap`/`HashSet` iterates in a different order in every
/// process. So any change of a value changes the fingerprint (up to 64-bit collisions), but
/// reordering the elements of a `Vec` does not.
///
/// A `Serialize` implementation that fails hashes as its error message (deterministically);
/// [`encode_state`](super::encode_state) reports the same failure as an error.
pub(crate) fn fingerprint<S: Serialize + ?Sized>(state: &S) -> u64 {
    state
        .serialize(Fingerprinter)
        .unwrap_or_else(|e| hash_bytes(T_ERROR, e.0.as_bytes()))
}

/// When a partition fingerprints its state.
///
/// A fingerprint walks the whole state, so per commit it would cost O(state size) on the commit
/// path (about 0.3 s per million entries). It is taken with every commit while that is cheap —
/// within a tenth of the commit interval — and otherwise only with full snapshots, whose
/// transactions serialize the whole state anyway. Each full snapshot measures it again: a state
/// that shrank to half the budget goes back to a fingerprint per commit. Incremental records
/// without one say so (`state_fingerprint_enabled = false`), and recovery then compares the
/// record count and the output digest only.
#[derive(Debug)]
pub(crate) struct Cadence {
    budget: std::time::Duration,
    per_commit: bool,
}

/// The most of a commit interval a per-commit fingerprint may take.
const FINGERPRINT_SHARE_OF_COMMIT_INTERVAL: u32 = 10;

impl Cadence {
    /// Fingerprints per commit until one takes more than a tenth of `commit_interval`.
    pub(crate) fn new(commit_interval: std::time::Duration) -> Self {
        Cadence {
            budget: commit_interval / FINGERPRINT_SHARE_OF_COMMIT_INTERVAL,
            per_commit: true,
        }
    }

    /// The fingerprint of `state` for the incremental record of a commit (`with_full_snapshot`:
    /// the one that points at a new full snapshot), or None when this commit goes without.
    pub(crate) fn take<S: Serialize + ?Sized>(
        &mut self,
        state: &S,
        with_full_snapshot: bool,
    ) -> Option<u64> {
        if !self.per_commit && !with_full_snapshot {
            return None;
        }
        let started = std::time::Instant::now();
        let value = fingerprint(state);
        self.measured(started.elapsed());
        Some(value)
    }

    fn measured(&mut self, took: std::time::Duration) {
        // Back to per commit only well within the budget: a state near it would otherwise
        // switch (and log) with every full snapshot.
        let cheap = if self.per_commit {
            took <= self.budget
        } else {
            took <= self.budget / 2
        };
        if cheap != self.per_commit {
            if cheap {
                tracing::info!(
                    took_ms = took.as_millis() as u64,
                    "state fingerprint cheap again: taken with every commit"
                );
            } else {
                tracing::warn!(
                    took_ms = took.as_millis() as u64,
                    budget_ms = self.budget.as_millis() as u64,
                    "the state fingerprint takes more than a tenth of the commit interval: taken with full snapshots only from now on; recovery still checks record counts and output digests (a larger commit_interval keeps it per commit)"
                );
            }
        }
        self.per_commit = cheap;
    }
}

/// Order-sensitive running digest of output records (topic, partition, key, value, headers,
/// timestamp). Continued across transactions from the value stored in the last incremental
/// snapshot, and recomputed by recovery's replay to check the outputs are reproduced too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutputDigest(u64);

impl OutputDigest {
    /// A digest continuing from `start` (0 at a full snapshot).
    pub(crate) fn new(start: u64) -> Self {
        OutputDigest(start)
    }

    /// Adds the next output record.
    pub(crate) fn update(&mut self, r: &OutputRecord) {
        let opt_bytes = |b: &Option<Vec<u8>>| match b {
            Some(b) => hash_bytes(T_SOME, b),
            None => T_NONE,
        };
        let mut h = hash_bytes(T_OUTPUT, r.topic.as_bytes());
        h = combine(
            h,
            r.partition
                .map_or(T_NONE, |p| mix(u64::from(p as u32) ^ T_SOME)),
        );
        h = combine(h, opt_bytes(&r.key));
        h = combine(h, opt_bytes(&r.value));
        h = combine(h, r.headers.len() as u64);
        for (name, value) in &r.headers {
            h = combine(h, hash_bytes(T_STR, name.as_bytes()));
            h = combine(h, hash_bytes(T_BYTES, value));
        }
        h = combine(h, r.timestamp.map_or(T_NONE, |t| mix(t as u64 ^ T_SOME)));
        self.0 = combine(self.0, h);
    }

    /// The digest so far.
    pub(crate) fn value(&self) -> u64 {
        self.0
    }
}

/// A `Serialize` implementation failed while fingerprinting.
#[derive(Debug)]
pub(crate) struct FingerprintError(String);

impl fmt::Display for FingerprintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FingerprintError {}

impl ser::Error for FingerprintError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FingerprintError(msg.to_string())
    }
}

struct Fingerprinter;

type Result<T> = std::result::Result<T, FingerprintError>;

/// Hash of one enum variant: index plus name (robust to either changing alone).
fn variant(name: &'static str, index: u32, variant: &'static str) -> u64 {
    let h = combine(hash_bytes(T_VARIANT, name.as_bytes()), u64::from(index));
    combine(h, hash_bytes(T_STR, variant.as_bytes()))
}

impl ser::Serializer for Fingerprinter {
    type Ok = u64;
    type Error = FingerprintError;
    type SerializeSeq = Unordered;
    type SerializeTuple = Ordered;
    type SerializeTupleStruct = Ordered;
    type SerializeTupleVariant = Ordered;
    type SerializeMap = Unordered;
    type SerializeStruct = Ordered;
    type SerializeStructVariant = Ordered;

    fn serialize_bool(self, v: bool) -> Result<u64> {
        Ok(combine(T_BOOL, u64::from(v)))
    }
    fn serialize_i8(self, v: i8) -> Result<u64> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i16(self, v: i16) -> Result<u64> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i32(self, v: i32) -> Result<u64> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i64(self, v: i64) -> Result<u64> {
        Ok(combine(T_INT, v as u64))
    }
    fn serialize_i128(self, v: i128) -> Result<u64> {
        Ok(combine(combine(T_I128, v as u64), (v >> 64) as u64))
    }
    fn serialize_u8(self, v: u8) -> Result<u64> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u16(self, v: u16) -> Result<u64> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u32(self, v: u32) -> Result<u64> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u64(self, v: u64) -> Result<u64> {
        Ok(combine(T_UINT, v))
    }
    fn serialize_u128(self, v: u128) -> Result<u64> {
        Ok(combine(combine(T_U128, v as u64), (v >> 64) as u64))
    }
    fn serialize_f32(self, v: f32) -> Result<u64> {
        Ok(combine(T_F32, u64::from(v.to_bits())))
    }
    fn serialize_f64(self, v: f64) -> Result<u64> {
        Ok(combine(T_F64, v.to_bits()))
    }
    fn serialize_char(self, v: char) -> Result<u64> {
        Ok(combine(T_CHAR, u64::from(v)))
    }
    fn serialize_str(self, v: &str) -> Result<u64> {
        Ok(hash_bytes(T_STR, v.as_bytes()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<u64> {
        Ok(hash_bytes(T_BYTES, v))
    }
    fn serialize_none(self) -> Result<u64> {
        Ok(mix(T_NONE))
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<u64> {
        Ok(combine(T_SOME, value.serialize(Fingerprinter)?))
    }
    fn serialize_unit(self) -> Result<u64> {
        Ok(mix(T_UNIT))
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result<u64> {
        Ok(hash_bytes(T_UNIT_STRUCT, name.as_bytes()))
    }
    fn serialize_unit_variant(
        self,
        name: &'static str,
        variant_index: u32,
        variant_name: &'static str,
    ) -> Result<u64> {
        Ok(variant(name, variant_index, variant_name))
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<u64> {
        // Transparent: wrapping a value in a newtype is not a change of the value.
        value.serialize(Fingerprinter)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        variant_index: u32,
        variant_name: &'static str,
        value: &T,
    ) -> Result<u64> {
        let v = variant(name, variant_index, variant_name);
        Ok(combine(
            combine(v, T_NEWTYPE),
            value.serialize(Fingerprinter)?,
        ))
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Unordered> {
        Ok(Unordered::new(T_SEQ))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Ordered> {
        Ok(Ordered::new(mix(T_TUPLE)))
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Ordered> {
        Ok(Ordered::new(mix(T_TUPLE)))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        variant_index: u32,
        variant_name: &'static str,
        _len: usize,
    ) -> Result<Ordered> {
        Ok(Ordered::new(combine(
            variant(name, variant_index, variant_name),
            T_TUPLE,
        )))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Unordered> {
        Ok(Unordered::new(T_MAP))
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Ordered> {
        Ok(Ordered::new(mix(T_STRUCT)))
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        variant_index: u32,
        variant_name: &'static str,
        _len: usize,
    ) -> Result<Ordered> {
        Ok(Ordered::new(combine(
            variant(name, variant_index, variant_name),
            T_STRUCT,
        )))
    }
}

/// Structs, tuples, tuple/struct variants: fields in order.
struct Ordered {
    hash: u64,
    len: u64,
}

impl Ordered {
    fn new(start: u64) -> Self {
        Ordered {
            hash: start,
            len: 0,
        }
    }
    fn push(&mut self, h: u64) {
        self.hash = combine(self.hash, h);
        self.len += 1;
    }
    fn finish(self) -> u64 {
        combine(self.hash, self.len)
    }
    fn field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<()> {
        let name = hash_bytes(T_FIELD, key.as_bytes());
        self.push(combine(name, value.serialize(Fingerprinter)?));
        Ok(())
    }
}

impl ser::SerializeTuple for Ordered {
    type Ok = u64;
    type Error = FingerprintError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.push(value.serialize(Fingerprinter)?);
        Ok(())
    }
    fn end(self) -> Result<u64> {
        Ok(self.finish())
    }
}

impl ser::SerializeTupleStruct for Ordered {
    type Ok = u64;
    type Error = FingerprintError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.push(value.serialize(Fingerprinter)?);
        Ok(())
    }
    fn end(self) -> Result<u64> {
        Ok(self.finish())
    }
}

impl ser::SerializeTupleVariant for Ordered {
    type Ok = u64;
    type Error = FingerprintError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.push(value.serialize(Fingerprinter)?);
        Ok(())
    }
    fn end(self) -> Result<u64> {
        Ok(self.finish())
    }
}

impl ser::SerializeStruct for Ordered {
    type Ok = u64;
    type Error = FingerprintError;
    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.field(key, value)
    }
    fn end(self) -> Result<u64> {
        Ok(self.finish())
    }
}

impl ser::SerializeStructVariant for Ordered {
    type Ok = u64;
    type Error = FingerprintError;
    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.field(key, value)
    }
    fn end(self) -> Result<u64> {
        Ok(self.finish())
    }
}

/// Sequences and maps: a multiset of element (or key-value entry) hashes.
struct Unordered {
    tag: u64,
    sum: u64,
    len: u64,
    pending_key: Option<u64>,
}

impl Unordered {
    fn new(tag: u64) -> Self {
        Unordered {
            tag,
            sum: 0,
            len: 0,
            pending_key: None,
        }
    }
    fn add(&mut self, h: u64) {
        // Mixing before summing keeps related elements (1, 2 vs 0, 3) from cancelling out.
        self.sum = self.sum.wrapping_add(mix(h ^ 0x5851_F42D_4C95_7F2D));
        self.len += 1;
    }
    fn finish(self) -> u64 {
        combine(combine(self.tag, self.len), self.sum)
    }
}

impl ser::SerializeSeq for Unordered {
    type Ok = u64;
    type Error = FingerprintError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.add(value.serialize(Fingerprinter)?);
        Ok(())
    }
    fn end(self) -> Result<u64> {
        Ok(self.finish())
    }
}

impl ser::SerializeMap for Unordered {
    type Ok = u64;
    type Error = FingerprintError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<()> {
        self.pending_key = Some(key.serialize(Fingerprinter)?);
        Ok(())
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| <FingerprintError as ser::Error>::custom("map value without a key"))?;
        let entry = combine(combine(T_ENTRY, key), value.serialize(Fingerprinter)?);
        self.add(entry);
        Ok(())
    }
    fn end(self) -> Result<u64> {
        Ok(self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expensive_fingerprint_moves_to_full_snapshots_and_back() {
        use std::time::Duration;
        let mut cadence = Cadence::new(Duration::from_millis(100));
        assert!(cadence.take(&1u64, false).is_some());
        // Measured above the budget (10 ms): no more per-commit fingerprints...
        cadence.measured(Duration::from_millis(300));
        assert_eq!(cadence.take(&1u64, false), None);
        // ...but one with every full snapshot, which measures again: just within the budget is
        // not enough to go back...
        cadence.measured(Duration::from_millis(8));
        assert_eq!(cadence.take(&1u64, false), None);
        // ...well within it is.
        assert_eq!(cadence.take(&1u64, true), Some(fingerprint(&1u64)));
        assert!(cadence.take(&1u64, false).is_some());
    }
    use serde::Serialize;
    use std::collections::{BTreeMap, HashMap, HashSet};

    #[derive(Serialize, Clone, Debug)]
    struct Account {
        balance: i64,
        owners: HashSet<String>,
        limits: Option<(u32, u32)>,
        kind: Kind,
    }

    #[derive(Serialize, Clone, Debug)]
    enum Kind {
        Checking,
        Savings { rate: f64 },
        Other(String),
    }

    fn state(order: &[u64]) -> HashMap<u64, Account> {
        let mut m = HashMap::new();
        for &i in order {
            m.insert(
                i,
                Account {
                    balance: i as i64 * 10 - 5,
                    owners: (0..i).map(|o| format!("owner-{o}")).collect(),
                    limits: (i % 2 == 0).then_some((i as u32, 2)),
                    kind: match i % 3 {
                        0 => Kind::Checking,
                        1 => Kind::Savings {
                            rate: i as f64 / 100.0,
                        },
                        _ => Kind::Other(format!("k{i}")),
                    },
                },
            );
        }
        m
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let a = state(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let b = state(&[10, 9, 8, 7, 6, 5, 4, 3, 2, 1]);
        let c = state(&[5, 1, 9, 3, 7, 2, 10, 4, 8, 6]);
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&c));
        // A BTreeMap with the same entries fingerprints the same (both are serde maps).
        let sorted: BTreeMap<u64, Account> = a.clone().into_iter().collect();
        assert_eq!(fingerprint(&a), fingerprint(&sorted));
    }

    #[test]
    fn fixed_value_is_stable_across_processes_and_versions() {
        // Pinned: if this changes, fingerprints written by older builds no longer match and
        // recovery after an upgrade would report a false non-determinism.
        let mut m: HashMap<String, (u32, Option<bool>)> = HashMap::new();
        m.insert("a".into(), (1, Some(true)));
        m.insert("b".into(), (2, None));
        assert_eq!(fingerprint(&m), PINNED);
        assert_eq!(fingerprint(&0u8), fingerprint(&0u64));
    }
    const PINNED: u64 = 1_793_147_287_099_204_226;

    #[test]
    fn any_value_change_changes_the_fingerprint() {
        let base = state(&[1, 2, 3, 4, 5, 6]);
        let fp = fingerprint(&base);
        let mut changes: Vec<HashMap<u64, Account>> = Vec::new();
        let mut s = base.clone();
        s.get_mut(&3).unwrap().balance += 1;
        changes.push(s);
        let mut s = base.clone();
        s.get_mut(&4).unwrap().owners.insert("new".into());
        changes.push(s);
        let mut s = base.clone();
        s.get_mut(&4).unwrap().owners.remove("owner-0");
        changes.push(s);
        let mut s = base.clone();
        s.get_mut(&2).unwrap().limits = None;
        changes.push(s);
        let mut s = base.clone();
        s.get_mut(&1).unwrap().kind = Kind::Savings { rate: 0.010000001 };
        changes.push(s);
        let mut s = base.clone();
        s.get_mut(&6).unwrap().kind = Kind::Other(String::new());
        changes.push(s);
        let mut s = base.clone();
        s.remove(&5);
        changes.push(s);
        let mut s = base.clone();
        let v = s.remove(&5).unwrap();
        s.insert(50, v); // same value under another key
        changes.push(s);
        let mut s = base.clone();
        let (a, b) = (s[&1].clone(), s[&2].clone());
        s.insert(1, b); // values swapped between keys
        s.insert(2, a);
        changes.push(s);
        let mut seen = HashSet::from([fp]);
        for (i, changed) in changes.iter().enumerate() {
            assert!(
                seen.insert(fingerprint(changed)),
                "change {i} not detected / collided"
            );
        }
    }

    #[test]
    fn kinds_are_distinguished() {
        let fps = [
            fingerprint(&()),
            fingerprint(&None::<u8>),
            fingerprint(&Some(())),
            fingerprint(&0u8),
            fingerprint(&0i8),
            fingerprint(&false),
            fingerprint(&""),
            fingerprint(&"\0"),
            fingerprint(&Vec::<u8>::new()),
            fingerprint(&HashMap::<u8, u8>::new()),
            fingerprint(&(0u8,)),
            fingerprint(&0.0f64),
            fingerprint(&-0.0f64),
            fingerprint(&u128::MAX),
            fingerprint(&vec![vec![1u8, 2], vec![3]]),
            fingerprint(&vec![vec![1u8], vec![2, 3]]),
            fingerprint(&vec![1u8, 1, 2]),
            fingerprint(&vec![1u8, 2, 2]),
            fingerprint(&(1u8, 2u8)),
            fingerprint(&(2u8, 1u8)),
        ];
        let unique: HashSet<u64> = fps.iter().copied().collect();
        assert_eq!(unique.len(), fps.len(), "{fps:x?}");
    }

    #[test]
    fn sequences_are_order_insensitive_by_design() {
        assert_eq!(fingerprint(&vec![1, 2, 3]), fingerprint(&vec![3, 1, 2]));
        let hs: HashSet<u32> = (0..100).collect();
        let v: Vec<u32> = (0..100).rev().collect();
        assert_eq!(fingerprint(&hs), fingerprint(&v));
    }

    #[test]
    fn failing_serialize_is_deterministic() {
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(
                &self,
                _: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                Err(ser::Error::custom("nope"))
            }
        }
        assert_eq!(fingerprint(&Bad), fingerprint(&Bad));
        assert_ne!(fingerprint(&Bad), fingerprint(&"nope"));
    }

    #[test]
    fn output_digest_is_order_sensitive_and_covers_every_field() {
        let base = OutputRecord::new("t")
            .key("k")
            .value("v")
            .header("h", "1")
            .timestamp(5)
            .partition(1);
        let variants = [
            base.clone(),
            OutputRecord {
                topic: "u".into(),
                ..base.clone()
            },
            OutputRecord {
                partition: None,
                ..base.clone()
            },
            OutputRecord {
                key: None,
                ..base.clone()
            },
            OutputRecord {
                key: Some(vec![]),
                ..base.clone()
            },
            OutputRecord {
                value: Some(b"w".to_vec()),
                ..base.clone()
            },
            OutputRecord {
                headers: vec![],
                ..base.clone()
            },
            OutputRecord {
                headers: vec![("h".into(), b"2".to_vec())],
                ..base.clone()
            },
            OutputRecord {
                timestamp: None,
                ..base.clone()
            },
            OutputRecord {
                timestamp: Some(6),
                ..base.clone()
            },
        ];
        let digests: HashSet<u64> = variants
            .iter()
            .map(|r| {
                let mut d = OutputDigest::new(0);
                d.update(r);
                d.value()
            })
            .collect();
        assert_eq!(digests.len(), variants.len());

        let (a, b) = (&variants[0], &variants[1]);
        let mut ab = OutputDigest::new(7);
        ab.update(a);
        ab.update(b);
        let mut ba = OutputDigest::new(7);
        ba.update(b);
        ba.update(a);
        assert_ne!(ab.value(), ba.value());
        // Continuing from a stored value gives the same result as one long run.
        let mut first = OutputDigest::new(7);
        first.update(a);
        let mut resumed = OutputDigest::new(first.value());
        resumed.update(b);
        assert_eq!(resumed.value(), ab.value());
    }
}
