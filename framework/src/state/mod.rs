//! State that scales: keyed [`Store`]s kept in RocksDB on local disk, one database per input
//! partition (DESIGN §3).
//!
//! - `store`: the typed [`Store`] handle, and the runtime's side of a partition's stores (the
//!   open transaction's overlay, the per-record savepoint, the commit);
//! - `backend`: where committed entries live (RocksDB, or memory in the test driver);
//! - `local`: a partition's local directory: its committed position, warm restarts, and
//!   discarding a store that cannot be used;
//! - `image`: a state with stores as a full snapshot (the state's bytes, then every entry);
//! - `timers`: stream-time [`Timers`], kept as the entries of a store.

mod backend;
mod image;
mod local;
mod store;
mod timers;

use std::path::PathBuf;
use std::time::Duration;

pub use store::{Entries, Store};
pub use timers::{Timer, Timers};

#[allow(unused_imports)] // the runtime (partition worker, recovery, test driver) uses them
pub(crate) use image::{decode_image, encode_image, Image, ImageStream, Piece, STORES_ENCODING};
#[allow(unused_imports)]
pub(crate) use local::{Committed, LocalPosition, LocalState};
pub(crate) use store::StoreSet;
pub(crate) use timers::{advance_stream_time, take_due};

/// A keyed store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A key or value did not encode with its format.
    #[error("cannot encode for the store: {0}")]
    Encode(#[from] crate::codec::EncodeError),
    /// A stored value (or key) did not decode with its format: the store's type changed.
    #[error("a stored entry does not decode with the store's format (did the Store's key or value type change?): {0}")]
    Decode(#[source] crate::codec::DecodeError),
    /// The key's format encoded it as nothing (e.g. `Raw`'s `None`): stores need a key.
    #[error("the key encodes to nothing; a store needs a key")]
    AbsentKey,
    /// RocksDB failed.
    #[error("local state store in {dir:?}: {what} failed: {reason}; check the disk (space, permissions) under the state dir (AppConfig::state_dir / EXACTLY_STATE_DIR)")]
    Local {
        /// The partition's store directory.
        dir: PathBuf,
        /// What was being done.
        what: &'static str,
        /// What RocksDB said.
        reason: String,
    },
    /// The store's directory is held by another process or worker.
    #[error("local state store in {dir:?} is still locked after {waited:?} ({reason}): is another instance of this app using the same state dir on this machine? Give each instance its own AppConfig::state_dir (EXACTLY_STATE_DIR)")]
    Locked {
        /// The partition's store directory.
        dir: PathBuf,
        /// How long opening waited.
        waited: Duration,
        /// What RocksDB said.
        reason: String,
    },
    /// A file-system operation on the state dir failed.
    #[error("{what} {dir:?} failed: {source}; check the state dir (AppConfig::state_dir / EXACTLY_STATE_DIR)")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Restored entries do not add up to what the state's descriptor of the store says.
    #[error("store {store} restored {found_entries} entries with fingerprint {found_fingerprint:#018x}, the snapshot's state says {entries} with {fingerprint:#018x}")]
    Mismatch {
        /// The store's id within the state.
        store: u32,
        /// Entries the state says.
        entries: u64,
        /// Fingerprint the state says.
        fingerprint: u64,
        /// Entries restored.
        found_entries: u64,
        /// Fingerprint of the restored entries.
        found_fingerprint: u64,
    },
}
