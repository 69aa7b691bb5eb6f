//! The byte-level stage of a codec: `gzip` (flate2) or `zstd`, applied to a
//! section of a frame (the page records, or the pages sent whole).
//!
//! A zstd compressor may train a dictionary on the first pages it sees and
//! then use it; the dictionary travels in-band, once, ahead of the first
//! section compressed with it:
//!
//! ```text
//! zstd section: flag u8 (0 plain, 1 current dictionary, 2 new dictionary)
//!               [flag 2: varint length | dictionary bytes]
//!               zstd frame
//! gzip section: one gzip member
//! none:         the bytes themselves
//! ```
//!
//! A decompressor never produces more than the length the frame header
//! announced, and a new dictionary takes effect only when the frame that
//! carried it is committed.

use std::fmt;
use std::io::{Read, Write};

use crate::batch::PAGE_BYTES;
use crate::varint;

/// Identifies the compressor of a section in a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CompressorId {
    /// Stored as is.
    None = 0,
    /// gzip.
    Gzip = 1,
    /// zstd.
    Zstd = 2,
}

impl CompressorId {
    /// Parses a frame header's byte.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::None),
            1 => Some(Self::Gzip),
            2 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A byte-level compressor and its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompressorSpec {
    /// No compression.
    #[default]
    None,
    /// gzip at `level` (0 to 9).
    Gzip {
        /// flate2 compression level.
        level: u32,
    },
    /// zstd at `level`, with a dictionary of up to `dictionary_bytes` trained
    /// on the first pages (0: no dictionary).
    Zstd {
        /// zstd compression level (negative levels are the fast ones).
        level: i32,
        /// Dictionary size; 0 for none.
        dictionary_bytes: usize,
    },
}

impl CompressorSpec {
    /// The id written into frame headers.
    pub fn id(self) -> CompressorId {
        match self {
            Self::None => CompressorId::None,
            Self::Gzip { .. } => CompressorId::Gzip,
            Self::Zstd { .. } => CompressorId::Zstd,
        }
    }
}

impl fmt::Display for CompressorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Gzip { level } => write!(f, "gzip:level={level}"),
            Self::Zstd {
                level,
                dictionary_bytes: 0,
            } => write!(f, "zstd:level={level}"),
            Self::Zstd {
                level,
                dictionary_bytes,
            } => write!(
                f,
                "zstd:level={level},dict={}",
                crate::size::format_size(*dictionary_bytes as u64)
            ),
        }
    }
}

/// A section that cannot be compressed or decompressed.
#[derive(Debug, thiserror::Error)]
pub enum CompressorError {
    /// The compression library failed while compressing.
    #[error("{compressor} compression failed")]
    Compress {
        /// Which compressor.
        compressor: &'static str,
        /// What the library said.
        #[source]
        source: std::io::Error,
    },
    /// The compressed bytes are not valid.
    #[error("{compressor} data is corrupted")]
    Corrupted {
        /// Which compressor.
        compressor: &'static str,
        /// What the library said.
        #[source]
        source: std::io::Error,
    },
    /// The section decompressed to a length other than announced.
    #[error(
        "{compressor} data decompressed to {actual} bytes where the frame announced {expected}"
    )]
    WrongLength {
        /// Which compressor.
        compressor: &'static str,
        /// Announced length.
        expected: usize,
        /// Length produced (or at least this much).
        actual: usize,
    },
    /// The zstd flag byte is missing or unknown.
    #[error("zstd section has an unknown dictionary flag {0}")]
    BadDictionaryFlag(u8),
    /// A section refers to a dictionary the decoder does not have.
    #[error("zstd section uses a dictionary the decoder never received")]
    MissingDictionary,
    /// The in-band dictionary is malformed.
    #[error("zstd section carries a malformed dictionary")]
    BadDictionary,
}

/// What the decoder stages from a section, to keep only if the frame checks.
pub struct StagedDictionary(Vec<u8>);

enum DictionaryState {
    /// Collecting pages to train on.
    Collecting { samples: Vec<u8>, attempts: u32 },
    /// Trained: sent in the next section, then used.
    Trained { dictionary: Vec<u8>, sent: bool },
    /// Not used (none asked for, or training failed for good).
    Off,
}

