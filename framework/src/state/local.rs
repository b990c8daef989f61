//! A partition's local store directory, `<state dir>/<app id>/<topic>-<partition>`: its
//! RocksDB (opened when a store first needs it), the committed position written with every
//! commit, and the decision whether it can be the base of a warm restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::backend::{full_key, lock, Backend, Write, META_STORE};
use super::{StoreError, StoreSet};
use crate::proto::IncrementalSnapshot;

/// How long opening a local store waits for another owner (an instance releasing the
/// partition, or this process's previous worker for it) to close it.
const OPEN_WAIT: Duration = Duration::from_secs(20);
/// Version of [`LocalPosition`]'s layout.
const POSITION_FORMAT: u32 = 1;
const POSITION_KEY: &[u8] = b"position";
const STATE_KEY: &[u8] = b"state";

/// What the local store holds: the state as of the end of committed transaction
/// `transaction_seq`, and what the incremental records after it carry forward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LocalPosition {
    pub(crate) format: u32,
    pub(crate) app_id: String,
    pub(crate) input_topic: String,
    pub(crate) input_partition: i32,
    pub(crate) transaction_seq: u64,
    pub(crate) next_offset: i64,
    /// The full snapshot the state derives from ("" for none) and its input offset.
    pub(crate) base_snapshot_id: String,
    pub(crate) base_input_offset: i64,
    pub(crate) output_digest: u64,
    pub(crate) records_since_base: u64,
    pub(crate) processor_version: u32,
}

impl LocalPosition {
    /// Why this position cannot be the base of a recovery to `latest` (the last committed
    /// incremental record), or `None` when it can: same app and partition, not ahead of
    /// Kafka, and derived from the same base, so that replaying the input from its offset
    /// continues the same history (a full snapshot or a reset since then starts another).
    pub(crate) fn unusable_for(
        &self,
        app_id: &str,
        latest: &IncrementalSnapshot,
    ) -> Option<&'static str> {
        let latest_base = latest.base.as_ref().map_or("", |b| b.snapshot_id.as_str());
        if self.format != POSITION_FORMAT {
            Some("written by another version of exactly")
        } else if self.app_id != app_id
            || self.input_topic != latest.input_topic
            || self.input_partition != latest.input_partition
        {
            Some("it belongs to another app or partition")
        } else if self.transaction_seq > latest.transaction_seq
            || self.next_offset > latest.next_input_offset
        {
            Some("it is ahead of the last committed transaction")
        } else if self.base_snapshot_id != latest_base
            || self.base_input_offset != latest.base_input_offset
        {
            Some("a full snapshot or a reset was committed since its position")
        } else if self.records_since_base > latest.records_since_base {
            Some("it counts more records than the last committed transaction")
        } else {
            None
        }
    }
}

/// One partition's RocksDB, opened on first use and closed to be discarded.
pub(crate) struct LocalDb {
    dir: PathBuf,
    db: RwLock<Option<Arc<rocksdb::DB>>>,
    /// The first failure, for the worker to report (a store call only returns it to the
    /// processor, which might skip the record).
    failure: Mutex<Option<String>>,
}

impl LocalDb {
    pub(crate) fn new(dir: PathBuf) -> Self {
        LocalDb {
            dir,
            db: RwLock::new(None),
            failure: Mutex::new(None),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a store was ever created here.
    fn exists(&self) -> bool {
        self.dir.join("CURRENT").exists()
    }

    /// The open database (opened now if it is not yet).
    pub(crate) fn handle(&self) -> Result<Arc<rocksdb::DB>, StoreError> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(Arc::clone(db));
        }
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(Arc::clone(db));
        }
        let db = Arc::new(open(&self.dir).map_err(|e| self.failed(e))?);
        *slot = Some(Arc::clone(&db));
        Ok(db)
    }

    /// Closes the database and deletes the directory.
    pub(crate) fn discard(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.take() {
            if Arc::strong_count(&db) > 1 {
                // A scan in progress elsewhere: cannot happen (one worker thread per store).
                *slot = Some(db);
                return Err(StoreError::Local {
                    dir: self.dir.clone(),
                    what: "closing",
                    reason: "the database is still in use".to_owned(),
                });
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                dir: self.dir.clone(),
                what: "deleting the local state directory",
                source,
            }),
        }
    }

    fn failed(&self, error: StoreError) -> StoreError {
        lock(&self.failure).get_or_insert_with(|| error.to_string());
        error
    }

    /// The first failure since the last call.
    pub(crate) fn take_failure(&self) -> Option<String> {
        lock(&self.failure).take()
    }

    fn error(&self, what: &'static str, e: rocksdb::Error) -> StoreError {
        self.failed(StoreError::Local {
            dir: self.dir.clone(),
            what,
            reason: e.into_string(),
        })
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.handle()?
            .get(key)
            .map_err(|e| self.error("reading", e))
    }

    pub(crate) fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let db = self.handle()?;
        iterate(&db, rocksdb::ReadOptions::default(), from, to, &mut visit)
            .map_err(|e| self.error("scanning", e))
    }

    pub(crate) fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut batch = rocksdb::WriteBatch::default();
        for (key, value) in writes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        // Not synced: the write-ahead log reaches the OS with the write, which survives a
        // process crash; after a machine crash the store comes back at an earlier committed
        // position (or not at all) and recovery replays or restores from Kafka.
        self.handle()?
            .write(batch)
            .map_err(|e| self.error("writing", e))
    }
}

