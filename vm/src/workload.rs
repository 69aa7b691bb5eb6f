//! The workload the built-in guest runs, as the user writes it on the command
//! line: `idle`, `counter[:spin=N]`,
//! `memtouch:rate=200MB/s,wss=128M,pattern=random[,seed=N][,log]`, or
//! `kv[:ip=10.0.0.10/24][,port=6379][,heap=16M]` (a Redis-protocol
//! key-value store on the guest's network interface).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use understudy_guest_abi::{
    FLAG_FREE_CHURN, FLAG_FREE_REPORT, FLAG_WRITE_LOG, PAGE_SIZE, Pattern, Workload,
};

/// Default busy-loop iterations between two counter steps (a few million steps/s).
pub const DEFAULT_COUNTER_SPIN: u32 = 200;

/// Errors of parsing a workload or a size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    /// The workload name is unknown.
    #[error("unknown workload '{0}': expected idle, counter, memtouch or kv")]
    UnknownWorkload(String),
    /// An option is unknown for this workload.
    #[error("unknown option '{option}' for workload {workload}")]
    UnknownOption {
        /// The workload.
        workload: &'static str,
        /// The option.
        option: String,
    },
    /// A value could not be parsed.
    #[error("bad value '{value}' for {option}: {reason}")]
    BadValue {
        /// The option.
        option: &'static str,
        /// The value given.
        value: String,
        /// What was expected.
        reason: &'static str,
    },
}

/// A parsed workload choice, ready to go into the guest's boot page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Which workload.
    pub workload: Workload,
    /// memtouch: page choice and contents.
    pub pattern: Pattern,
    /// memtouch: bytes per second over all vCPUs, 0 for unthrottled.
    pub rate_bytes_per_sec: u64,
    /// memtouch: working-set size; `None` for the whole work area.
    pub wss: Option<u64>,
    /// Seed of the guest's pseudo-random generators.
    pub seed: u64,
    /// `FLAG_*` bits for the boot page.
    pub flags: u32,
    /// counter: busy-loop iterations between two steps.
    pub counter_spin: u32,
    /// kv: the guest's address and prefix length.
    pub ipv4: Ipv4Addr,
    /// kv: the prefix length of `ipv4`.
    pub prefix_len: u8,
    /// kv: the TCP port.
    pub port: u16,
    /// memtouch: the share of the working set (percent) freed every other
    /// second and reported free (`free=75%`).
    pub free_percent: u32,
}

/// The guest's address when `kv` is given none.
pub const DEFAULT_GUEST_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The port `kv` listens on unless told otherwise (Redis's).
pub const DEFAULT_KV_PORT: u16 = 6379;
/// The heap of `kv` (its keys, values and socket buffers) unless told otherwise.
pub const DEFAULT_KV_HEAP: u64 = 16 << 20;

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            workload: Workload::Idle,
            pattern: Pattern::Random,
            rate_bytes_per_sec: 0,
            wss: None,
            seed: 0x5eed,
            flags: 0,
            counter_spin: DEFAULT_COUNTER_SPIN,
            ipv4: DEFAULT_GUEST_IPV4,
            prefix_len: 24,
            port: DEFAULT_KV_PORT,
            free_percent: 0,
        }
    }
}

impl WorkloadSpec {
    /// The working-set size given `available` bytes of work area, page-aligned.
    pub fn wss_bytes(&self, available: u64) -> u64 {
        let default = match self.workload {
            Workload::Kv => DEFAULT_KV_HEAP.min(available),
            _ => available,
        };
        self.wss.unwrap_or(default) / PAGE_SIZE * PAGE_SIZE
    }

    /// Whether the workload uses the network interface.
    pub fn uses_network(&self) -> bool {
        self.workload == Workload::Kv
    }
}