/// The encoder's side of one section's compressor.
pub struct Compressor {
    spec: CompressorSpec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    dictionary: DictionaryState,
    scratch: Vec<u8>,
}

impl Compressor {
    /// A compressor for `spec`.
    pub fn new(spec: CompressorSpec) -> Self {
        let dictionary = match spec {
            CompressorSpec::Zstd {
                dictionary_bytes, ..
            } if dictionary_bytes > 0 => DictionaryState::Collecting {
                samples: Vec::new(),
                attempts: 0,
            },
            _ => DictionaryState::Off,
        };
        Self {
            spec,
            zstd: None,
            dictionary,
            scratch: Vec::new(),
        }
    }

    /// The spec this compressor was made from.
    pub fn spec(&self) -> CompressorSpec {
        self.spec
    }

    /// Bytes of state held (dictionary and training samples).
    pub fn memory_bytes(&self) -> usize {
        match &self.dictionary {
            DictionaryState::Collecting { samples, .. } => samples.capacity(),
            DictionaryState::Trained { dictionary, .. } => dictionary.len(),
            DictionaryState::Off => 0,
        }
    }

    /// Appends the compressed form of `input` to `out`.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), CompressorError> {
        match self.spec {
            CompressorSpec::None => {
                out.extend_from_slice(input);
                Ok(())
            }
            CompressorSpec::Gzip { level } => {
                let mut encoder = flate2::write::GzEncoder::new(
                    std::mem::take(out),
                    flate2::Compression::new(level.min(9)),
                );
                let fail = |source| CompressorError::Compress {
                    compressor: "gzip",
                    source,
                };
                encoder.write_all(input).map_err(fail)?;
                *out = encoder.finish().map_err(fail)?;
                Ok(())
            }
            CompressorSpec::Zstd {
                level,
                dictionary_bytes,
            } => self.compress_zstd(level, dictionary_bytes, input, out),
        }
    }

    fn compress_zstd(
        &mut self,
        level: i32,
        dictionary_bytes: usize,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CompressorError> {
        let fail = |source| CompressorError::Compress {
            compressor: "zstd",
            source,
        };
        self.train_if_ready(dictionary_bytes, input);
        let flag = match &mut self.dictionary {
            DictionaryState::Trained { dictionary, sent } if !*sent => {
                *sent = true;
                out.push(2);
                varint::write(out, dictionary.len() as u64);
                out.extend_from_slice(dictionary);
                self.zstd =
                    Some(zstd::bulk::Compressor::with_dictionary(level, dictionary).map_err(fail)?);
                return self.finish_zstd(input, out);
            }
            DictionaryState::Trained { .. } => 1,
            _ => 0,
        };
        out.push(flag);
        if self.zstd.is_none() {
            self.zstd = Some(zstd::bulk::Compressor::new(level).map_err(fail)?);
        }
        self.finish_zstd(input, out)
    }

    fn finish_zstd(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), CompressorError> {
        let compressor = self.zstd.as_mut().expect("zstd compressor created above");
        // zstd writes from the start of the buffer it is given, into its
        // capacity: compress into scratch space, then append.
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(input.len()));
        compressor
            .compress_to_buffer(input, &mut self.scratch)
            .map_err(|source| CompressorError::Compress {
                compressor: "zstd",
                source,
            })?;
        out.extend_from_slice(&self.scratch);
        Ok(())
    }

    /// Trains the dictionary once enough pages were seen: up to 100 times the
    /// dictionary size, zstd's own rule of thumb, or 16 MiB.
    fn train_if_ready(&mut self, dictionary_bytes: usize, input: &[u8]) {
        let DictionaryState::Collecting { samples, attempts } = &mut self.dictionary else {
            return;
        };
        let wanted = (dictionary_bytes * 100).min(16 << 20);
        let room = wanted.saturating_sub(samples.len());
        let take = (input.len().min(room) / PAGE_BYTES) * PAGE_BYTES;
        samples.extend_from_slice(&input[..take]);
        if samples.len() < wanted && samples.len() < dictionary_bytes * 8 {
            return;
        }
        let sizes = vec![PAGE_BYTES; samples.len() / PAGE_BYTES];
        match zstd::dict::from_continuous(samples, &sizes, dictionary_bytes) {
            Ok(dictionary) => {
                self.dictionary = DictionaryState::Trained {
                    dictionary,
                    sent: false,
                }
            }
            Err(error) => {
                *attempts += 1;
                tracing::debug!(%error, attempts, "zstd dictionary training failed");
                if *attempts >= 3 || samples.len() >= wanted {
                    self.dictionary = DictionaryState::Off;
                }
            }
        }
    }
}

