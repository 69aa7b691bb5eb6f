//! Checkpoint page codecs, and the memory traces to compare them on.
//!
//! A checkpoint carries the guest pages dirtied in one epoch. This crate turns
//! such a batch of pages into one self-checking frame and back:
//!
//! - [`batch`]: a batch of pages (page numbers and 4 KiB contents).
//! - [`codec`]: the [`Encoder`] and [`Decoder`] pair and the frame format.
//!   Both sides keep reference state (earlier page versions, zstd
//!   dictionaries) in lockstep; every frame carries a sequence number and a
//!   checksum of its decoded contents, so a decoder that lost sync, or a frame
//!   that was corrupted, truncated or reordered, is an error and never applied.
//! - [`spec`]: codec specifications as users write them (`delta+zstd:level=1`),
//!   with [`size`]s such as `64M`.
//! - [`transform`]: the page-level stage (`raw`, `delta`, `similarity`).
//! - [`compressor`]: the byte-level stage (`gzip`, `zstd`, with an optional
//!   dictionary trained on earlier pages).
//! - [`xor_rle`], [`store`], [`varint`]: the pieces the page stage is built of.
//! - [`auto`]: a policy that picks the byte-level stage per batch from the
//!   ratios and costs it observes.
//! - [`file`]: files written whole or not at all (traces, snapshots).
//! - [`trace`]: memory traces on disk (epochs of dirty pages with contents),
//!   captured from live processes, from the built-in guest, or generated.

pub mod auto;
pub mod batch;
pub mod codec;
pub mod compressor;
pub mod file;
pub mod size;
pub mod spec;
pub mod store;
pub mod trace;
pub mod transform;
pub mod varint;
pub mod xor_rle;

pub use batch::{PAGE_BYTES, PAGE_SIZE, Page, PageBatch};
pub use codec::{CodecError, DecodeStats, Decoder, EncodeStats, Encoder};
pub use spec::{CodecSpec, SpecError};
