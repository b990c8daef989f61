//! Snapshots: how a partition's state and progress are written to its snapshot topic, and
//! verified when they are read back.
//!
//! - [`codec`]: the state's byte encoding (MessagePack), splitting it into checksummed chunks
//!   and assembling them back, and the envelope of every snapshot-topic record
//!   (`proto/exactly.proto`).
//! - [`fingerprint`]: the structural state fingerprint checked after recovery, and the running
//!   digest of output records.
//! - `store` (the runtime's): reading and writing those records on Kafka.
//! - `trim` (the runtime's): deleting what lies below a committed full snapshot.
//! - `connect`, `wakeup`: the Kafka clients' plumbing (a first connection, waiting for delivery
//!   reports).

pub(crate) mod codec;
pub(crate) mod connect;
pub(crate) mod fingerprint;
pub(crate) mod store;
pub(crate) mod trim;
pub(crate) mod wakeup;

#[allow(unused_imports)] // the runtime (partition worker, recovery) uses the rest
pub(crate) use codec::{
    assemble_chunks, chunk_record, decode_record, decode_state, encode_record, encode_state,
    full_snapshot_ref, incremental_record, split_into_chunks, STATE_ENCODING,
};
#[allow(unused_imports)]
pub(crate) use fingerprint::{fingerprint, OutputDigest};

/// Version of the snapshot-topic record format this build writes and the newest it reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// A snapshot could not be written or read. Corrupt data is reported, never loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A full snapshot failed verification (checksum, chunk ids/indices/count, length).
    #[error("corrupt full snapshot {snapshot_id:?}{}: {what}", chunk.map(|c| format!(", chunk {c}")).unwrap_or_default())]
    Corrupt {
        /// Id of the snapshot being assembled.
        snapshot_id: String,
        /// The chunk at fault, if one is.
        chunk: Option<u32>,
        /// What is wrong.
        what: String,
    },
    /// A snapshot-topic record is not a valid protobuf `SnapshotRecord`.
    #[error("snapshot record does not decode (is this a snapshot topic of exactly?): {0}")]
    Record(#[from] prost::DecodeError),
    /// A snapshot-topic record was written by a newer, incompatible version of exactly.
    #[error("snapshot record has format version {found}, this build reads up to {supported}: upgrade exactly (or point the app at a fresh snapshot topic)")]
    UnsupportedVersion {
        /// Version found in the record.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// The local state store failed while a snapshot was written or restored.
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    /// The state could not be serialized.
    #[error("cannot serialize the state into a snapshot: {0}")]
    EncodeState(#[source] rmp_serde::encode::Error),
    /// Snapshot bytes (checksums fine) do not deserialize into the processor's state type.
    #[error("the state in the snapshot ({bytes} bytes) does not read as {state_type}: at `{path}`: {source}; the State type changed incompatibly since the snapshot was written (a field added without #[serde(default)], a changed type): give the new field a default, or convert the old state in Processor::migrate_state")]
    DecodeState {
        /// Rust type the state was read as.
        state_type: &'static str,
        /// Where in the state reading failed (`.` for the top level).
        path: String,
        /// Length of the encoded state.
        bytes: usize,
        /// What rmp-serde reported.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

impl SnapshotError {
    pub(crate) fn corrupt(snapshot_id: &str, chunk: Option<u32>, what: impl Into<String>) -> Self {
        SnapshotError::Corrupt {
            snapshot_id: snapshot_id.to_owned(),
            chunk,
            what: what.into(),
        }
    }
}
