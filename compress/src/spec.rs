//! Codec specifications, as users write them on the command line.
//!
//! ```text
//! raw                                   pages as they are
//! gzip[:level=N]                        gzip (flate2), level 0-9, default 6
//! zstd[:level=N][,dict=SIZE]            zstd, default level 3; dict trains a
//!                                       dictionary of SIZE on the first pages
//! delta[:cache=SIZE][,miss=C]           XOR against the page's last version
//! similarity[:cache=SIZE][,samples=N][,miss=C]
//!                                       also against similar pages elsewhere,
//!                                       duplicates and zero pages by reference
//! T+C                                   page stage T, then compressor C over
//!                                       everything, e.g. delta+zstd:level=1
//! auto[:cache=SIZE][,mbit=N]            similarity, compressor picked per
//!                                       batch for a link of N Mbit/s
//! ```
//!
//! `miss=C` compresses only the pages sent whole (`none`, `gzip-6`,
//! `zstd-1`, ...). SIZE takes K, M and G suffixes (powers of two).

use std::fmt;
use std::str::FromStr;

use understudy_guest_abi::usize_from;

use crate::compressor::CompressorSpec;
use crate::size::{format_size, parse_size};

/// Default version cache of `delta`, `similarity` and `auto`.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// Default number of sampled blocks per page for `similarity`.
pub const DEFAULT_SAMPLES: usize = 4;
/// Default link speed `auto` optimises for.
pub const DEFAULT_LINK_MBIT: u64 = 1000;

/// The page-level stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformKind {
    /// Every page sent whole.
    Raw,
    /// Against the same page's last version.
    Delta,
    /// Against any page the receiver holds, or by reference.
    Similarity,
}

/// A complete codec: page stage, compressors, and an optional policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodecSpec {
    /// The page-level stage.
    pub transform: TransformKind,
    /// Bytes of page versions each side keeps (delta and similarity).
    pub cache_bytes: u64,
    /// Sampled blocks per page (similarity).
    pub samples: usize,
    /// Compressor over the records and (unless `miss` is set) whole pages.
    pub compressor: CompressorSpec,
    /// Compressor for the pages sent whole, when it differs.
    pub miss: Option<CompressorSpec>,
    /// The `auto` policy: pick the compressor per batch for this link speed.
    pub auto_link_mbit: Option<u64>,
}

impl CodecSpec {
    /// A page stage with no compressor.
    pub fn transform(transform: TransformKind) -> Self {
        Self {
            transform,
            cache_bytes: if transform == TransformKind::Raw {
                0
            } else {
                DEFAULT_CACHE_BYTES
            },
            samples: DEFAULT_SAMPLES,
            compressor: CompressorSpec::None,
            miss: None,
            auto_link_mbit: None,
        }
    }

    /// `raw` followed by `compressor`.
    pub fn compressed(compressor: CompressorSpec) -> Self {
        Self {
            compressor,
            ..Self::transform(TransformKind::Raw)
        }
    }

    /// The compressor used for pages sent whole.
    pub fn literal_compressor(&self) -> CompressorSpec {
        self.miss.unwrap_or(self.compressor)
    }

    /// Pages of version cache.
    pub fn cache_pages(&self) -> usize {
        usize_from(self.cache_bytes / crate::PAGE_SIZE)
    }
}

/// A codec specification that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Unknown codec or compressor name.
    #[error("unknown codec `{0}` (expected raw, gzip, zstd, delta, similarity or auto)")]
    UnknownName(String),
    /// A parameter the codec does not have.
    #[error("codec `{codec}` has no parameter `{parameter}`")]
    UnknownParameter {
        /// The codec.
        codec: String,
        /// The parameter.
        parameter: String,
    },
    /// A parameter value out of range or malformed.
    #[error("bad value `{value}` for `{parameter}`: {why}")]
    BadValue {
        /// The parameter.
        parameter: String,
        /// The value given.
        value: String,
        /// What is expected.
        why: &'static str,
    },
    /// `+` used wrongly.
    #[error(
        "`{0}`: a composition is a page stage (raw, delta, similarity) followed by a compressor (gzip, zstd)"
    )]
    BadComposition(String),
}

fn bad(parameter: &str, value: &str, why: &'static str) -> SpecError {
    SpecError::BadValue {
        parameter: parameter.to_owned(),
        value: value.to_owned(),
        why,
    }
}

/// Splits `name:key=value,key=value` into the name and its parameters.
/// A name and its `key=value` parameters.
type Parameters<'a> = (&'a str, Vec<(&'a str, &'a str)>);

