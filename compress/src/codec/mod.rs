//! Encoder and decoder of page batches, and the frame between them.
//!
//! ```text
//! frame:  header (56 bytes, little-endian)
//!           0  magic "UPGF"
//!           4  version u8 (1)
//!           5  records compressor u8   (0 none, 1 gzip, 2 zstd)
//!           6  literals compressor u8
//!           7  reserved u8 (0)
//!           8  sequence u64            (0, 1, 2, ... per stream)
//!          16  page count u32
//!          20  whole pages u32         (pages in the literal section)
//!          24  records length u32      (decompressed)
//!          28  compressed records length u32
//!          32  store pages u32         (version store capacity of both sides)
//!          36  payload length u32      (bytes after the header)
//!          40  content checksum u64    (xxh3 of the decoded batch)
//!          48  header checksum u64     (xxh3 of bytes 0..48)
//!         compressed records | compressed literal section
//! ```
//!
//! Sequence of a stream: the encoder numbers frames from 0; the decoder
//! accepts only the next number. Each side updates its reference state
//! (version store, dictionaries) once per frame: the encoder as it encodes,
//! the decoder only after the frame decoded completely *and* its content
//! checksum matched. A corrupted, truncated, reordered or foreign frame is an
//! error that leaves the decoder exactly as it was; a decoder whose
//! references drifted from the encoder's (a bug, or a frame lost) shows up as
//! a checksum mismatch, never as silently wrong pages.

use xxhash_rust::xxh3::xxh3_64;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::auto::AutoPolicy;
use crate::batch::{PAGE_BYTES, PageBatch};
use crate::compressor::{Compressor, CompressorError, CompressorId, CompressorSpec, Decompressor};
use crate::spec::{CodecSpec, TransformKind};
use crate::transform::{TransformDecoder, TransformEncoder, TransformError, TransformStats};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"UPGF";
/// Frame format version.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 56;
/// Most pages in one frame (1 GiB); larger epochs are split by the caller.
pub const MAX_PAGES_PER_FRAME: usize = 1 << 18;

/// A frame that cannot be made or applied.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Shorter than its header says.
    #[error("frame is truncated: {actual} bytes where {expected} were announced")]
    Truncated {
        /// Bytes announced.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// Not a frame.
    #[error("not a page frame (bad magic)")]
    BadMagic,
    /// From another version.
    #[error("page frame version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u8),
    /// Header corrupted.
    #[error("page frame header is corrupted (checksum mismatch)")]
    HeaderChecksum,
    /// Not the frame expected next.
    #[error(
        "frame {actual} arrived where frame {expected} was expected: frames were lost or reordered"
    )]
    OutOfOrder {
        /// The next sequence number the decoder accepts.
        expected: u64,
        /// The frame's.
        actual: u64,
    },
    /// Encoder and decoder disagree about the version store.
    #[error("frame uses a version store of {frame} pages where this stream uses {stream}")]
    StoreMismatch {
        /// Capacity in the frame.
        frame: usize,
        /// Capacity of the stream.
        stream: usize,
    },
    /// Unknown compressor byte.
    #[error("frame names unknown compressor {0}")]
    UnknownCompressor(u8),
    /// Header counts that cannot be right.
    #[error("frame header is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// An earlier encode failed after the encoder's state advanced.
    #[error("the encoder failed earlier and is out of step with its decoder: start a new stream")]
    EncoderBroken,
    /// More pages than a frame may hold.
    #[error("a batch of {0} pages is more than one frame holds ({MAX_PAGES_PER_FRAME})")]
    BatchTooLarge(usize),
    /// A section failed to compress.
    #[error("cannot compress the {section} section")]
    Compress {
        /// Which section.
        section: &'static str,
        /// Why.
        #[source]
        source: CompressorError,
    },
    /// A section failed to decompress.
    #[error("cannot decompress the {section} section")]
    Decompress {
        /// Which section.
        section: &'static str,
        /// Why.
        #[source]
        source: CompressorError,
    },
    /// The page records are malformed.
    #[error("cannot decode the page records")]
    Records(#[from] TransformError),
    /// A version store larger than this decoder allows.
    #[error("frame asks for a version store of {frame} pages; this stream allows at most {limit}")]
    StoreTooLarge {
        /// Capacity in the frame.
        frame: usize,
        /// Most this decoder allows.
        limit: usize,
    },
    /// A page number beyond the memory the stream describes.
    #[error("frame {sequence} carries page {page_number}, beyond the {limit} pages of this memory")]
    PageOutOfRange {
        /// The frame.
        sequence: u64,
        /// The page.
        page_number: u64,
        /// Pages of the memory.
        limit: u64,
    },
    /// Decoded, but not to what the encoder had.
    #[error(
        "frame {sequence} decoded to pages that do not match its checksum: the frame is corrupted or the decoder's reference pages are out of sync with the encoder's"
    )]
    ContentChecksum {
        /// The frame.
        sequence: u64,
    },
}

