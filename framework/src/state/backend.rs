//! Where a partition's committed store entries live: RocksDB in the partition's local
//! directory ([`LocalDb`]), or a map in memory (the [`TestDriver`](crate::testing::TestDriver),
//! and stores built outside the runtime).
//!
//! Keys are the store's id (4 bytes, big-endian) followed by the encoded key, so one store's
//! entries are one contiguous key range. Ids from [`META_STORE`] up are the runtime's own.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::local::{iterate, LocalDb};
use super::StoreError;

/// Store id whose key range holds the runtime's own records (position, plain state).
pub(crate) const META_STORE: u32 = u32::MAX;

/// The key of `key` in store `id`.
pub(crate) fn full_key(id: u32, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(4 + key.len());
    full.extend_from_slice(&id.to_be_bytes());
    full.extend_from_slice(key);
    full
}

/// The first key after every key of store `id` (`None` for the last id).
pub(crate) fn end_of_store(id: u32) -> Option<Vec<u8>> {
    id.checked_add(1).map(|next| next.to_be_bytes().to_vec())
}

/// A write of the committed entries: `None` deletes.
pub(crate) type Write = (Vec<u8>, Option<Vec<u8>>);

/// The committed entries of a partition's stores.
#[derive(Clone)]
pub(crate) enum Backend {
    Memory(Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>),
    Disk(Arc<LocalDb>),
}

impl Backend {
    pub(crate) fn memory() -> Self {
        Backend::Memory(Arc::default())
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Backend::Memory(map) => Ok(lock(map).get(key).cloned()),
            Backend::Disk(db) => db.get(key),
        }
    }

    /// Visits the committed entries with keys in `[from, to)` in key order until `visit`
    /// returns `false`.
    pub(crate) fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        match self {
            Backend::Memory(map) => {
                let map = lock(map);
                let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
                for (k, v) in map.range::<[u8], _>((Bound::Included(from), upper)) {
                    if !visit(k, v) {
                        break;
                    }
                }
                Ok(())
            }
            Backend::Disk(db) => db.scan(from, to, visit),
        }
    }

    /// Applies `writes` atomically (one RocksDB write batch).
    pub(crate) fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        match self {
            Backend::Memory(map) => {
                let mut map = lock(map);
                for (key, value) in writes {
                    match value {
                        Some(value) => map.insert(key, value),
                        None => map.remove(&key),
                    };
                }
                Ok(())
            }
            Backend::Disk(db) => db.write(writes),
        }
    }
}

/// The committed entries as of one moment, readable from another thread while the backend
/// goes on (a full snapshot streamed while the partition keeps processing).
pub(crate) enum View {
    Memory(BTreeMap<Vec<u8>, Vec<u8>>),
    Disk(Arc<rocksdb::DB>),
}

impl Backend {
    /// A view to scan with [`View::scan`]; for RocksDB the moment is when the scan starts.
    pub(crate) fn view(&self) -> Result<View, StoreError> {
        Ok(match self {
            Backend::Memory(map) => View::Memory(lock(map).clone()),
            Backend::Disk(db) => View::Disk(db.handle()?),
        })
    }
}

impl View {
    /// Fixes the view (`taken` is called once it is), then visits its entries with keys in
    /// `[from, to)` in key order until `visit` returns `false`.
    pub(crate) fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        taken: impl FnOnce(),
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), String> {
        match self {
            View::Memory(map) => {
                taken();
                for (k, v) in map.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to))) {
                    if !visit(k, v) {
                        break;
                    }
                }
                Ok(())
            }
            View::Disk(db) => {
                let snapshot = db.snapshot();
                taken();
                let mut options = rocksdb::ReadOptions::default();
                options.set_snapshot(&snapshot);
                // A full snapshot reads every entry once: don't let it evict the hot blocks.
                options.fill_cache(false);
                iterate(db, options, from, Some(to), &mut visit).map_err(|e| e.into_string())
            }
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
