use super::{Kind, Revision};
use crate::validation::ValidationErrors;

/// What a datastore operation can fail with. Each variant carries what a caller needs to react
/// correctly: re-read and retry on [`Conflict`](StoreError::Conflict), relist on
/// [`TooOld`](StoreError::TooOld), back off and retry on
/// [`Unavailable`](StoreError::Unavailable).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: Kind, name: String },

    /// The object changed since the caller read it. `actual` is the revision now stored, when
    /// the backend reports it; re-read, re-apply the change and try again.
    #[error("{kind} {name:?} was modified concurrently: expected revision {expected}, found {}",
        actual.map(|r| r.to_string()).unwrap_or_else(|| "a newer one".into()))]
    Conflict {
        kind: Kind,
        name: String,
        expected: Revision,
        actual: Option<Revision>,
    },

    /// A create found the name taken. `revision` is the existing object's, when known.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        kind: Kind,
        name: String,
        revision: Option<Revision>,
    },

    /// A watch (or a read at a revision) asked for history the store no longer has. List again
    /// and watch from the listing's revision.
    #[error("{kind}: revision {requested} is too old (compacted{}); list again and watch from the new revision",
        oldest.map(|r| format!(", oldest available is {r}")).unwrap_or_default())]
    TooOld {
        kind: Kind,
        requested: Revision,
        oldest: Option<Revision>,
    },

    /// The backend cannot be reached or did not answer in time. Nothing is known to have been
    /// written; retry with back-off.
    #[error("{backend} datastore unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The object failed validation and was not written.
    #[error("invalid {kind} {name:?}: {errors}")]
    Invalid {
        kind: Kind,
        name: String,
        errors: ValidationErrors,
    },

    /// A stored object could not be decoded into its Rust type.
    #[error("{kind} {name:?}: stored object does not decode: {source}")]
    Decode {
        kind: Kind,
        name: String,
        #[source]
        source: serde_json::Error,
    },

    /// The backend refused the request for a reason that retrying will not fix (permissions,
    /// a missing CRD, a malformed request).
    #[error("{backend} datastore refused the request: {message}")]
    Rejected {
        backend: &'static str,
        message: String,
    },
}

impl StoreError {
    /// True for errors after which the same request may succeed if retried (after re-reading for
    /// a conflict, after back-off for unavailability).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. } | StoreError::Unavailable { .. }
        )
    }

    /// The object an error is about, for errors that name one. After a failed commit this is
    /// the write whose condition failed: re-read that object, not the others.
    pub fn object(&self) -> Option<(Kind, &str)> {
        match self {
            StoreError::NotFound { kind, name }
            | StoreError::Conflict { kind, name, .. }
            | StoreError::AlreadyExists { kind, name, .. }
            | StoreError::Invalid { kind, name, .. }
            | StoreError::Decode { kind, name, .. } => Some((*kind, name)),
            _ => None,
        }
    }

    /// True when the error is about the object `kind`/`name`.
    pub fn is_about(&self, kind: Kind, name: &str) -> bool {
        self.object() == Some((kind, name))
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    pub fn is_already_exists(&self) -> bool {
        matches!(self, StoreError::AlreadyExists { .. })
    }

    pub fn unavailable(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Unavailable {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }
}