/// What encoding one batch did.
#[derive(Clone, Copy, Debug, Default)]
pub struct EncodeStats {
    /// Pages in the batch.
    pub pages: usize,
    /// Bytes of page contents in.
    pub input_bytes: usize,
    /// Bytes of frame out.
    pub output_bytes: usize,
    /// How pages were encoded.
    pub transform: TransformStats,
    /// The compressor used for the records (the `auto` policy's choice).
    pub compressor: CompressorSpec,
}

/// What decoding one frame did.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeStats {
    /// Pages decoded.
    pub pages: usize,
    /// Frame bytes in.
    pub input_bytes: usize,
}

/// Turns page batches into frames. One encoder per stream.
pub struct Encoder {
    spec: CodecSpec,
    transform: TransformEncoder,
    records_compressor: Compressor,
    literals_compressor: Compressor,
    /// Whether each section has been compressing lately.
    records_payoff: Payoff,
    literals_payoff: Payoff,
    auto: Option<AutoPolicy>,
    sequence: u64,
    records: Vec<u8>,
    literals: Vec<u8>,
    broken: bool,
}

impl Encoder {
    /// An encoder for `spec`, at the start of a stream.
    pub fn new(spec: &CodecSpec) -> Self {
        Self {
            spec: *spec,
            transform: TransformEncoder::new(spec.transform, spec.cache_pages(), spec.samples),
            records_compressor: Compressor::new(spec.compressor),
            literals_compressor: Compressor::new(spec.literal_compressor()),
            records_payoff: Payoff::default(),
            literals_payoff: Payoff::default(),
            auto: spec.auto_link_mbit.map(AutoPolicy::new),
            sequence: 0,
            records: Vec::new(),
            literals: Vec::new(),
            broken: false,
        }
    }

    /// The spec this encoder was made from.
    pub fn spec(&self) -> &CodecSpec {
        &self.spec
    }

    /// Bytes of state held: page versions, fingerprint tables, dictionaries.
    pub fn memory_bytes(&self) -> usize {
        self.transform.memory_bytes()
            + self.records_compressor.memory_bytes()
            + self.literals_compressor.memory_bytes()
    }

    /// Encodes `batch` as the next frame of the stream, appended to `out`.
    ///
    /// A batch refused up front (too large) changes nothing. Any later
    /// failure leaves `out` as it was and the encoder unusable (its reference
    /// state already moved on): the stream must start again.
    pub fn encode(
        &mut self,
        batch: &PageBatch,
        out: &mut Vec<u8>,
    ) -> Result<EncodeStats, CodecError> {
        if self.broken {
            return Err(CodecError::EncoderBroken);
        }
        if batch.len() > MAX_PAGES_PER_FRAME {
            return Err(CodecError::BatchTooLarge(batch.len()));
        }
        let start = out.len();
        let result = self.encode_frame(batch, out);
        if result.is_err() {
            out.truncate(start);
            self.broken = true;
        }
        result
    }