fn split_parameters(text: &str) -> Result<Parameters<'_>, SpecError> {
    let Some((name, parameters)) = text.split_once(':') else {
        return Ok((text, Vec::new()));
    };
    let parameters = parameters
        .split(',')
        .map(|pair| {
            pair.split_once('=')
                .ok_or_else(|| bad(pair, "", "parameters are written key=value"))
        })
        .collect::<Result<_, _>>()?;
    Ok((name, parameters))
}

fn unknown(codec: &str, parameter: &str) -> SpecError {
    SpecError::UnknownParameter {
        codec: codec.to_owned(),
        parameter: parameter.to_owned(),
    }
}

fn parse_compressor(text: &str) -> Result<Option<CompressorSpec>, SpecError> {
    let (name, parameters) = split_parameters(text)?;
    let mut spec = match name {
        "gzip" => CompressorSpec::Gzip { level: 6 },
        "zstd" => CompressorSpec::Zstd {
            level: 3,
            dictionary_bytes: 0,
        },
        _ => return Ok(None),
    };
    for (key, value) in parameters {
        match (&mut spec, key) {
            (CompressorSpec::Gzip { level }, "level") => {
                *level = value
                    .parse()
                    .ok()
                    .filter(|level| *level <= 9)
                    .ok_or_else(|| bad(key, value, "gzip levels are 0 to 9"))?;
            }
            (CompressorSpec::Zstd { level, .. }, "level") => {
                *level = value
                    .parse()
                    .ok()
                    .filter(|level| (-7..=22).contains(level))
                    .ok_or_else(|| bad(key, value, "zstd levels are -7 to 22"))?;
            }
            (
                CompressorSpec::Zstd {
                    dictionary_bytes, ..
                },
                "dict",
            ) => {
                *dictionary_bytes = parse_size(value)
                    .filter(|size| *size == 0 || (1024..=(1 << 20)).contains(size))
                    .map(usize_from)
                    .ok_or_else(|| bad(key, value, "a dictionary is 0 or 1K to 1M"))?;
            }
            _ => return Err(unknown(name, key)),
        }
    }
    Ok(Some(spec))
}

/// Parses a `miss=` value: `none`, `gzip`, `gzip-6`, `zstd`, `zstd-1`.
fn parse_miss(value: &str) -> Result<CompressorSpec, SpecError> {
    let (name, level) = value
        .split_once('-')
        .map_or((value, None), |(n, l)| (n, Some(l)));
    let text = match (name, level) {
        ("none", None) => return Ok(CompressorSpec::None),
        (name, Some(level)) => format!("{name}:level={level}"),
        (name, None) => name.to_owned(),
    };
    parse_compressor(&text)?.ok_or_else(|| bad("miss", value, "none, gzip[-LEVEL] or zstd[-LEVEL]"))
}

fn format_miss(spec: CompressorSpec) -> String {
    match spec {
        CompressorSpec::None => "none".to_owned(),
        CompressorSpec::Gzip { level } => format!("gzip-{level}"),
        CompressorSpec::Zstd { level, .. } => format!("zstd-{level}"),
    }
}

fn parse_stage(text: &str) -> Result<CodecSpec, SpecError> {
    if let Some(compressor) = parse_compressor(text)? {
        return Ok(CodecSpec::compressed(compressor));
    }
    let (name, parameters) = split_parameters(text)?;
    let mut spec = match name {
        "raw" => CodecSpec::transform(TransformKind::Raw),
        "delta" => CodecSpec::transform(TransformKind::Delta),
        "similarity" => CodecSpec::transform(TransformKind::Similarity),
        "auto" => CodecSpec {
            auto_link_mbit: Some(DEFAULT_LINK_MBIT),
            ..CodecSpec::transform(TransformKind::Similarity)
        },
        _ => return Err(SpecError::UnknownName(name.to_owned())),
    };
    for (key, value) in parameters {
        match key {
            "cache" if spec.transform != TransformKind::Raw => {
                spec.cache_bytes = parse_size(value)
                    .filter(|size| *size >= crate::PAGE_BYTES as u64)
                    .ok_or_else(|| bad(key, value, "a size of at least 4K, e.g. 256M"))?;
            }
            "samples" if spec.transform == TransformKind::Similarity => {
                spec.samples = value
                    .parse()
                    .ok()
                    .filter(|samples| (1..=8).contains(samples))
                    .ok_or_else(|| bad(key, value, "1 to 8 sampled blocks"))?;
            }
            "miss" if spec.transform != TransformKind::Raw && spec.auto_link_mbit.is_none() => {
                spec.miss = Some(parse_miss(value)?);
            }
            "mbit" if spec.auto_link_mbit.is_some() => {
                spec.auto_link_mbit = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|mbit| *mbit > 0)
                        .ok_or_else(|| bad(key, value, "a link speed in Mbit/s, e.g. 1000"))?,
                );
            }
            _ => return Err(unknown(name, key)),
        }
    }
    Ok(spec)
}

