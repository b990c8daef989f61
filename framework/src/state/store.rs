//! [`Store`], the typed handle a processor's state holds, and [`StoreSet`], the runtime's
//! side of one partition's stores: their open-transaction overlays, the per-record
//! savepoint, and the commit into the [`Backend`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::backend::{end_of_store, full_key, Backend, Write, META_STORE};
use super::StoreError;
use crate::codec::Format;
use crate::snapshot::fingerprint::entry_hash;

/// A keyed state store: a map from `K` to `V` (each typed through its [`Format`]) that a
/// processor's `State` holds, kept by the runtime in RocksDB on local disk, one database per
/// input partition under [`AppConfig::state_dir`](crate::AppConfig::state_dir).
///
/// Use it for state too large to serialize whole with every full snapshot or to keep in
/// memory: reads go to RocksDB (through an in-memory overlay of the open transaction's
/// writes), and a commit writes only what changed, in one RocksDB write batch together with
/// the committed input position, after the Kafka transaction committed. So:
///
/// - an aborted transaction leaves nothing behind in the store;
/// - a record that fails under [`ErrorPolicy::Skip`](crate::ErrorPolicy::Skip) or
///   `DeadLetter` leaves no trace either: its writes are rolled back;
/// - after a crash or a restart on the same machine the partition resumes from its local
///   store and replays only the input since its last commit (a *warm* restart); elsewhere it
///   restores the store from its full snapshot on Kafka;
/// - the state fingerprint covers the store at O(1) per write (a running sum of entry hashes).
///
/// Entries are ordered by their *encoded* key bytes ([`Utf8`](crate::Utf8) keys sort as
/// strings; [`Json`](crate::Json) numbers do not sort numerically). Everything else in the
/// `State` is serialized with every commit to the local store: keep it small.
///
/// Outside the runtime (in unit tests of your own) a `Store` keeps its entries in memory.
///
/// ```
/// use exactly::testing::TestDriver;
/// use exactly::{Json, Output, ProcessError, Processor, Record, Store, Utf8};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Balances {
///     cents: Store<Utf8, Json<i64>>,
/// }
///
/// struct Ledger;
/// impl Processor for Ledger {
///     type State = Balances;
///     type Key = Utf8;
///     type Value = Json<i64>;
///     fn process(&self, state: &mut Balances, payment: &Record<'_, String, i64>,
///                out: &mut Output) -> Result<(), ProcessError> {
///         let balance = state.cents.get(payment.key())?.unwrap_or(0) + payment.value();
///         state.cents.put(payment.key(), &balance)?;
///         out.send_json("balances", payment.key(), &balance)?;
///         Ok(())
///     }
/// }
///
/// let mut driver = TestDriver::new(Ledger);
/// driver.pipe("payments", &"ada".to_string(), &500).unwrap();
/// driver.pipe("payments", &"ada".to_string(), &-200).unwrap();
/// let balances = &driver.state("payments", 0).unwrap().cents;
/// assert_eq!(balances.get(&"ada".to_string()).unwrap(), Some(300));
/// driver.verify_determinism().unwrap(); // the store survives a snapshot and a replay
/// ```
pub struct Store<K: Format, V: Format> {
    core: Arc<Mutex<Core>>,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K: Format, V: Format> Store<K, V> {
    /// The value stored under `key`, if any.
    pub fn get(&self, key: &K::Item) -> Result<Option<V::Item>, StoreError> {
        let key = encode_key::<K>(key)?;
        let value = self.core().lookup(&key)?;
        value
            .map(|bytes| V::decode(Some(&bytes)).map_err(StoreError::Decode))
            .transpose()
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &K::Item) -> Result<bool, StoreError> {
        let key = encode_key::<K>(key)?;
        Ok(self.core().lookup(&key)?.is_some())
    }

    /// Stores `value` under `key`, replacing what was there.
    pub fn put(&mut self, key: &K::Item, value: &V::Item) -> Result<(), StoreError> {
        let key = encode_key::<K>(key)?;
        let value = V::encode(value)?.unwrap_or_default();
        self.core().write(key, Some(value))
    }

    /// Removes `key`; `true` if it had a value.
    pub fn delete(&mut self, key: &K::Item) -> Result<bool, StoreError> {
        let key = encode_key::<K>(key)?;
        let mut core = self.core();
        let existed = core.lookup(&key)?.is_some();
        if existed {
            core.write(key, None)?;
        }
        Ok(existed)
    }

    /// The entries whose keys lie in `range`, in encoded-key order.
    ///
    /// ```
    /// # use exactly::{Store, Utf8, Json};
    /// let mut cards: Store<Utf8, Json<u32>> = Store::default();
    /// for (card, n) in [("a1", 1), ("b1", 2), ("b2", 3), ("c1", 4)] {
    ///     cards.put(&card.to_string(), &n).unwrap();
    /// }
    /// let bs = cards.range("b".to_string().."c".to_string()).unwrap();
    /// assert_eq!(bs, [("b1".to_string(), 2), ("b2".to_string(), 3)]);
    /// ```
    pub fn range<R: RangeBounds<K::Item>>(&self, range: R) -> Result<Entries<K, V>, StoreError> {
        let bound = |b: Bound<&K::Item>| -> Result<Bound<Vec<u8>>, StoreError> {
            Ok(match b {
                Bound::Included(k) => Bound::Included(encode_key::<K>(k)?),
                Bound::Excluded(k) => Bound::Excluded(encode_key::<K>(k)?),
                Bound::Unbounded => Bound::Unbounded,
            })
        };
        let (from, to) = (bound(range.start_bound())?, bound(range.end_bound())?);
        let entries = self.core().range(from, to)?;
        entries
            .into_iter()
            .map(|(k, v)| {
                let key = K::decode(Some(&k)).map_err(StoreError::Decode)?;
                let value = V::decode(Some(&v)).map_err(StoreError::Decode)?;
                Ok((key, value))
            })
            .collect()
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.core().count
    }

    /// Whether the store has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }
}

fn encode_key<K: Format>(key: &K::Item) -> Result<Vec<u8>, StoreError> {
    K::encode(key)?.ok_or(StoreError::AbsentKey)
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<K: Format, V: Format> Default for Store<K, V> {
    /// A new, empty store: in the partition's local database when the runtime builds the
    /// state, else in memory.
    fn default() -> Self {
        Store {
            core: StoreSet::current_or_memory().attach(None, false),
            _types: PhantomData,
        }
    }
}

impl<K: Format, V: Format> fmt::Debug for Store<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = self.core();
        f.debug_struct("Store")
            .field("id", &core.id)
            .field("entries", &core.count)
            .field("fingerprint", &format_args!("{:#018x}", core.fingerprint))
            .finish()
    }
}