    fn encode_frame(
        &mut self,
        batch: &PageBatch,
        out: &mut Vec<u8>,
    ) -> Result<EncodeStats, CodecError> {
        self.records.clear();
        self.literals.clear();
        if let Some(auto) = &self.auto {
            self.transform.search = auto.search_enabled();
        }
        let transform = self
            .transform
            .encode(batch, &mut self.records, &mut self.literals);
        let literal_bytes = if self.transform.kind() == TransformKind::Raw {
            batch.contents()
        } else {
            &self.literals
        };
        // The sections go straight into `out`, after room for the header.
        let start = out.len();
        out.resize(start + HEADER_LEN, 0);
        let (records_id, literals_id, compressor, records_end) = match &mut self.auto {
            None => {
                let records_id = compress_if_it_pays(
                    &mut self.records_compressor,
                    &mut self.records_payoff,
                    &self.records,
                    out,
                )
                .map_err(|source| CodecError::Compress {
                    section: "records",
                    source,
                })?;
                let records_end = out.len();
                let literals_id = compress_if_it_pays(
                    &mut self.literals_compressor,
                    &mut self.literals_payoff,
                    literal_bytes,
                    out,
                )
                .map_err(|source| CodecError::Compress {
                    section: "literal",
                    source,
                })?;
                (
                    records_id,
                    literals_id,
                    self.records_compressor.spec(),
                    records_end,
                )
            }
            Some(auto) => {
                auto.observe_transform(&transform);
                let (spec, records_len) = auto
                    .compress(&self.records, literal_bytes, out)
                    .map_err(|source| CodecError::Compress {
                        section: "records or literal",
                        source,
                    })?;
                (spec.id(), spec.id(), spec, start + HEADER_LEN + records_len)
            }
        };
        let too_large = |_| CodecError::BatchTooLarge(batch.len());
        let header = FrameHeader {
            records_compressor: records_id as u8,
            literals_compressor: literals_id as u8,
            sequence: self.sequence,
            page_count: u32::try_from(batch.len()).map_err(too_large)?,
            literal_pages: u32::try_from(literal_bytes.len() / PAGE_BYTES).map_err(too_large)?,
            records_len: u32::try_from(self.records.len()).map_err(too_large)?,
            compressed_records_len: u32::try_from(records_end - start - HEADER_LEN)
                .map_err(too_large)?,
            store_pages: u32::try_from(self.transform.store_capacity()).map_err(too_large)?,
            payload_len: u32::try_from(out.len() - start - HEADER_LEN).map_err(too_large)?,
            content_checksum: batch.checksum(),
        };
        out[start..start + HEADER_LEN].copy_from_slice(&header.encode());
        self.sequence += 1;
        Ok(EncodeStats {
            pages: batch.len(),
            input_bytes: batch.content_bytes(),
            output_bytes: out.len() - start,
            transform,
            compressor,
        })
    }
}

/// A section that shrank by less than this share (percent of its input)
/// did not pay for its compression.
const INCOMPRESSIBLE_PERCENT: usize = 97;
/// Sections smaller than this are not judged (their output is overhead).
const MIN_JUDGED_BYTES: usize = 16 << 10;
/// Most batches a section goes stored before it is tried again.
const MAX_STORED_RUN: u32 = 64;

/// Learns per batch whether a section compresses: after a batch whose
/// section shrank by less than 3 %, the next 1, 2, 4, … 64 batches store it
/// (the frame says `none` for it) before one is compressed again to check;
/// a batch that compresses resets the run. Random or encrypted memory then
/// costs no compression after the first batches, and memory that becomes
/// compressible again is noticed within 64 batches.
#[derive(Debug, Default)]
struct Payoff {
    stored_left: u32,
    run: u32,
}

