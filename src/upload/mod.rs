//! Chunked file uploads that never publish a partial file, resume after any
//! interruption, and keep memory flat.
//!
//! - This module holds the domain types: a [`Chunk`] as received, the
//!   [`Sequence`] checks every call's chunks go through, file name
//!   validation and the [`UploadError`] of the whole feature.
//! - [`store`] is the disk side: unfinished uploads under
//!   `uploads/.streamhub/partial/`, hashing writes in bounded blocking
//!   steps, publishing by fsync + atomic rename, leases that keep
//!   concurrent uploads of one name apart, quota, expiry, listing and
//!   reading back.
//! - [`limits`] caps the Upload and Download calls open at once.
//! - [`service`] is the gRPC layer: the only part that knows protobuf and
//!   `tonic::Status`.
//!
//! `docs/upload.md` describes the protocol and the invariants.

pub mod limits;
pub mod owners;
pub mod service;
pub mod stall;
pub mod store;

pub use store::{Store, StoredFile};

/// Longest accepted file name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// The name under `uploads/` the server keeps its own state in; no upload
/// may take it.
pub const RESERVED_NAME: &str = ".streamhub";

/// Length of a SHA-256 digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// A SHA-256 digest.
pub type Digest = [u8; DIGEST_LEN];

/// One chunk of an upload as received, before any check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// The file name; required on the first chunk, optional afterwards.
    pub filename: String,
    /// The bytes.
    pub data: Vec<u8>,
    /// The chunk's number within the call.
    pub index: u32,
    /// Whether this chunk completes the upload.
    pub is_last: bool,
    /// Byte offset of `data` in the file, if the client says.
    pub offset: Option<u64>,
    /// Expected SHA-256 of the whole file, if sent with this chunk (empty
    /// when not).
    pub sha256: Vec<u8>,
}