impl FromStr for WorkloadSpec {
    type Err = WorkloadError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, options) = text.split_once(':').unwrap_or((text, ""));
        let mut spec = Self::default();
        let workload_name: &'static str = match name {
            "idle" => "idle",
            "counter" => "counter",
            "memtouch" => "memtouch",
            "kv" => "kv",
            other => return Err(WorkloadError::UnknownWorkload(other.to_string())),
        };
        spec.workload = match workload_name {
            "idle" => Workload::Idle,
            "counter" => Workload::Counter,
            "kv" => Workload::Kv,
            _ => Workload::MemTouch,
        };
        if spec.workload == Workload::Kv {
            // Its heap reports the large values it frees.
            spec.flags |= FLAG_FREE_REPORT;
        }
        for option in options.split(',').filter(|option| !option.is_empty()) {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            match (spec.workload, key) {
                (_, "seed") => spec.seed = parse_u64("seed", value)?,
                (Workload::MemTouch, "rate") => spec.rate_bytes_per_sec = parse_rate(value)?,
                (Workload::MemTouch, "wss") => spec.wss = Some(parse_size("wss", value)?),
                (Workload::MemTouch, "pattern") => spec.pattern = parse_pattern(value)?,
                (Workload::MemTouch, "log") => spec.flags |= FLAG_WRITE_LOG,
                (Workload::MemTouch, "free") => {
                    let percent = value.trim_end_matches('%').parse::<u32>().ok();
                    spec.free_percent = percent
                        .filter(|percent| (1..=99).contains(percent))
                        .ok_or_else(|| WorkloadError::BadValue {
                            option: "free",
                            value: value.to_string(),
                            reason: "a share of the working set from 1% to 99%",
                        })?;
                    spec.flags |= FLAG_FREE_REPORT;
                }
                (Workload::MemTouch, "churn") => spec.flags |= FLAG_FREE_CHURN,
                (Workload::Kv, "ip") => (spec.ipv4, spec.prefix_len) = parse_cidr(value)?,
                (Workload::Kv, "port") => {
                    spec.port = value.parse().map_err(|_| WorkloadError::BadValue {
                        option: "port",
                        value: value.to_string(),
                        reason: "expected a TCP port (0 to 65535)",
                    })?
                }
                (Workload::Kv, "heap") => spec.wss = Some(parse_size("heap", value)?),
                (Workload::Counter, "spin") => {
                    spec.counter_spin = u32::try_from(parse_u64("spin", value)?).map_err(|_| {
                        WorkloadError::BadValue {
                            option: "spin",
                            value: value.to_string(),
                            reason: "at most 4294967295",
                        }
                    })?
                }
                _ => {
                    return Err(WorkloadError::UnknownOption {
                        workload: workload_name,
                        option: key.to_string(),
                    });
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.workload {
            Workload::Idle => write!(f, "idle"),
            Workload::Counter => write!(f, "counter:spin={}", self.counter_spin),
            Workload::Kv => {
                write!(
                    f,
                    "kv:ip={}/{},port={}",
                    self.ipv4, self.prefix_len, self.port
                )?;
                match self.wss {
                    Some(heap) => write!(f, ",heap={}K", heap >> 10),
                    None => Ok(()),
                }
            }
            Workload::MemTouch => {
                let pattern = match self.pattern {
                    Pattern::Seq => "seq",
                    Pattern::Random => "random",
                    Pattern::Hotspot => "hotspot",
                    Pattern::Sparse => "sparse",
                    Pattern::Zero => "zero",
                };
                write!(f, "memtouch:pattern={pattern}")?;
                match self.rate_bytes_per_sec {
                    0 => write!(f, ",rate=max")?,
                    rate if rate.is_multiple_of(1_000_000) => {
                        write!(f, ",rate={}MB/s", rate / 1_000_000)?
                    }
                    rate => write!(f, ",rate={rate}/s")?,
                }
                match self.wss {
                    Some(wss) if wss.is_multiple_of(1 << 20) => write!(f, ",wss={}M", wss >> 20)?,
                    Some(wss) => write!(f, ",wss={}K", wss >> 10)?,
                    None => {}
                }
                if self.free_percent > 0 {
                    write!(f, ",free={}%", self.free_percent)?;
                }
                if self.flags & FLAG_FREE_CHURN != 0 {
                    write!(f, ",churn")?;
                }
                Ok(())
            }
        }
    }
}

fn parse_u64(option: &'static str, value: &str) -> Result<u64, WorkloadError> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| WorkloadError::BadValue {
        option,
        value: value.to_string(),
        reason: "expected an unsigned integer",
    })
}

fn parse_pattern(value: &str) -> Result<Pattern, WorkloadError> {
    match value {
        "seq" => Ok(Pattern::Seq),
        "random" => Ok(Pattern::Random),
        "hotspot" => Ok(Pattern::Hotspot),
        "sparse" => Ok(Pattern::Sparse),
        "zero" => Ok(Pattern::Zero),
        _ => Err(WorkloadError::BadValue {
            option: "pattern",
            value: value.to_string(),
            reason: "expected seq, random, hotspot, sparse or zero",
        }),
    }
}

/// Parses `10.0.0.10/24` (the prefix length defaults to 24).
fn parse_cidr(value: &str) -> Result<(Ipv4Addr, u8), WorkloadError> {
    let bad = || WorkloadError::BadValue {
        option: "ip",
        value: value.to_string(),
        reason: "expected an IPv4 address with an optional prefix length, e.g. 10.0.0.10/24",
    };
    let (address, prefix) = value.split_once('/').unwrap_or((value, "24"));
    let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(1..=30).contains(&prefix) {
        return Err(bad());
    }
    Ok((address, prefix))
}

/// Parses a byte size: `4096`, `64K`, `128M`, `1G` (binary), `128MiB`, or
/// `100MB` / `1GB` (decimal).
pub fn parse_size(option: &'static str, value: &str) -> Result<u64, WorkloadError> {
    let bad = || WorkloadError::BadValue {
        option,
        value: value.to_string(),
        reason: "expected a size such as 4096, 64K, 128M, 1G, 128MiB or 100MB",
    };
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    number.checked_mul(multiplier).ok_or_else(bad)
}