impl Drop for LocalDb {
    /// Flushes the memtables when the partition's worker ends (revoked, stopped): the next
    /// open then reads SST files instead of replaying the write-ahead log (measured: a 10M-key
    /// store opened in 220-440 ms after a graceful stop, 57-100 ms after kill -9).
    fn drop(&mut self) {
        let slot = self.db.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.take() {
            if let Err(e) = db.flush() {
                tracing::debug!(dir = %self.dir.display(), error = %e, "flushing the local state store on close");
            }
        }
    }
}

/// Visits `db`'s entries with keys in `[from, to)`, read with `options`, in key order until
/// `visit` returns `false`.
pub(crate) fn iterate(
    db: &rocksdb::DB,
    mut options: rocksdb::ReadOptions,
    from: &[u8],
    to: Option<&[u8]>,
    visit: &mut impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), rocksdb::Error> {
    if let Some(to) = to {
        options.set_iterate_upper_bound(to.to_vec());
    }
    let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
    for item in db.iterator_opt(mode, options) {
        let (key, value) = item?;
        if !visit(&key, &value) {
            break;
        }
    }
    Ok(())
}

fn open(dir: &Path) -> Result<rocksdb::DB, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        dir: dir.to_owned(),
        what: "creating the local state directory",
        source,
    })?;
    let options = shared_options().clone();
    let deadline = Instant::now() + OPEN_WAIT;
    loop {
        match rocksdb::DB::open(&options, dir) {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if is_lock_error(&e) => {
                return Err(StoreError::Locked {
                    dir: dir.to_owned(),
                    waited: OPEN_WAIT,
                    reason: e.into_string(),
                })
            }
            Err(e) => {
                return Err(StoreError::Local {
                    dir: dir.to_owned(),
                    what: "opening",
                    reason: e.into_string(),
                })
            }
        }
    }
}

/// Memory every partition's database of this process shares: block cache and memtables.
const BLOCK_CACHE_BYTES: usize = 128 << 20;
const WRITE_BUFFERS_BYTES: usize = 128 << 20;

/// The options of every partition's database: one database per partition, so the block cache
/// and the memtables' memory are shared by all of them (128 partitions must not mean 128
/// caches), with few background threads and log files each.
fn shared_options() -> &'static rocksdb::Options {
    static OPTIONS: std::sync::OnceLock<rocksdb::Options> = std::sync::OnceLock::new();
    OPTIONS.get_or_init(|| {
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Writes look up the old value of their key (for the fingerprint): most lookups of
        // new keys then end at the filter.
        table.set_bloom_filter(10.0, false);
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        options.set_block_based_table_factory(&table);
        options.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager(
            WRITE_BUFFERS_BYTES,
            false,
        ));
        options.set_max_background_jobs(2);
        options.set_keep_log_file_num(2);
        options
    })
}

fn is_lock_error(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    text.contains("lock") || text.contains("LOCK")
}

/// A partition worker's local state: its directory and identity.
pub(crate) struct LocalState {
    db: Arc<LocalDb>,
    app_id: String,
}

/// A local store that can be the base of a recovery.
pub(crate) struct WarmBase {
    pub(crate) position: LocalPosition,
    /// The state's own bytes (the stores are in the database).
    pub(crate) state: Vec<u8>,
}