impl Payoff {
    /// Whether to compress this batch's section.
    fn try_now(&mut self) -> bool {
        if self.stored_left == 0 {
            return true;
        }
        self.stored_left -= 1;
        false
    }

    /// A compressed section of `input` bytes came out as `output`.
    fn judge(&mut self, input: usize, output: usize) {
        if input < MIN_JUDGED_BYTES {
            return;
        }
        if output * 100 >= input * INCOMPRESSIBLE_PERCENT {
            self.run = (self.run * 2).clamp(1, MAX_STORED_RUN);
            self.stored_left = self.run;
        } else {
            self.run = 0;
        }
    }
}

/// Appends `input` to `out` compressed by `compressor`, or stored when
/// compression has not been paying ([`Payoff`]); returns how it went.
fn compress_if_it_pays(
    compressor: &mut Compressor,
    payoff: &mut Payoff,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<CompressorId, CompressorError> {
    if compressor.spec() == CompressorSpec::None || !payoff.try_now() {
        out.extend_from_slice(input);
        return Ok(CompressorId::None);
    }
    let before = out.len();
    compressor.compress(input, out)?;
    payoff.judge(input.len(), out.len() - before);
    Ok(compressor.spec().id())
}

/// Largest version store an unbounded decoder ([`Decoder::new`]) accepts
/// from a frame: 1 GiB of pages.
pub const DEFAULT_MAX_STORE_PAGES: usize = 1 << 18;

/// Turns frames back into page batches. One decoder per stream; it accepts
/// frames from any codec (the frame says how it was made).
///
/// The frame header says how large a version store the stream keeps; a
/// decoder never allocates one larger than its limit, and a decoder made
/// for a memory ([`Decoder::bounded`]) refuses page numbers beyond it, all
/// before any reference state changes.
pub struct Decoder {
    transform: Option<TransformDecoder>,
    /// The store capacity this stream must use, when agreed beforehand.
    expected_store_pages: Option<usize>,
    max_store_pages: usize,
    /// Pages of the memory the frames describe, when known.
    page_limit: Option<u64>,
    records_decompressor: Decompressor,
    literals_decompressor: Decompressor,
    next_sequence: u64,
    records: Vec<u8>,
    literals: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            transform: None,
            expected_store_pages: None,
            max_store_pages: DEFAULT_MAX_STORE_PAGES,
            page_limit: None,
            records_decompressor: Decompressor::default(),
            literals_decompressor: Decompressor::default(),
            next_sequence: 0,
            records: Vec::new(),
            literals: Vec::new(),
        }
    }
}

impl Decoder {
    /// Gives back the scratch space sized for the largest frame decoded so
    /// far (after a stream's initial copy); later frames grow it again as
    /// they need. The reference state is kept.
    pub fn release_buffers(&mut self) {
        self.records = Vec::new();
        self.literals = Vec::new();
    }

    /// A decoder at the start of a stream, accepting a version store of at
    /// most [`DEFAULT_MAX_STORE_PAGES`] and any page number.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder for a memory of `memory_pages` pages whose stream was
    /// agreed to keep a version store of exactly `store_pages`: frames that
    /// say otherwise, or carry a page number beyond the memory, are refused.
    pub fn bounded(store_pages: usize, memory_pages: u64) -> Self {
        Self {
            expected_store_pages: Some(store_pages),
            max_store_pages: store_pages,
            page_limit: Some(memory_pages),
            ..Self::default()
        }
    }

    /// The sequence number of the next frame this decoder accepts.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Bytes of state held: page versions and dictionaries.
    pub fn memory_bytes(&self) -> usize {
        self.transform
            .as_ref()
            .map_or(0, TransformDecoder::memory_bytes)
            + self.records_decompressor.memory_bytes()
            + self.literals_decompressor.memory_bytes()
    }