/// What can go wrong with an upload, a download or a listing.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The call ended before its first chunk.
    #[error("empty stream: no chunk arrived, so there is no upload")]
    EmptyStream,
    /// The file name is not a plain file name.
    #[error("invalid file name {name:?}: {reason}")]
    BadName {
        /// The name as sent.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A later chunk names another file.
    #[error("chunk {index} of upload {upload} names another file, {other:?}")]
    NameChanged {
        /// The upload.
        upload: String,
        /// The chunk's index.
        index: u32,
        /// The name it carried.
        other: String,
    },
    /// A fresh upload did not start at chunk 0.
    #[error(
        "upload {upload} starts at offset 0 but its first chunk is chunk {index}; a new upload starts with chunk 0"
    )]
    FirstIndex {
        /// The upload.
        upload: String,
        /// The index received.
        index: u32,
    },
    /// A chunk index is not the one after the previous chunk's.
    #[error(
        "chunk {index} arrived after chunk {previous} of upload {upload}; expected chunk {expected}"
    )]
    OutOfOrder {
        /// The upload.
        upload: String,
        /// The index received.
        index: u32,
        /// The previous chunk's index.
        previous: u32,
        /// The index expected (`previous + 1`).
        expected: u64,
    },
    /// A chunk arrived after the chunk marked `is_last`.
    #[error(
        "chunk {index} arrived after the last chunk ({last}) of upload {upload}; nothing was published"
    )]
    AfterLast {
        /// The upload.
        upload: String,
        /// The extra chunk's index.
        index: u32,
        /// The index of the chunk marked last.
        last: u32,
    },
    /// A chunk's offset is not where the previous chunk ended.
    #[error(
        "chunk {index} of upload {upload} says offset {offset}, but the previous chunks end at offset {expected}"
    )]
    ChunkOffset {
        /// The upload.
        upload: String,
        /// The chunk's index.
        index: u32,
        /// The offset it carried.
        offset: u64,
        /// The offset expected.
        expected: u64,
    },
    /// A call tried to resume at an offset other than what the server holds.
    #[error(
        "upload {upload} cannot resume at offset {offset}: the server holds {held} bytes of it; resume from offset {held} (or start again at offset 0)"
    )]
    ResumeOffset {
        /// The upload.
        upload: String,
        /// The offset asked for.
        offset: u64,
        /// The bytes held: the offset to resume from.
        held: u64,
    },
    /// The sha256 field does not hold 32 bytes.
    #[error(
        "chunk {index} of upload {upload} carries a sha256 of {len} bytes; it must be 32 bytes (the raw digest)"
    )]
    BadDigest {
        /// The upload.
        upload: String,
        /// The chunk's index.
        index: u32,
        /// The length received.
        len: usize,
    },
    /// Two chunks carry different expected digests.
    #[error(
        "chunk {index} of upload {upload} carries a sha256 that differs from the one sent before"
    )]
    DigestChanged {
        /// The upload.
        upload: String,
        /// The chunk's index.
        index: u32,
    },
    /// Another call is writing this upload.
    #[error(
        "upload {upload} is in progress on another call; wait until it ends (QueryUpload shows in_progress) and resume"
    )]
    Busy {
        /// The upload.
        upload: String,
    },
    /// Cluster mode: this server can no longer be sure it holds the
    /// shared lease on the name (a renewal failed, or its lifetime ran out
    /// unrenewed), so another node may be writing it; nothing more was
    /// written and nothing was published or removed.
    #[error(
        "the lease on upload {upload} was lost or expired on this server, so another node may be writing it; this call wrote nothing more and published nothing; ask QueryUpload what is held and resume"
    )]
    LeaseLost {
        /// The upload.
        upload: String,
    },
    /// The file would exceed the configured maximum size.
    #[error(
        "upload {upload} exceeds the maximum file size of {limit} bytes at chunk {index}; its bytes were discarded"
    )]
    TooLarge {
        /// The upload.
        upload: String,
        /// The chunk that crossed the limit.
        index: u32,
        /// The limit.
        limit: u64,
    },
    /// The storage quota is used up.
    #[error(
        "upload {upload} exhausts the storage quota of {quota} bytes at chunk {index} ({used} bytes in use); its bytes were discarded"
    )]
    QuotaExceeded {
        /// The upload.
        upload: String,
        /// The chunk that crossed the quota.
        index: u32,
        /// The quota.
        quota: u64,
        /// Bytes in use before the chunk.
        used: u64,
    },
    /// The identity's own quota (`upload.quota_per_identity`) is used up.
    #[error(
        "upload {upload} exhausts the quota of {quota} bytes of identity {identity:?} at chunk \
         {index} ({used} bytes in use); its bytes were discarded"
    )]
    IdentityQuotaExceeded {
        /// The upload.
        upload: String,
        /// The identity.
        identity: String,
        /// The chunk that crossed the quota.
        index: u32,
        /// The quota.
        quota: u64,
        /// Bytes the identity held when the upload started.
        used: u64,
    },
    /// The disk is full.
    #[error("the disk is full while writing upload {upload}; its bytes were discarded")]
    DiskFull {
        /// The upload.
        upload: String,
    },
    /// The received bytes do not hash to the expected digest.
    #[error(
        "upload {upload}: the received {size} bytes have SHA-256 {actual}, the client expected {expected}; nothing was published and the bytes were discarded"
    )]
    DigestMismatch {
        /// The upload.
        upload: String,
        /// Bytes received.
        size: u64,
        /// Expected digest, hex.
        expected: String,
        /// Actual digest, hex.
        actual: String,
    },
    /// No stored file has that name.
    #[error("no stored file is named {name:?}")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// Something other than a stored file (a directory, a link, a FIFO)
    /// has the name under the uploads directory, so nothing can be
    /// published there.
    #[error(
        "upload {upload} cannot be stored: the server holds something under that name that is not a stored file; choose another name"
    )]
    NotAFile {
        /// The upload.
        upload: String,
    },
    /// The server's own state for the upload is not a regular file (an
    /// administrator must remove it).
    #[error(
        "upload {upload} cannot be written: the server's state for it is not a regular file (details in the server log)"
    )]
    BadState {
        /// The upload.
        upload: String,
    },
    /// Too many calls of one kind are open.
    #[error("too many {what} open {scope}: the limit is {limit}; try again when one has ended")]
    TooManyCalls {
        /// `uploads` or `downloads`.
        what: &'static str,
        /// `on this server` or `on this connection`.
        scope: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A file system operation failed.
    #[error("{action} {path}: {cause}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: std::path::PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: std::io::Error,
    },
    /// A blocking task died (a bug).
    #[error("internal error: {0}")]
    Internal(String),
    /// Cluster mode: the leases shared with the other servers cannot be
    /// reached, so no write may start.
    #[error("{0}")]
    Unavailable(String),
}