impl LocalState {
    pub(crate) fn new(state_dir: &Path, app_id: &str, topic: &str, partition: i32) -> Self {
        let dir = state_dir.join(app_id).join(format!("{topic}-{partition}"));
        LocalState {
            db: Arc::new(LocalDb::new(dir)),
            app_id: app_id.to_owned(),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        self.db.dir()
    }

    /// A new set of stores in this partition's database.
    pub(crate) fn store_set(&self) -> StoreSet {
        StoreSet::new(Backend::Disk(Arc::clone(&self.db)))
    }

    /// The first local-store failure since the last call.
    pub(crate) fn take_failure(&self) -> Option<String> {
        self.db.take_failure()
    }

    /// The local store, if there is one that can be the base of a recovery to `latest`.
    /// One that cannot (another app's, ahead, another history, unreadable) is discarded, with
    /// a log line saying why.
    pub(crate) fn warm_base(
        &self,
        latest: &IncrementalSnapshot,
    ) -> Result<Option<WarmBase>, StoreError> {
        if !self.db.exists() {
            return Ok(None);
        }
        let why = match self.read_position() {
            Ok(Some((position, state))) => match position.unusable_for(&self.app_id, latest) {
                None => return Ok(Some(WarmBase { position, state })),
                Some(why) => why.to_owned(),
            },
            Ok(None) => "it has no committed position".to_owned(),
            // Held by another owner: not this store's fault; the partition fails with it.
            Err(e @ StoreError::Locked { .. }) => return Err(e),
            Err(e) => format!("it cannot be read: {e}"),
        };
        tracing::warn!(dir = %self.dir().display(), reason = %why, "discarding the local state store; restoring from Kafka");
        self.discard()?;
        Ok(None)
    }

    /// Deletes the local store (before restoring into a fresh one).
    pub(crate) fn discard(&self) -> Result<(), StoreError> {
        self.db.discard()
    }

    fn read_position(&self) -> Result<Option<(LocalPosition, Vec<u8>)>, StoreError> {
        let Some(bytes) = self.db.get(&full_key(META_STORE, POSITION_KEY))? else {
            return Ok(None);
        };
        let position: LocalPosition =
            rmp_serde::from_slice(&bytes).map_err(|e| StoreError::Local {
                dir: self.dir().to_owned(),
                what: "reading the committed position",
                reason: e.to_string(),
            })?;
        let state = self
            .db
            .get(&full_key(META_STORE, STATE_KEY))?
            .unwrap_or_default();
        Ok(Some((position, state)))
    }

    /// Writes the stores' open changes and the committed position `at` (with the state's own
    /// bytes) in one batch: after the Kafka transaction that `at` describes committed. Nothing
    /// happens for a state without stores.
    pub(crate) fn commit<S: Serialize>(
        &self,
        stores: &StoreSet,
        at: Committed<'_>,
        state: &S,
    ) -> Result<(), StoreError> {
        if stores.is_empty() {
            return Ok(());
        }
        let local_error = |what, reason: String| StoreError::Local {
            dir: self.dir().to_owned(),
            what,
            reason,
        };
        let state = crate::snapshot::encode_state(state)
            .map_err(|e| local_error("encoding the state", e.to_string()))?;
        let position = LocalPosition {
            format: POSITION_FORMAT,
            app_id: self.app_id.clone(),
            input_topic: at.input_topic.to_owned(),
            input_partition: at.input_partition,
            transaction_seq: at.transaction_seq,
            next_offset: at.next_offset,
            base_snapshot_id: at.base_snapshot_id.to_owned(),
            base_input_offset: at.base_input_offset,
            output_digest: at.output_digest,
            records_since_base: at.records_since_base,
            processor_version: at.processor_version,
        };
        let position = rmp_serde::to_vec_named(&position)
            .map_err(|e| local_error("encoding the committed position", e.to_string()))?;
        stores.commit(vec![
            (full_key(META_STORE, POSITION_KEY), Some(position)),
            (full_key(META_STORE, STATE_KEY), Some(state)),
        ])
    }
}

/// A committed transaction's end, as the local store records it.
pub(crate) struct Committed<'a> {
    pub(crate) input_topic: &'a str,
    pub(crate) input_partition: i32,
    pub(crate) transaction_seq: u64,
    pub(crate) next_offset: i64,
    /// The full snapshot the state derives from ("" for none).
    pub(crate) base_snapshot_id: &'a str,
    pub(crate) base_input_offset: i64,
    pub(crate) output_digest: u64,
    pub(crate) records_since_base: u64,
    pub(crate) processor_version: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FullSnapshotRef;