    /// Decodes one whole frame into `out` (cleared first) and commits it.
    ///
    /// On error nothing in the decoder changed, and `out` holds nothing to
    /// use.
    pub fn decode(&mut self, frame: &[u8], out: &mut PageBatch) -> Result<DecodeStats, CodecError> {
        out.clear();
        let header = FrameHeader::read(frame)?;
        if header.sequence != self.next_sequence {
            return Err(CodecError::OutOfOrder {
                expected: self.next_sequence,
                actual: header.sequence,
            });
        }
        let store_pages = header.store_pages as usize;
        let stream_store = self
            .transform
            .as_ref()
            .map(TransformDecoder::store_capacity)
            .or(self.expected_store_pages);
        if let Some(stream) = stream_store
            && stream != store_pages
        {
            return Err(CodecError::StoreMismatch {
                frame: store_pages,
                stream,
            });
        }
        if store_pages > self.max_store_pages {
            return Err(CodecError::StoreTooLarge {
                frame: store_pages,
                limit: self.max_store_pages,
            });
        }
        let records_id = CompressorId::from_byte(header.records_compressor)
            .ok_or(CodecError::UnknownCompressor(header.records_compressor))?;
        let literals_id = CompressorId::from_byte(header.literals_compressor)
            .ok_or(CodecError::UnknownCompressor(header.literals_compressor))?;
        let page_count = header.page_count as usize;
        let literal_pages = header.literal_pages as usize;
        if page_count > MAX_PAGES_PER_FRAME {
            return Err(CodecError::Inconsistent("more pages than a frame holds"));
        }
        if literal_pages > page_count {
            return Err(CodecError::Inconsistent("more whole pages than pages"));
        }
        if header.records_len as usize > page_count * (PAGE_BYTES + 40) {
            return Err(CodecError::Inconsistent("records longer than their pages"));
        }
        let payload = &frame[HEADER_LEN..];
        let split = header.compressed_records_len as usize;
        if split > payload.len() {
            return Err(CodecError::Inconsistent(
                "records section longer than the payload",
            ));
        }
        let (records, literals) = payload.split_at(split);
        let staged_records = self
            .records_decompressor
            .decompress(
                records_id,
                records,
                header.records_len as usize,
                &mut self.records,
            )
            .map_err(|source| CodecError::Decompress {
                section: "records",
                source,
            })?;
        let staged_literals = self
            .literals_decompressor
            .decompress(
                literals_id,
                literals,
                literal_pages * PAGE_BYTES,
                &mut self.literals,
            )
            .map_err(|source| CodecError::Decompress {
                section: "literal",
                source,
            })?;
        let fresh;
        let transform = match &self.transform {
            Some(transform) => transform,
            None => {
                fresh = TransformDecoder::new(store_pages);
                &fresh
            }
        };
        transform.decode(&self.records, &self.literals, page_count, out)?;
        if out.checksum() != header.content_checksum {
            out.clear();
            return Err(CodecError::ContentChecksum {
                sequence: header.sequence,
            });
        }
        if let Some(limit) = self.page_limit
            && let Some(&page_number) = out.page_numbers().iter().find(|page| **page >= limit)
        {
            out.clear();
            return Err(CodecError::PageOutOfRange {
                sequence: header.sequence,
                page_number,
                limit,
            });
        }
        // Verified: commit every piece of reference state.
        let commit = |decompressor: &mut Decompressor, staged, section| match staged {
            Some(staged) => decompressor
                .commit(staged)
                .map_err(|source| CodecError::Decompress { section, source }),
            None => Ok(()),
        };
        commit(&mut self.records_decompressor, staged_records, "records")?;
        commit(&mut self.literals_decompressor, staged_literals, "literal")?;
        self.transform
            .get_or_insert_with(|| TransformDecoder::new(store_pages))
            .commit(out);
        self.next_sequence += 1;
        Ok(DecodeStats {
            pages: page_count,
            input_bytes: frame.len(),
        })
    }
}