/// What a store serializes as inside the state: which store it is, and a summary of its
/// entries (checked against the entries when a snapshot is restored, and part of the state
/// fingerprint). The entries themselves travel beside the state (see `state::image`).
#[derive(Serialize, Deserialize)]
pub(super) struct Descriptor {
    pub(super) store: u32,
    pub(super) entries: u64,
    pub(super) fingerprint: u64,
}

impl<K: Format, V: Format> Serialize for Store<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let core = self.core();
        Descriptor {
            store: core.id,
            entries: core.count,
            fingerprint: core.fingerprint,
        }
        .serialize(serializer)
    }
}

impl<'de, K: Format, V: Format> Deserialize<'de> for Store<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let descriptor = Descriptor::deserialize(deserializer)?;
        if descriptor.store == META_STORE {
            return Err(serde::de::Error::custom("store id out of range"));
        }
        Ok(Store {
            core: StoreSet::current_or_memory().attach(Some(descriptor), false),
            _types: PhantomData,
        })
    }
}

/// Decoded entries of a [`Store`], in key order.
pub type Entries<K, V> = Vec<(<K as crate::Encode>::Item, <V as crate::Encode>::Item)>;
/// An encoded entry (key, value).
pub(super) type RawEntry = (Vec<u8>, Vec<u8>);
/// Encoded entries in key order.
type RawEntries = Vec<RawEntry>;
/// A key and the overlay entry a write replaced (`None`: there was none).
type Undo = (Vec<u8>, Option<Option<Vec<u8>>>);

/// One store's side of the runtime: its open-transaction overlay and running summary.
pub(crate) struct Core {
    pub(super) id: u32,
    backend: Backend,
    /// Writes of the open transaction, by full key; `None` is a delete.
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Undo log of the record being processed: the overlay entry each write replaced.
    undo: Vec<Undo>,
    /// Entries and fingerprint as of the savepoint (the start of the current record).
    saved: (u64, u64),
    /// Entries and fingerprint including the overlay.
    pub(super) count: u64,
    pub(super) fingerprint: u64,
    /// `Some` for the store of a [`Timers`](crate::Timers): no live entry's key is below this
    /// one (see `state::timers`). Rolling back resets it to the store's start.
    pub(super) timer_floor: Option<Vec<u8>>,
}

