//! The witness: an etcd key per protected VM that says who may run it, and
//! the atomic test-and-set that decides, whenever one side wants to run the
//! guest alone, which side that is (VMware FT's rule).
//!
//! The record, JSON under `/understudy/vm/<vm id>`:
//! `{"vm_id": 7, "owner": 42, "state": "in_sync" | "solo", "generation": 3}`.
//! `owner` is the instance id of the process that runs the guest;
//! `generation` grows with every change of owner or state and travels in
//! `Hello` (the fencing token); the key's `mod_revision` is what each
//! test-and-set compares.
//!
//! ```text
//!  primary starts            create {owner: P, solo, 1}          (absent only)
//!  pair in sync (epoch 0)    {P, solo, g} -> {P, in_sync, g+1}   Hello carried g+1
//!  primary loses secondary   {P, in_sync, g} -> {P, solo, g+1}   then releases output
//!  secondary loses primary   {P, in_sync, g} -> {S, solo, g+1}   then resumes
//! ```
//!
//! Why one copy: both losers' transactions compare the same revision (the
//! one `in_sync` was written at), so at most one of them succeeds. The
//! secondary resumes only if it won; the primary releases held output (and
//! goes on) only if it won. Output commit already keeps every output of the
//! pair behind the secondary's acknowledgement, so whichever side lost never
//! let anything out that the winner does not have. A side that cannot reach
//! the witness does not guess: it waits (the primary keeps its output held,
//! the secondary keeps the guest paused) and says so.
//!
//! The cases:
//! - *Primary crashes*: the secondary wins (the record is `in_sync`) and
//!   resumes.
//! - *Secondary crashes*: the primary wins and releases its held output.
//! - *Partition of the replication link*: both try from the same revision;
//!   one wins. If the secondary wins, the primary (which can still reach
//!   the witness) stops, fenced; if the primary wins, the secondary finds
//!   `solo` and does not resume.
//! - *Primary stalls* (SIGSTOP, a long pause) past the heartbeat timeout:
//!   the secondary wins and resumes; the primary wakes, loses its
//!   secondary, finds the record taken and stops without releasing output.
//! - *Secondary stalls*: the primary wins and runs on alone; the secondary
//!   wakes, finds `solo`, and does not resume.
//! - *Witness down*: nothing changes while the pair is healthy; a side
//!   that needs it waits (reporting) until it answers again.
//! - *A zombie primary reconnects*: the secondary refuses its `Hello` (the
//!   witness names another owner or generation); and a takeover could only
//!   resume state in sync with the record's owner and generation.
//!
//! The client speaks etcd v3's JSON gateway (`POST /v3/kv/range`,
//! `/v3/kv/txn`, keys and values in base64) over plain HTTP/1.1 on each of
//! the given endpoints in turn, so no code generation or protoc is needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

/// How long one request to one endpoint may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A witness that could not answer, or answered nonsense.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// No endpoint answered.
    #[error("no witness endpoint answered ({endpoints}): {last}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        last: String,
    },
    /// An endpoint answered, but not as etcd does.
    #[error("the witness answered {status} to {path}: {body}")]
    BadAnswer {
        /// The request path.
        path: &'static str,
        /// HTTP status.
        status: u16,
        /// The body (truncated).
        body: String,
    },
    /// The record is not one of ours, or not for this VM.
    #[error("the witness record for VM {vm_id} is invalid: {why}")]
    BadRecord {
        /// The VM.
        vm_id: u64,
        /// What is wrong.
        why: String,
    },
}

/// Who may run the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerState {
    /// The owner runs it with a secondary in sync: either may take over.
    InSync,
    /// The owner runs it alone: any backup is stale.
    Solo,
}

/// The witness record of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The VM.
    pub vm_id: u64,
    /// The instance that runs it.
    pub owner: u64,
    /// In sync or alone.
    pub state: OwnerState,
    /// Grows with every change.
    pub generation: u64,
}

impl Record {
    fn to_json(self) -> String {
        json!({
            "vm_id": self.vm_id,
            "owner": self.owner,
            "state": match self.state {
                OwnerState::InSync => "in_sync",
                OwnerState::Solo => "solo",
            },
            "generation": self.generation,
        })
        .to_string()
    }

    fn parse(vm_id: u64, bytes: &[u8]) -> Result<Self, WitnessError> {
        let bad = |why: &str| WitnessError::BadRecord {
            vm_id,
            why: why.to_owned(),
        };
        let value: Value = serde_json::from_slice(bytes).map_err(|_| bad("not JSON"))?;
        let number = |field: &str| {
            value[field]
                .as_u64()
                .ok_or_else(|| bad(&format!("no number `{field}`")))
        };
        let record = Self {
            vm_id: number("vm_id")?,
            owner: number("owner")?,
            state: match value["state"].as_str() {
                Some("in_sync") => OwnerState::InSync,
                Some("solo") => OwnerState::Solo,
                _ => return Err(bad("`state` is neither in_sync nor solo")),
            },
            generation: number("generation")?,
        };
        if record.vm_id != vm_id {
            return Err(bad(&format!("it names VM {}", record.vm_id)));
        }
        Ok(record)
    }
}