    fn latest() -> IncrementalSnapshot {
        IncrementalSnapshot {
            input_topic: "in".into(),
            input_partition: 3,
            next_input_offset: 100,
            base: Some(FullSnapshotRef {
                snapshot_id: "s1".into(),
                input_offset: 40,
                ..Default::default()
            }),
            base_input_offset: 40,
            records_since_base: 60,
            transaction_seq: 9,
            ..Default::default()
        }
    }

    fn position() -> LocalPosition {
        LocalPosition {
            format: POSITION_FORMAT,
            app_id: "app".into(),
            input_topic: "in".into(),
            input_partition: 3,
            transaction_seq: 7,
            next_offset: 80,
            base_snapshot_id: "s1".into(),
            base_input_offset: 40,
            output_digest: 5,
            records_since_base: 40,
            processor_version: 0,
        }
    }

    #[derive(Default, serde::Serialize, serde::Deserialize)]
    struct Counts {
        seen: u64,
        counts: crate::Store<crate::Utf8, crate::Json<u64>>,
    }

    fn committed(seq: u64, next_offset: i64) -> Committed<'static> {
        Committed {
            input_topic: "in",
            input_partition: 3,
            transaction_seq: seq,
            next_offset,
            base_snapshot_id: "s1",
            base_input_offset: 40,
            output_digest: 5,
            records_since_base: next_offset as u64 - 40,
            processor_version: 0,
        }
    }

    #[test]
    fn a_committed_store_is_the_warm_base_of_its_next_run_and_others_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalState::new(dir.path(), "app", "in", 3);
        assert!(local.warm_base(&latest()).unwrap().is_none(), "nothing yet");
        let stores = local.store_set();
        let mut state: Counts = stores.build(Counts::default);
        state.seen = 2;
        state.counts.put(&"a".into(), &1).unwrap();
        state.counts.put(&"b".into(), &2).unwrap();
        local.commit(&stores, committed(7, 80), &state).unwrap();
        state.counts.put(&"c".into(), &3).unwrap(); // never committed
        drop((state, stores, local));

        let local = LocalState::new(dir.path(), "app", "in", 3);
        let warm = local.warm_base(&latest()).unwrap().expect("a warm base");
        assert_eq!(
            (warm.position.transaction_seq, warm.position.next_offset),
            (7, 80)
        );
        let stores = local.store_set();
        let state: Counts = stores.build(|| rmp_serde::from_slice(&warm.state).unwrap());
        assert_eq!(state.seen, 2);
        assert_eq!(state.counts.len(), 2);
        assert_eq!(state.counts.get(&"b".into()).unwrap(), Some(2));
        assert_eq!(state.counts.get(&"c".into()).unwrap(), None);
        drop((state, stores));

        // Another history (a full snapshot since): discarded, and the directory with it.
        let mut other = latest();
        other.base.as_mut().unwrap().snapshot_id = "s2".into();
        assert!(local.warm_base(&other).unwrap().is_none());
        assert!(!local.dir().exists());
    }

    #[test]
    fn a_position_behind_on_the_same_history_is_a_base() {
        assert_eq!(position().unusable_for("app", &latest()), None);
        let at_end = LocalPosition {
            transaction_seq: 9,
            next_offset: 100,
            records_since_base: 60,
            ..position()
        };
        assert_eq!(at_end.unusable_for("app", &latest()), None);
    }

    #[test]
    fn other_apps_partitions_futures_and_histories_are_not() {
        let latest = latest();
        let cases = [
            (
                LocalPosition {
                    app_id: "other".into(),
                    ..position()
                },
                "another app",
            ),
            (
                LocalPosition {
                    input_partition: 4,
                    ..position()
                },
                "another app or partition",
            ),
            (
                LocalPosition {
                    transaction_seq: 10,
                    ..position()
                },
                "ahead",
            ),
            (
                LocalPosition {
                    next_offset: 101,
                    ..position()
                },
                "ahead",
            ),
            (
                LocalPosition {
                    base_snapshot_id: "s0".into(),
                    ..position()
                },
                "full snapshot or a reset",
            ),
            (
                LocalPosition {
                    format: 99,
                    ..position()
                },
                "another version",
            ),
        ];
        for (position, why) in cases {
            let got = position.unusable_for("app", &latest).unwrap_or("usable");
            assert!(got.contains(why), "{position:?}: {got}");
        }
    }
}