impl Core {
    pub(super) fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let full = full_key(self.id, key);
        match self.overlay.get(&full) {
            Some(value) => Ok(value.clone()),
            None => self.backend.get(&full),
        }
    }

    pub(super) fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        if let Some(old) = self.lookup(&key)? {
            self.count -= 1;
            self.fingerprint = self.fingerprint.wrapping_sub(entry_hash(&key, &old));
        }
        if let Some(new) = &value {
            self.count += 1;
            self.fingerprint = self.fingerprint.wrapping_add(entry_hash(&key, new));
        }
        let full = full_key(self.id, &key);
        let replaced = self.overlay.insert(full.clone(), value);
        self.undo.push((full, replaced));
        Ok(())
    }

    /// Entries in `[from, to)` of the encoded keys: committed ones merged with the overlay.
    fn range(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> Result<RawEntries, StoreError> {
        let full = |b: Bound<Vec<u8>>, unbounded: Option<Vec<u8>>| match b {
            Bound::Included(k) => Bound::Included(full_key(self.id, &k)),
            Bound::Excluded(k) => Bound::Excluded(full_key(self.id, &k)),
            Bound::Unbounded => unbounded.map_or(Bound::Unbounded, Bound::Excluded),
        };
        let from = full(from, None);
        let from = match from {
            Bound::Unbounded => Bound::Included(full_key(self.id, &[])),
            other => other,
        };
        let to = full(to, end_of_store(self.id));
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let start = match &from {
            Bound::Included(k) | Bound::Excluded(k) => k.clone(),
            Bound::Unbounded => Vec::new(),
        };
        if is_empty_range(&from, &to) {
            return Ok(Vec::new());
        }
        self.backend.scan(&start, None, |k, v| {
            if !within(k, &from, &to) {
                // Before `from` only when `from` is excluded; past `to`: done.
                return matches!(&from, Bound::Excluded(f) if f.as_slice() == k);
            }
            merged.insert(k.to_vec(), v.to_vec());
            true
        })?;
        for (k, v) in self
            .overlay
            .range::<Vec<u8>, _>((from.as_ref(), to.as_ref()))
        {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged
            .into_iter()
            .map(|(k, v)| (k[4..].to_vec(), v))
            .collect())
    }

    /// The first entry with an encoded key in `[from, to)`: committed entries merged with the
    /// overlay. Costs a seek plus one step per entry the open transaction deleted on the way.
    pub(super) fn first(&self, from: &[u8], to: &[u8]) -> Result<Option<RawEntry>, StoreError> {
        let (from, to) = (full_key(self.id, from), full_key(self.id, to));
        if from >= to {
            return Ok(None);
        }
        let mut committed: Option<RawEntry> = None;
        self.backend.scan(&from, Some(&to), |k, v| {
            if matches!(self.overlay.get(k), Some(None)) {
                return true; // deleted by the open transaction
            }
            committed = Some((k.to_vec(), v.to_vec()));
            false
        })?;
        let open = self
            .overlay
            .range::<Vec<u8>, _>((Bound::Included(&from), Bound::Excluded(&to)))
            .find_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())));
        let first = match (committed, open) {
            // The overlay's value wins for a key in both.
            (Some(c), Some(o)) => Some(if o.0 <= c.0 { o } else { c }),
            (c, o) => c.or(o),
        };
        Ok(first.map(|(k, v)| (k[4..].to_vec(), v)))
    }

    fn savepoint(&mut self) {
        self.undo.clear();
        self.saved = (self.count, self.fingerprint);
    }

    fn rollback(&mut self) {
        while let Some((key, previous)) = self.undo.pop() {
            match previous {
                Some(entry) => self.overlay.insert(key, entry),
                None => self.overlay.remove(&key),
            };
        }
        (self.count, self.fingerprint) = self.saved;
        if let Some(floor) = &mut self.timer_floor {
            // Restored entries may lie below it.
            floor.clear();
        }
    }
}

/// Whether `key` lies between the bounds.
fn within(key: &[u8], from: &Bound<Vec<u8>>, to: &Bound<Vec<u8>>) -> bool {
    let above = match from {
        Bound::Included(f) => key >= f.as_slice(),
        Bound::Excluded(f) => key > f.as_slice(),
        Bound::Unbounded => true,
    };
    let below = match to {
        Bound::Included(t) => key <= t.as_slice(),
        Bound::Excluded(t) => key < t.as_slice(),
        Bound::Unbounded => true,
    };
    above && below
}

