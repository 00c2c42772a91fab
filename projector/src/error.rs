//! Errors of the view and the projector. Bad *events* are not errors: they are quarantined.

use thiserror::Error;

/// The view's storage failed or holds something it cannot read. Folding stops on these (the
/// batch is not committed and not acked, so nothing is lost).
#[derive(Debug, Error)]
pub enum ViewError {
    #[error("view storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("cannot open the view {path}: {message}")]
    Open { path: String, message: String },
    #[error("view record in table {table}, key {key}, cannot be read: {message}")]
    Corrupt {
        table: &'static str,
        key: String,
        message: String,
    },
    #[error("cannot encode a {table} record: {message}")]
    Encode {
        table: &'static str,
        message: String,
    },
    #[error("the view {path} has record format {found}, this build writes format {expected}: rebuild it (move it away; the projector replays the stream from sequence 1)")]
    Format {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("a folded batch follows sequence {follows} but the view ends at {committed}: batches must be written in the order they were folded")]
    OutOfOrder { follows: u64, committed: u64 },
    #[error("a background fold task failed: {0}")]
    Task(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for ViewError {
            fn from(e: $t) -> Self {
                ViewError::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError
);