/// The fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    records_compressor: u8,
    literals_compressor: u8,
    sequence: u64,
    page_count: u32,
    literal_pages: u32,
    records_len: u32,
    compressed_records_len: u32,
    store_pages: u32,
    payload_len: u32,
    content_checksum: u64,
}

/// The header as it is in a frame (see the module docs), little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct FrameLayout {
    magic: [u8; 4],
    version: u8,
    records_compressor: u8,
    literals_compressor: u8,
    reserved: u8,
    sequence: U64,
    page_count: U32,
    literal_pages: U32,
    records_len: U32,
    compressed_records_len: U32,
    store_pages: U32,
    payload_len: U32,
    content_checksum: U64,
    /// xxh3 of the bytes before it.
    header_checksum: U64,
}

const _: () = assert!(std::mem::size_of::<FrameLayout>() == HEADER_LEN);

impl FrameLayout {
    fn checksummed(&self) -> &[u8] {
        &self.as_bytes()[..HEADER_LEN - 8]
    }
}

impl FrameHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut layout = FrameLayout {
            magic: MAGIC,
            version: VERSION,
            records_compressor: self.records_compressor,
            literals_compressor: self.literals_compressor,
            reserved: 0,
            sequence: self.sequence.into(),
            page_count: self.page_count.into(),
            literal_pages: self.literal_pages.into(),
            records_len: self.records_len.into(),
            compressed_records_len: self.compressed_records_len.into(),
            store_pages: self.store_pages.into(),
            payload_len: self.payload_len.into(),
            content_checksum: self.content_checksum.into(),
            header_checksum: 0.into(),
        };
        layout.header_checksum = xxh3_64(layout.checksummed()).into();
        let mut bytes = [0u8; HEADER_LEN];
        bytes.copy_from_slice(layout.as_bytes());
        bytes
    }

    fn read(frame: &[u8]) -> Result<Self, CodecError> {
        let Ok((layout, _)) = FrameLayout::read_from_prefix(frame) else {
            return Err(CodecError::Truncated {
                expected: HEADER_LEN,
                actual: frame.len(),
            });
        };
        if layout.magic != MAGIC {
            return Err(CodecError::BadMagic);
        }
        if xxh3_64(layout.checksummed()) != layout.header_checksum.get() {
            return Err(CodecError::HeaderChecksum);
        }
        if layout.version != VERSION {
            return Err(CodecError::UnsupportedVersion(layout.version));
        }
        let header = Self {
            records_compressor: layout.records_compressor,
            literals_compressor: layout.literals_compressor,
            sequence: layout.sequence.get(),
            page_count: layout.page_count.get(),
            literal_pages: layout.literal_pages.get(),
            records_len: layout.records_len.get(),
            compressed_records_len: layout.compressed_records_len.get(),
            store_pages: layout.store_pages.get(),
            payload_len: layout.payload_len.get(),
            content_checksum: layout.content_checksum.get(),
        };
        let expected = HEADER_LEN + header.payload_len as usize;
        if frame.len() != expected {
            return Err(CodecError::Truncated {
                expected,
                actual: frame.len(),
            });
        }
        Ok(header)
    }
}

/// Encodes then decodes `batches` with `spec`, checking every page: used by
/// tests and the benchmark's own correctness check. Returns the frame sizes.
pub fn round_trip(spec: &CodecSpec, batches: &[PageBatch]) -> Result<Vec<usize>, CodecError> {
    let mut encoder = Encoder::new(spec);
    let mut decoder = Decoder::new();
    let mut frame = Vec::new();
    let mut decoded = PageBatch::new();
    let mut sizes = Vec::with_capacity(batches.len());
    for batch in batches {
        frame.clear();
        encoder.encode(batch, &mut frame)?;
        decoder.decode(&frame, &mut decoded)?;
        if decoded != *batch {
            return Err(CodecError::ContentChecksum {
                sequence: decoder.next_sequence() - 1,
            });
        }
        sizes.push(frame.len());
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests;