/// Whether no key lies between the bounds (`BTreeMap::range` panics on such bounds).
fn is_empty_range(from: &Bound<Vec<u8>>, to: &Bound<Vec<u8>>) -> bool {
    match (from, to) {
        (Bound::Included(f), Bound::Included(t)) => f > t,
        (Bound::Included(f) | Bound::Excluded(f), Bound::Excluded(t))
        | (Bound::Excluded(f), Bound::Included(t)) => f >= t,
        _ => false,
    }
}

/// One partition's stores, as built into one incarnation of its state: the stores attach
/// to the set that is current on the thread while the state is built (see [`StoreSet::build`]).
#[derive(Clone)]
pub(crate) struct StoreSet(Arc<SetInner>);

struct SetInner {
    backend: Backend,
    cores: Mutex<Vec<Arc<Mutex<Core>>>>,
}

thread_local! {
    /// The set stores attach to while the runtime builds a state on this thread.
    static BUILDING: RefCell<Option<StoreSet>> = const { RefCell::new(None) };
}

impl StoreSet {
    pub(crate) fn new(backend: Backend) -> Self {
        StoreSet(Arc::new(SetInner {
            backend,
            cores: Mutex::default(),
        }))
    }

    pub(crate) fn in_memory() -> Self {
        Self::new(Backend::memory())
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.0.backend
    }