/// The decoder's side of one section's compressor (any kind: the frame
/// header says which).
#[derive(Default)]
pub struct Decompressor {
    dictionary: Option<Vec<u8>>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    /// A decompressor with no dictionary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of state held.
    pub fn memory_bytes(&self) -> usize {
        self.dictionary.as_ref().map_or(0, Vec::len)
    }

    /// Decompresses `input`, made by compressor `id`, into `out` (cleared
    /// first), which must come out exactly `expected_len` bytes long.
    ///
    /// Returns the dictionary the section introduced, to be committed with
    /// the frame.
    pub fn decompress(
        &mut self,
        id: CompressorId,
        input: &[u8],
        expected_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<StagedDictionary>, CompressorError> {
        out.clear();
        match id {
            CompressorId::None => {
                if input.len() != expected_len {
                    return Err(CompressorError::WrongLength {
                        compressor: "stored",
                        expected: expected_len,
                        actual: input.len(),
                    });
                }
                out.extend_from_slice(input);
                Ok(None)
            }
            CompressorId::Gzip => {
                let decoder = flate2::read::GzDecoder::new(input);
                decoder
                    .take(expected_len as u64 + 1)
                    .read_to_end(out)
                    .map_err(|source| CompressorError::Corrupted {
                        compressor: "gzip",
                        source,
                    })?;
                check_length("gzip", expected_len, out.len())?;
                Ok(None)
            }
            CompressorId::Zstd => self.decompress_zstd(input, expected_len, out),
        }
    }

    fn decompress_zstd(
        &mut self,
        input: &[u8],
        expected_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<StagedDictionary>, CompressorError> {
        let corrupted = |source| CompressorError::Corrupted {
            compressor: "zstd",
            source,
        };
        let (&flag, rest) = input
            .split_first()
            .ok_or(CompressorError::BadDictionaryFlag(0xff))?;
        out.reserve_exact(expected_len);
        match flag {
            0 => {
                let mut plain = zstd::bulk::Decompressor::new().map_err(corrupted)?;
                plain.decompress_to_buffer(rest, out).map_err(corrupted)?;
                check_length("zstd", expected_len, out.len())?;
                Ok(None)
            }
            1 => {
                let decompressor = self
                    .zstd
                    .as_mut()
                    .ok_or(CompressorError::MissingDictionary)?;
                decompressor
                    .decompress_to_buffer(rest, out)
                    .map_err(corrupted)?;
                check_length("zstd", expected_len, out.len())?;
                Ok(None)
            }
            2 => {
                let mut position = 0;
                let length = varint::read(rest, &mut position)
                    .map_err(|_| CompressorError::BadDictionary)?;
                let end = usize::try_from(length)
                    .ok()
                    .and_then(|length| position.checked_add(length))
                    .filter(|end| *end <= rest.len())
                    .ok_or(CompressorError::BadDictionary)?;
                let dictionary = rest[position..end].to_vec();
                let mut with_dictionary = zstd::bulk::Decompressor::with_dictionary(&dictionary)
                    .map_err(|_| CompressorError::BadDictionary)?;
                with_dictionary
                    .decompress_to_buffer(&rest[end..], out)
                    .map_err(corrupted)?;
                check_length("zstd", expected_len, out.len())?;
                Ok(Some(StagedDictionary(dictionary)))
            }
            other => Err(CompressorError::BadDictionaryFlag(other)),
        }
    }

    /// Makes a dictionary staged by [`decompress`](Self::decompress) current.
    pub fn commit(&mut self, staged: StagedDictionary) -> Result<(), CompressorError> {
        self.zstd = Some(
            zstd::bulk::Decompressor::with_dictionary(&staged.0)
                .map_err(|_| CompressorError::BadDictionary)?,
        );
        self.dictionary = Some(staged.0);
        Ok(())
    }
}

fn check_length(
    compressor: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), CompressorError> {
    if expected == actual {
        Ok(())
    } else {
        Err(CompressorError::WrongLength {
            compressor,
            expected,
            actual,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_pages(count: usize) -> Vec<u8> {
        (0..count * PAGE_BYTES)
            .map(|i| ((i / 16) % 7).to_le_bytes()[0] ^ ((i / PAGE_BYTES).to_le_bytes()[0] & 3))
            .collect()
    }

    fn round_trip(spec: CompressorSpec, input: &[u8]) -> Vec<u8> {
        let mut compressor = Compressor::new(spec);
        let mut decompressor = Decompressor::new();
        let mut compressed = Vec::new();
        compressor
            .compress(input, &mut compressed)
            .expect("compress");
        let mut out = Vec::new();
        let staged = decompressor
            .decompress(spec.id(), &compressed, input.len(), &mut out)
            .expect("decompress");
        if let Some(staged) = staged {
            decompressor.commit(staged).expect("commit");
        }
        out
    }

    #[test]
    fn gzip_round_trips() {
        let input = sample_pages(3);
        assert_eq!(round_trip(CompressorSpec::Gzip { level: 6 }, &input), input);
    }

    #[test]
    fn zstd_round_trips() {
        let input = sample_pages(3);
        let spec = CompressorSpec::Zstd {
            level: 3,
            dictionary_bytes: 0,
        };
        assert_eq!(round_trip(spec, &input), input);
    }

    #[test]
    fn zstd_dictionary_is_sent_once_and_then_used() {
        let spec = CompressorSpec::Zstd {
            level: 3,
            dictionary_bytes: 4096,
        };
        let mut compressor = Compressor::new(spec);
        let mut decompressor = Decompressor::new();
        let input = sample_pages(64);
        let mut flags = Vec::new();

        for _ in 0..3 {
            let mut compressed = Vec::new();
            compressor
                .compress(&input, &mut compressed)
                .expect("compress");
            flags.push(compressed[0]);
            let mut out = Vec::new();
            let staged = decompressor
                .decompress(CompressorId::Zstd, &compressed, input.len(), &mut out)
                .expect("decompress");
            assert_eq!(out, input);
            if let Some(staged) = staged {
                decompressor.commit(staged).expect("commit");
            }
        }

        assert_eq!(flags, vec![2, 1, 1]);
    }

    #[test]
    fn section_using_an_unknown_dictionary_is_refused() {
        let mut out = Vec::new();
        let result = Decompressor::new().decompress(CompressorId::Zstd, &[1, 0, 0], 10, &mut out);
        assert!(matches!(result, Err(CompressorError::MissingDictionary)));
    }

    #[test]
    fn gzip_longer_than_announced_is_refused() {
        let input = sample_pages(2);
        let mut compressed = Vec::new();
        Compressor::new(CompressorSpec::Gzip { level: 1 })
            .compress(&input, &mut compressed)
            .expect("compress");
        let mut out = Vec::new();

        let result =
            Decompressor::new().decompress(CompressorId::Gzip, &compressed, PAGE_BYTES, &mut out);

        assert!(matches!(result, Err(CompressorError::WrongLength { .. })));
        assert!(out.len() <= PAGE_BYTES + 1);
    }

    #[test]
    fn zstd_longer_than_announced_is_refused() {
        let input = sample_pages(2);
        let mut compressed = Vec::new();
        Compressor::new(CompressorSpec::Zstd {
            level: 1,
            dictionary_bytes: 0,
        })
        .compress(&input, &mut compressed)
        .expect("compress");
        let mut out = Vec::new();

        let result =
            Decompressor::new().decompress(CompressorId::Zstd, &compressed, PAGE_BYTES, &mut out);

        assert!(result.is_err());
    }
}