/// A record as read, with the revision a test-and-set compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The record.
    pub record: Record,
    /// The key's `mod_revision`.
    pub revision: i64,
}

/// An etcd cluster (one or more endpoints such as `http://127.0.0.1:2379`).
#[derive(Clone, Debug)]
pub struct Witness {
    endpoints: Vec<String>,
}

fn key(vm_id: u64) -> String {
    BASE64.encode(format!("/understudy/vm/{vm_id}"))
}

impl Witness {
    /// A witness at `endpoints` (`http://HOST:PORT`).
    pub fn new(endpoints: Vec<String>) -> Self {
        Self { endpoints }
    }

    /// The record of `vm_id`, if there is one.
    pub fn read(&self, vm_id: u64) -> Result<Option<Versioned>, WitnessError> {
        let answer = self.post("/v3/kv/range", &json!({"key": key(vm_id)}))?;
        let Some(kv) = answer["kvs"].as_array().and_then(|kvs| kvs.first()) else {
            return Ok(None);
        };
        versioned(vm_id, kv).map(Some)
    }

    /// Writes `record` if the VM has no record yet; returns whether it did.
    pub fn create(&self, record: Record) -> Result<bool, WitnessError> {
        self.transact(
            record,
            json!({"key": key(record.vm_id), "target": "CREATE",
                                     "result": "EQUAL", "create_revision": "0"}),
        )
    }

    /// Writes `record` if the VM's record is still at `revision` (the
    /// test-and-set); returns whether it did.
    pub fn replace(&self, revision: i64, record: Record) -> Result<bool, WitnessError> {
        self.transact(
            record,
            json!({"key": key(record.vm_id), "target": "MOD",
                                     "result": "EQUAL", "mod_revision": revision.to_string()}),
        )
    }

    fn transact(&self, record: Record, compare: Value) -> Result<bool, WitnessError> {
        let put = json!({"request_put": {"key": key(record.vm_id),
                                          "value": BASE64.encode(record.to_json())}});
        let answer = self.post(
            "/v3/kv/txn",
            &json!({"compare": [compare], "success": [put]}),
        )?;
        Ok(answer["succeeded"].as_bool().unwrap_or(false))
    }

    /// POSTs `body` to `path` on each endpoint in turn until one answers.
    fn post(&self, path: &'static str, body: &Value) -> Result<Value, WitnessError> {
        let body = body.to_string();
        let mut last = "no endpoint given".to_owned();
        for endpoint in &self.endpoints {
            match post_once(endpoint, path, &body) {
                Ok((200, text)) => {
                    return serde_json::from_str(&text).map_err(|_| WitnessError::BadAnswer {
                        path,
                        status: 200,
                        body: text.chars().take(200).collect(),
                    });
                }
                Ok((status, text)) => {
                    return Err(WitnessError::BadAnswer {
                        path,
                        status,
                        body: text.chars().take(200).collect(),
                    });
                }
                Err(error) => last = format!("{endpoint}: {error}"),
            }
        }
        Err(WitnessError::Unreachable {
            endpoints: self.endpoints.join(", "),
            last,
        })
    }
}

fn versioned(vm_id: u64, kv: &Value) -> Result<Versioned, WitnessError> {
    let bad = |why: &str| WitnessError::BadRecord {
        vm_id,
        why: why.to_owned(),
    };
    let value = kv["value"]
        .as_str()
        .and_then(|value| BASE64.decode(value).ok())
        .ok_or_else(|| bad("the value is not base64"))?;
    let revision = kv["mod_revision"]
        .as_str()
        .and_then(|revision| revision.parse::<i64>().ok())
        .ok_or_else(|| bad("no mod_revision"))?;
    Ok(Versioned {
        record: Record::parse(vm_id, &value)?,
        revision,
    })
}

/// One HTTP/1.1 POST; returns the status and the body.
fn post_once(endpoint: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let host = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("only http:// endpoints are supported"))?
        .trim_end_matches('/');
    let address = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("the endpoint has no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {status_line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse::<usize>().ok();
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| std::io::Error::other("a bad chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut end = [0u8; 2];
            reader.read_exact(&mut end)?;
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            vm_id: 7,
            owner: 42,
            state: OwnerState::InSync,
            generation: 3,
        }
    }

    #[test]
    fn a_record_round_trips() {
        let parsed = Record::parse(7, record().to_json().as_bytes());

        assert_eq!(parsed.expect("a valid record"), record());
    }

    #[test]
    fn a_record_of_another_vm_is_refused() {
        let parsed = Record::parse(8, record().to_json().as_bytes());

        assert!(matches!(
            parsed,
            Err(WitnessError::BadRecord { vm_id: 8, .. })
        ));
    }

    #[test]
    fn a_malformed_record_is_refused() {
        let parsed = Record::parse(
            7,
            br#"{"vm_id": 7, "owner": 1, "state": "maybe", "generation": 1}"#,
        );

        assert!(parsed.is_err_and(|error| error.to_string().contains("neither in_sync nor solo")));
    }

    #[test]
    fn an_unreachable_witness_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let witness = Witness::new(vec![format!("http://127.0.0.1:{port}")]);

        let read = witness.read(7);

        assert!(matches!(read, Err(WitnessError::Unreachable { .. })));
    }
}