    /// Runs `build` (`Default::default()`, deserializing a snapshot, a migration) with this
    /// set current, so that the stores it creates are this set's.
    pub(crate) fn build<T>(&self, build: impl FnOnce() -> T) -> T {
        let previous = BUILDING.with(|b| b.borrow_mut().replace(self.clone()));
        struct Restore(Option<StoreSet>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                BUILDING.with(|b| *b.borrow_mut() = previous);
            }
        }
        let _restore = Restore(previous);
        build()
    }

    pub(super) fn current_or_memory() -> StoreSet {
        BUILDING
            .with(|b| b.borrow().clone())
            .unwrap_or_else(StoreSet::in_memory)
    }

    /// A new store (`None`: the next free id, empty) or the store a snapshot describes;
    /// `timers`: the store of a [`Timers`](crate::Timers).
    pub(super) fn attach(&self, described: Option<Descriptor>, timers: bool) -> Arc<Mutex<Core>> {
        let mut cores = lock(&self.0.cores);
        let (id, count, fingerprint) = match described {
            Some(d) => (d.store, d.entries, d.fingerprint),
            None => {
                let next = cores.iter().map(|c| lock(c).id + 1).max().unwrap_or(0);
                (next, 0, 0)
            }
        };
        let core = Arc::new(Mutex::new(Core {
            id,
            backend: self.0.backend.clone(),
            overlay: BTreeMap::new(),
            undo: Vec::new(),
            saved: (count, fingerprint),
            count,
            fingerprint,
            timer_floor: timers.then(Vec::new),
        }));
        cores.push(Arc::clone(&core));
        core
    }

    /// Whether the state holds any store.
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.0.cores).is_empty()
    }

    /// Ids, entry counts and fingerprints of the stores, as their descriptors say.
    pub(crate) fn summaries(&self) -> Vec<(u32, u64, u64)> {
        lock(&self.0.cores)
            .iter()
            .map(|c| {
                let c = lock(c);
                (c.id, c.count, c.fingerprint)
            })
            .collect()
    }

    /// The stores of the state's [`Timers`](crate::Timers), in id order.
    pub(super) fn timer_cores(&self) -> Vec<Arc<Mutex<Core>>> {
        let mut timers: Vec<_> = lock(&self.0.cores)
            .iter()
            .filter(|c| lock(c).timer_floor.is_some())
            .cloned()
            .collect();
        timers.sort_by_key(|c| lock(c).id);
        timers
    }

    /// Marks the start of a record: [`Self::rollback_record`] undoes what follows.
    pub(crate) fn begin_record(&self) {
        for core in lock(&self.0.cores).iter() {
            lock(core).savepoint();
        }
    }

    /// Undoes the writes since [`Self::begin_record`] (a record that failed).
    pub(crate) fn rollback_record(&self) {
        for core in lock(&self.0.cores).iter() {
            lock(core).rollback();
        }
    }

    /// Writes every store's overlay into the backend, with `extra` (the runtime's position
    /// records), in one atomic write; the overlays are then empty.
    pub(crate) fn commit(&self, extra: Vec<Write>) -> Result<(), StoreError> {
        let cores = lock(&self.0.cores);
        let mut writes = extra;
        let mut guards: Vec<_> = cores.iter().map(|c| lock(c)).collect();
        for core in &mut guards {
            writes.extend(std::mem::take(&mut core.overlay));
        }
        let result = self.0.backend.write(writes);
        for core in &mut guards {
            core.undo.clear();
            core.saved = (core.count, core.fingerprint);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Json, Utf8};

    type Balances = Store<Utf8, Json<i64>>;

    fn key(k: &str) -> String {
        k.to_owned()
    }

    #[test]
    fn reads_see_the_open_writes_and_the_fingerprint_follows_every_change() {
        let set = StoreSet::in_memory();
        let mut store: Balances = set.build(Balances::default);
        store.put(&key("a"), &1).unwrap();
        store.put(&key("b"), &2).unwrap();
        let two = (store.len(), lock(&store.core).fingerprint);
        store.put(&key("c"), &3).unwrap();
        assert!(store.delete(&key("c")).unwrap());
        assert!(!store.delete(&key("c")).unwrap());
        assert_eq!((store.len(), lock(&store.core).fingerprint), two);
        set.commit(Vec::new()).unwrap();
        assert_eq!(store.get(&key("a")).unwrap(), Some(1));
        store.put(&key("a"), &5).unwrap();
        assert_eq!(store.get(&key("a")).unwrap(), Some(5));
        assert_ne!(lock(&store.core).fingerprint, two.1);
    }

    #[test]
    fn the_fingerprint_does_not_depend_on_the_order_of_writes() {
        let mut a: Balances = Store::default();
        let mut b: Balances = Store::default();
        for (k, v) in [("x", 1), ("y", 2), ("z", 3)] {
            a.put(&key(k), &v).unwrap();
        }
        for (k, v) in [("z", 3), ("x", 9), ("y", 2), ("x", 1)] {
            b.put(&key(k), &v).unwrap();
        }
        assert_eq!(lock(&a.core).fingerprint, lock(&b.core).fingerprint);
        assert_eq!(a.len(), b.len());
    }

    #[test]
    fn a_rolled_back_record_leaves_no_trace() {
        let set = StoreSet::in_memory();
        let mut store: Balances = set.build(Balances::default);
        store.put(&key("a"), &1).unwrap();
        set.commit(Vec::new()).unwrap();
        let before = format!("{store:?}");
        set.begin_record();
        store.put(&key("a"), &7).unwrap();
        store.put(&key("b"), &8).unwrap();
        store.delete(&key("a")).unwrap();
        set.rollback_record();
        assert_eq!(format!("{store:?}"), before);
        assert_eq!(store.get(&key("a")).unwrap(), Some(1));
        assert_eq!(store.get(&key("b")).unwrap(), None);
    }

    #[test]
    fn ranges_merge_committed_entries_with_open_writes() {
        let set = StoreSet::in_memory();
        let mut store: Balances = set.build(Balances::default);
        let mut other: Balances = set.build(Balances::default);
        for (k, v) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
            store.put(&key(k), &v).unwrap();
            other.put(&key(k), &(v * 10)).unwrap();
        }
        set.commit(Vec::new()).unwrap();
        store.delete(&key("b")).unwrap();
        store.put(&key("bb"), &22).unwrap();
        let got = store.range(key("b")..=key("c")).unwrap();
        assert_eq!(got, [(key("bb"), 22), (key("c"), 3)]);
        let all = store.range(..).unwrap();
        assert_eq!(all.len(), 4);
        let after_a = store
            .range((Bound::Excluded(key("a")), Bound::Unbounded))
            .unwrap();
        assert_eq!(after_a[0], (key("bb"), 22));
        assert_eq!(other.range(..).unwrap().len(), 4);
    }

    #[test]
    fn stores_serialize_as_descriptors_and_reattach_by_id() {
        let set = StoreSet::in_memory();
        let (mut first, mut second): (Balances, Balances) =
            set.build(|| (Balances::default(), Balances::default()));
        first.put(&key("a"), &1).unwrap();
        second.put(&key("a"), &2).unwrap();
        set.commit(Vec::new()).unwrap();
        let bytes = rmp_serde::to_vec_named(&(&first, &second)).unwrap();
        let again = StoreSet::new(set.backend().clone());
        let (first2, second2): (Balances, Balances) =
            again.build(|| rmp_serde::from_slice(&bytes).unwrap());
        assert_eq!(first2.get(&key("a")).unwrap(), Some(1));
        assert_eq!(second2.get(&key("a")).unwrap(), Some(2));
        assert_eq!(again.summaries(), set.summaries());
    }
}