/// Checks that `name` is a plain file name: 1 to 255 bytes, no `/` or `\`,
/// not `.` or `..`, no control characters, and not the reserved
/// `.streamhub`.
pub fn validate_name(name: &str) -> Result<(), UploadError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 255 bytes")
    } else if name.contains(['/', '\\']) {
        Some("it contains a path separator (/ or \\); send a plain file name")
    } else if name == "." || name == ".." {
        Some("it names a directory")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if name == RESERVED_NAME {
        Some("it is reserved for the server's own state")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(UploadError::BadName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// How a call starts, decided by its first chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The upload's file name (validated).
    pub name: String,
    /// 0 for a fresh upload; above 0 to resume at that offset.
    pub offset: u64,
}

/// The checks every chunk of one call goes through: one file name, chunk
/// indices going up by one, offsets matching what came before, one
/// expected digest, nothing after the last chunk.
#[derive(Debug, Clone)]
pub struct Sequence {
    name: String,
    last_index: u32,
    position: u64,
    expected: Option<Digest>,
    finished: bool,
}

impl Sequence {
    /// Checks the first chunk of a call and says how the call starts.
    pub fn first(chunk: &Chunk) -> Result<(Self, Start), UploadError> {
        validate_name(&chunk.filename)?;
        let offset = chunk.offset.unwrap_or(0);
        if offset == 0 && chunk.index != 0 {
            return Err(UploadError::FirstIndex {
                upload: chunk.filename.clone(),
                index: chunk.index,
            });
        }
        let mut sequence = Self {
            name: chunk.filename.clone(),
            last_index: chunk.index,
            position: offset,
            expected: None,
            finished: false,
        };
        sequence.take_digest(chunk)?;
        // Saturating: an absurd offset is refused later, never wrapped.
        sequence.position = sequence.position.saturating_add(chunk.data.len() as u64);
        sequence.finished = chunk.is_last;
        let start = Start {
            name: chunk.filename.clone(),
            offset,
        };
        Ok((sequence, start))
    }

    /// Checks a chunk after the first.
    pub fn next(&mut self, chunk: &Chunk) -> Result<(), UploadError> {
        if self.finished {
            return Err(UploadError::AfterLast {
                upload: self.name.clone(),
                index: chunk.index,
                last: self.last_index,
            });
        }
        if !chunk.filename.is_empty() && chunk.filename != self.name {
            return Err(UploadError::NameChanged {
                upload: self.name.clone(),
                index: chunk.index,
                other: chunk.filename.clone(),
            });
        }
        let expected = u64::from(self.last_index) + 1;
        if u64::from(chunk.index) != expected {
            return Err(UploadError::OutOfOrder {
                upload: self.name.clone(),
                index: chunk.index,
                previous: self.last_index,
                expected,
            });
        }
        if let Some(offset) = chunk.offset
            && offset != self.position
        {
            return Err(UploadError::ChunkOffset {
                upload: self.name.clone(),
                index: chunk.index,
                offset,
                expected: self.position,
            });
        }
        self.take_digest(chunk)?;
        self.last_index = chunk.index;
        self.position = self.position.saturating_add(chunk.data.len() as u64);
        self.finished = chunk.is_last;
        Ok(())
    }

    fn take_digest(&mut self, chunk: &Chunk) -> Result<(), UploadError> {
        if chunk.sha256.is_empty() {
            return Ok(());
        }
        let digest: Digest =
            chunk
                .sha256
                .as_slice()
                .try_into()
                .map_err(|_| UploadError::BadDigest {
                    upload: self.name.clone(),
                    index: chunk.index,
                    len: chunk.sha256.len(),
                })?;
        match self.expected {
            Some(known) if known != digest => Err(UploadError::DigestChanged {
                upload: self.name.clone(),
                index: chunk.index,
            }),
            _ => {
                self.expected = Some(digest);
                Ok(())
            }
        }
    }

    /// The upload's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The index of the last chunk accepted.
    pub fn last_index(&self) -> u32 {
        self.last_index
    }

    /// Whether the chunk marked `is_last` has been accepted.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The digest the client expects, if it sent one.
    pub fn expected_digest(&self) -> Option<Digest> {
        self.expected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(name: &str, index: u32, data: &[u8]) -> Chunk {
        Chunk {
            filename: name.to_owned(),
            data: data.to_vec(),
            index,
            ..Chunk::default()
        }
    }

    #[test]
    fn names_are_plain_file_names() {
        for good in [
            "report.pdf",
            ".hidden",
            "...",
            "a b",
            "ünïcødé",
            &"x".repeat(255),
        ] {
            validate_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "/etc/passwd",
            "x\0y",
            "line\nbreak",
            ".streamhub",
            &"x".repeat(256),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sequence_accepts_a_plain_upload() {
        let (mut seq, start) = Sequence::first(&chunk("f", 0, b"ab")).expect("first");
        assert_eq!(start.offset, 0);
        let mut c = chunk("", 1, b"cd");
        c.offset = Some(2);
        c.is_last = true;
        seq.next(&c).expect("second");
        assert!(seq.is_finished());
        let err = seq.next(&chunk("", 2, b"")).expect_err("after last");
        assert!(matches!(err, UploadError::AfterLast { last: 1, .. }));
    }

    #[test]
    fn sequence_rejects_gaps_renames_and_bad_offsets() {
        let (mut seq, _) = Sequence::first(&chunk("report.pdf", 0, b"ab")).expect("first");
        seq.next(&chunk("report.pdf", 1, b"cd")).expect("1");
        seq.next(&chunk("", 2, b"cd")).expect("2");
        seq.next(&chunk("", 3, b"cd")).expect("3");
        let err = seq.next(&chunk("", 5, b"")).expect_err("gap");
        assert_eq!(
            err.to_string(),
            "chunk 5 arrived after chunk 3 of upload report.pdf; expected chunk 4"
        );
        assert!(matches!(
            seq.next(&chunk("other", 4, b"")),
            Err(UploadError::NameChanged { .. })
        ));
        let mut c = chunk("", 4, b"");
        c.offset = Some(7);
        assert!(matches!(
            seq.next(&c),
            Err(UploadError::ChunkOffset { expected: 8, .. })
        ));
    }

    #[test]
    fn fresh_uploads_start_at_chunk_zero_and_resumes_anywhere() {
        assert!(matches!(
            Sequence::first(&chunk("f", 3, b"")),
            Err(UploadError::FirstIndex { index: 3, .. })
        ));
        let mut c = chunk("f", 3, b"xy");
        c.offset = Some(100);
        let (_, start) = Sequence::first(&c).expect("resume");
        assert_eq!(start.offset, 100);
    }

    #[test]
    fn digests_must_be_32_bytes_and_agree() {
        let mut c = chunk("f", 0, b"");
        c.sha256 = vec![1; 31];
        assert!(matches!(
            Sequence::first(&c),
            Err(UploadError::BadDigest { len: 31, .. })
        ));
        c.sha256 = vec![1; 32];
        let (mut seq, _) = Sequence::first(&c).expect("first");
        let mut d = chunk("", 1, b"");
        d.sha256 = vec![2; 32];
        assert!(matches!(
            seq.next(&d),
            Err(UploadError::DigestChanged { .. })
        ));
        d.sha256 = vec![1; 32];
        seq.next(&d).expect("same digest again");
        assert_eq!(seq.expected_digest(), Some([1; 32]));
    }
}