impl FromStr for CodecSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        match text.split_once('+') {
            None => parse_stage(text),
            Some((stage, compressor)) => {
                let mut spec = parse_stage(stage)?;
                let composable =
                    spec.compressor == CompressorSpec::None && spec.auto_link_mbit.is_none();
                let compressor = parse_compressor(compressor)?
                    .filter(|_| composable)
                    .ok_or_else(|| SpecError::BadComposition(text.to_owned()))?;
                spec.compressor = compressor;
                Ok(spec)
            }
        }
    }
}

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(mbit) = self.auto_link_mbit {
            return write!(
                f,
                "auto:cache={},mbit={mbit}",
                format_size(self.cache_bytes)
            );
        }
        match self.transform {
            TransformKind::Raw if self.compressor != CompressorSpec::None => {
                return write!(f, "{}", self.compressor);
            }
            TransformKind::Raw => write!(f, "raw")?,
            TransformKind::Delta => write!(f, "delta:cache={}", format_size(self.cache_bytes))?,
            TransformKind::Similarity => write!(
                f,
                "similarity:cache={},samples={}",
                format_size(self.cache_bytes),
                self.samples
            )?,
        }
        if let Some(miss) = self.miss {
            write!(f, ",miss={}", format_miss(miss))?;
        }
        if self.compressor != CompressorSpec::None {
            write!(f, "+{}", self.compressor)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> CodecSpec {
        text.parse().expect("valid spec")
    }

    #[test]
    fn gzip_defaults_to_level_six() {
        assert_eq!(parse("gzip").compressor, CompressorSpec::Gzip { level: 6 });
    }

    #[test]
    fn zstd_with_dictionary() {
        assert_eq!(
            parse("zstd:level=5,dict=64K").compressor,
            CompressorSpec::Zstd {
                level: 5,
                dictionary_bytes: 65536
            }
        );
    }

    #[test]
    fn composition_sets_the_compressor() {
        let spec = parse("delta:cache=64M+zstd:level=1");
        assert_eq!(spec.transform, TransformKind::Delta);
        assert_eq!(spec.cache_bytes, 64 << 20);
        assert_eq!(
            spec.compressor,
            CompressorSpec::Zstd {
                level: 1,
                dictionary_bytes: 0
            }
        );
    }

    #[test]
    fn miss_compressor_applies_to_whole_pages_only() {
        let spec = parse("delta:miss=zstd-1");
        assert_eq!(spec.compressor, CompressorSpec::None);
        assert_eq!(
            spec.literal_compressor(),
            CompressorSpec::Zstd {
                level: 1,
                dictionary_bytes: 0
            }
        );
    }

    #[test]
    fn display_round_trips() {
        let texts = [
            "raw",
            "gzip:level=6",
            "zstd:level=-3,dict=112K",
            "delta:cache=128M",
            "delta:cache=1G,miss=zstd-1",
            "similarity:cache=64M,samples=2+zstd:level=1",
            "auto:cache=256M,mbit=100",
        ];
        let round_tripped: Vec<String> = texts.iter().map(|t| parse(t).to_string()).collect();
        assert_eq!(round_tripped, texts);
    }

    #[test]
    fn compressor_then_compressor_is_refused() {
        assert_eq!(
            "zstd+gzip".parse::<CodecSpec>(),
            Err(SpecError::BadComposition("zstd+gzip".to_owned()))
        );
    }

    #[test]
    fn unknown_parameter_is_refused() {
        assert!(matches!(
            "gzip:dict=4K".parse::<CodecSpec>(),
            Err(SpecError::UnknownParameter { .. })
        ));
    }

    #[test]
    fn out_of_range_level_is_refused() {
        assert!(matches!(
            "gzip:level=10".parse::<CodecSpec>(),
            Err(SpecError::BadValue { .. })
        ));
    }

    #[test]
    fn unknown_name_is_refused() {
        assert_eq!(
            "lz4".parse::<CodecSpec>(),
            Err(SpecError::UnknownName("lz4".to_owned()))
        );
    }
}