/// Parses a rate: a size per second (`200MB/s`, `1G/s`, `500M`), or `max` / `0`.
pub fn parse_rate(value: &str) -> Result<u64, WorkloadError> {
    if value == "max" {
        return Ok(0);
    }
    parse_size("rate", value.strip_suffix("/s").unwrap_or(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memtouch_can_free_a_share_of_its_working_set() {
        let spec: WorkloadSpec = "memtouch:wss=64M,free=75%,churn".parse().expect("valid");

        assert_eq!(spec.free_percent, 75);
        assert_eq!(spec.flags, FLAG_FREE_REPORT | FLAG_FREE_CHURN);
        assert_eq!(
            spec.to_string(),
            "memtouch:pattern=random,rate=max,wss=64M,free=75%,churn"
        );
    }

    #[test]
    fn freeing_all_or_nothing_is_refused() {
        assert!("memtouch:free=0%".parse::<WorkloadSpec>().is_err());
        assert!("memtouch:free=100%".parse::<WorkloadSpec>().is_err());
    }

    #[test]
    fn the_issue_example_parses() {
        let spec: WorkloadSpec = "memtouch:rate=200MB/s,wss=128M,pattern=random"
            .parse()
            .expect("valid");
        assert_eq!(spec.workload, Workload::MemTouch);
        assert_eq!(spec.rate_bytes_per_sec, 200_000_000);
        assert_eq!(spec.wss, Some(128 << 20));
        assert_eq!(spec.pattern, Pattern::Random);
    }

    #[test]
    fn bare_names_parse() {
        let spec: WorkloadSpec = "counter".parse().expect("valid");
        assert_eq!(spec.workload, Workload::Counter);
        assert_eq!(spec.counter_spin, DEFAULT_COUNTER_SPIN);
    }

    #[test]
    fn write_log_flag_parses() {
        let spec: WorkloadSpec = "memtouch:log,pattern=sparse".parse().expect("valid");
        assert_eq!(spec.flags, FLAG_WRITE_LOG);
        assert_eq!(spec.pattern, Pattern::Sparse);
    }

    #[test]
    fn unknown_workloads_are_refused() {
        assert_eq!(
            "spin".parse::<WorkloadSpec>(),
            Err(WorkloadError::UnknownWorkload("spin".to_string()))
        );
    }

    #[test]
    fn options_of_another_workload_are_refused() {
        let result = "counter:pattern=seq".parse::<WorkloadSpec>();
        assert!(matches!(
            result,
            Err(WorkloadError::UnknownOption {
                workload: "counter",
                ..
            })
        ));
    }

    #[test]
    fn sizes_use_binary_and_decimal_units() {
        assert_eq!(parse_size("wss", "64K"), Ok(64 << 10));
        assert_eq!(parse_size("wss", "2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("wss", "100MB"), Ok(100_000_000));
    }

    #[test]
    fn malformed_sizes_are_refused() {
        assert!(parse_size("wss", "12X").is_err());
        assert!(parse_size("wss", "M").is_err());
        assert!(parse_size("wss", "99999999999G").is_err());
    }

    #[test]
    fn max_rate_means_unthrottled() {
        assert_eq!(parse_rate("max"), Ok(0));
        assert_eq!(parse_rate("1G/s"), Ok(1 << 30));
    }

    #[test]
    fn display_gives_a_spec_that_parses_back() {
        let spec: WorkloadSpec = "memtouch:rate=max,wss=128M,pattern=hotspot"
            .parse()
            .expect("valid");
        let again: WorkloadSpec = spec.to_string().parse().expect("display output parses");
        assert_eq!(again, spec);
    }

    #[test]
    fn kv_parses_its_address_and_port() {
        let spec: WorkloadSpec = "kv:ip=192.168.7.2/16,port=7000".parse().expect("valid");
        assert_eq!(spec.workload, Workload::Kv);
        assert_eq!(spec.ipv4, Ipv4Addr::new(192, 168, 7, 2));
        assert_eq!(spec.prefix_len, 16);
        assert_eq!(spec.port, 7000);
    }

    #[test]
    fn kv_refuses_a_bad_address() {
        let result = "kv:ip=10.0.0.300".parse::<WorkloadSpec>();
        assert!(matches!(
            result,
            Err(WorkloadError::BadValue { option: "ip", .. })
        ));
    }

    #[test]
    fn kv_display_parses_back() {
        let spec: WorkloadSpec = "kv:ip=10.1.2.3/8,heap=32M".parse().expect("valid");
        let again: WorkloadSpec = spec.to_string().parse().expect("display output parses");
        assert_eq!(again, spec);
    }

    #[test]
    fn wss_defaults_to_the_available_area_page_aligned() {
        let spec = WorkloadSpec::default();
        assert_eq!(spec.wss_bytes(10_000), 8192);
    }
}
