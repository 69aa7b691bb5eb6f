//! The replication channel: a TCP connection, mutually authenticated and
//! encrypted with the Noise protocol (`Noise_XX_25519_AESGCM_SHA256`), or
//! plain text for local experiments.
//!
//! # Why Noise, not TLS
//!
//! Both ends are our own processes, configured by one operator: there is
//! no browser, no public PKI, no name to verify. Noise with static keys
//! gives mutual authentication with a 32-byte key file per host and a list
//! of the peers' public keys (as WireGuard and SSH's `authorized_keys`),
//! without certificates, a CA, expiry or parsing ASN.1 from strangers.
//! And after the handshake its transport is *stateless* (the nonce is
//! explicit), so our two threads per connection (a reader and a writer on
//! clones of one socket) each keep their own direction's counter and never
//! contend: a TLS session holds both directions in one object and would
//! need one lock or one I/O thread for both.
//!
//! # Handshake (XX: both sides prove their static key)
//!
//! ```text
//! initiator (primary)                        responder (secondary)
//!   "URN1"                                 ->   (plain text peers send "URPL")
//!   len u16 | e                            ->
//!                                          <-   len u16 | e, ee, s, es, {heartbeat key}
//!   (the responder's s must be authorised)
//!   len u16 | s, se, {heartbeat key}       ->
//!                                               (the initiator's s must be
//!                                                authorised, else close)
//!   records, both ways:  len u16 | AES-256-GCM(plaintext ≤ 65519 bytes)
//! ```
//!
//! Nothing but these three handshake messages (each at most 65535 bytes) is
//! read from a peer before it proved a key the local keyring authorises, and
//! the responder gives the whole handshake a deadline. The heartbeat keys
//! (32 random bytes each way, inside the encrypted handshake payloads) key
//! the UDP heartbeats' MACs ([`crate::heartbeat`]): a datagram sniffed on
//! one session means nothing on another, and within a session a counter
//! makes replays stale.
//!
//! Records are numbered implicitly (the AEAD nonce): a dropped, replayed,
//! reordered or altered record fails authentication, which ends the
//! connection like a broken one. Each direction re-keys itself every
//! [`REKEY_RECORDS`] records (Noise's `REKEY`); the writer decides, the
//! reader follows at the same count.
//!
//! # Failure model
//!
//! - A peer without an authorised key: the handshake fails, the connection
//!   is closed, nothing else is read. A peer that stalls the handshake is
//!   dropped at the deadline.
//! - A tampered or truncated record: an I/O error of kind `InvalidData`;
//!   the connection is over (an attacker on the path can cut it anyway).
//! - Plain text against Noise: the responder sees the wrong preamble and
//!   closes; the initiator reports a handshake that the peer ended.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use snow::StatelessTransportState;

/// The Noise protocol name.
pub const NOISE_PATTERN: &str = "Noise_XX_25519_AESGCM_SHA256";
/// Bound into the handshake: a peer of another protocol or version fails it.
const PROLOGUE: &[u8] = b"understudy replication channel 1";
/// What a Noise initiator sends first.
pub const NOISE_PREAMBLE: [u8; 4] = *b"URN1";
/// Largest Noise message.
const MAX_RECORD: usize = 65535;
/// AEAD tag length.
const TAG_LEN: usize = 16;
/// Largest plaintext per record.
pub const MAX_PLAINTEXT: usize = MAX_RECORD - TAG_LEN;
/// Records after which a direction re-keys (about 64 GiB of full records).
pub const REKEY_RECORDS: u64 = 1 << 20;
/// How long a peer has to complete the handshake (and, on the secondary,
/// to send its `Hello`).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Key length (X25519 and the heartbeat MAC keys).
pub const KEY_LEN: usize = 32;

/// A channel that cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed during the handshake.
    #[error("the handshake failed on the socket")]
    Io(#[from] std::io::Error),
    /// Noise refused a handshake message.
    #[error("the handshake failed: {0}")]
    Noise(#[from] snow::Error),
    /// The peer proved a key this side does not know.
    #[error("the peer's key {0} is not authorised here (not among the --peer-key files)")]
    Unauthorised(PublicKey),
    /// The peer did not finish the handshake in time.
    #[error("the peer did not complete the handshake within {0:?}")]
    Deadline(Duration),
    /// The peer closed during the handshake.
    #[error(
        "the peer closed the connection during the handshake (it does not accept this key, or runs in plain text)"
    )]
    ClosedDuringHandshake,
    /// The peer speaks plain text where Noise was required, or the reverse.
    #[error("the peer {0}")]
    WrongMode(&'static str),
    /// A handshake payload of the wrong shape.
    #[error("a handshake message is malformed: {0}")]
    Malformed(&'static str),
    /// A key file that cannot be used.
    #[error("cannot use the key file {path}: {why}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// A Curve25519 public key, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_key(text).map(Self)
    }
}

/// This host's static key pair.
#[derive(Clone)]
pub struct KeyPair {
    private: [u8; KEY_LEN],
    /// The public half, which peers list.
    pub public: PublicKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair {{ public: {} }}", self.public)
    }
}

impl KeyPair {
    /// A new random key pair.
    pub fn generate() -> Result<Self, ChannelError> {
        let keypair = snow::Builder::new(noise_params()).generate_keypair()?;
        let private =
            keypair.private.as_slice().try_into().map_err(|_| {
                ChannelError::Malformed("a generated private key of the wrong length")
            })?;
        let public =
            keypair.public.as_slice().try_into().map_err(|_| {
                ChannelError::Malformed("a generated public key of the wrong length")
            })?;
        Ok(Self {
            private,
            public: PublicKey(public),
        })
    }

    /// The key file's text (private and public half, hex).
    pub fn to_file_text(&self) -> String {
        format!(
            "# understudy Noise static key: keep private\nprivate {}\npublic {}\n",
            hex(&self.private),
            self.public
        )
    }

    /// Reads a key file written by `understudy keygen`. The file must not
    /// be readable by others.
    pub fn load(path: &Path) -> Result<Self, ChannelError> {
        let fail = |why: String| ChannelError::KeyFile {
            path: path.to_owned(),
            why,
        };
        let text = read_key_file(path, true).map_err(fail)?;
        let mut private = None;
        let mut public = None;
        for line in text.lines().map(str::trim) {
            if let Some(value) = line.strip_prefix("private ") {
                private = Some(parse_key(value).map_err(|why| fail(why.to_owned()))?);
            } else if let Some(value) = line.strip_prefix("public ") {
                public = Some(parse_key(value).map_err(|why| fail(why.to_owned()))?);
            }
        }
        match (private, public) {
            (Some(private), Some(public)) => Ok(Self {
                private,
                public: PublicKey(public),
            }),
            _ => Err(fail(
                "it lacks a `private` or `public` line (make one with `understudy keygen`)"
                    .to_owned(),
            )),
        }
    }
}

/// Reads the public keys listed in `path`: one hex key per line, `#`
/// comments, blank lines ignored (a `.pub` file from `understudy keygen`, or
/// several joined).
pub fn load_public_keys(path: &Path) -> Result<Vec<PublicKey>, ChannelError> {
    let fail = |why: String| ChannelError::KeyFile {
        path: path.to_owned(),
        why,
    };
    let text = read_key_file(path, false).map_err(fail)?;
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            line.parse::<PublicKey>()
                .map_err(|why| fail(why.to_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(fail("it lists no public key".to_owned()));
    }
    Ok(keys)
}

fn read_key_file(path: &Path, private: bool) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|error| error.to_string())?;
    if private && metadata.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "it is readable by others (mode {:o}); run `chmod 600` on it",
            metadata.permissions().mode() & 0o777
        ));
    }
    if metadata.len() > 64 << 10 {
        return Err("it is larger than any key file".to_owned());
    }
    std::fs::read_to_string(path).map_err(|error| error.to_string())
}

/// This host's key and the peers it accepts.
#[derive(Clone, Debug)]
pub struct Keyring {
    /// This host's key pair.
    pub local: KeyPair,
    /// Public keys of the peers allowed to connect (or to be connected to).
    pub peers: Vec<PublicKey>,
}

impl Keyring {
    /// Loads `key` and every file in `peers`.
    pub fn load(key: &Path, peers: &[PathBuf]) -> Result<Self, ChannelError> {
        let local = KeyPair::load(key)?;
        let mut authorised = Vec::new();
        for path in peers {
            authorised.extend(load_public_keys(path)?);
        }
        if authorised.is_empty() {
            return Err(ChannelError::KeyFile {
                path: key.to_owned(),
                why: "no --peer-key was given: nobody could connect".to_owned(),
            });
        }
        Ok(Self {
            local,
            peers: authorised,
        })
    }
}

/// How connections are secured.
#[derive(Clone, Debug)]
pub enum Security {
    /// No authentication, no encryption: anyone who reaches the port can
    /// drive the secondary and read guest memory. Local experiments only.
    Plaintext,
    /// Noise with static keys.
    Noise(Arc<Keyring>),
}

impl Security {
    /// One line for logs and start-up messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Plaintext => {
                "PLAIN TEXT: unauthenticated and unencrypted, for local experiments only".to_owned()
            }
            Self::Noise(keyring) => format!(
                "{NOISE_PATTERN}, this host's key {}, {} authorised peer key(s)",
                keyring.local.public,
                keyring.peers.len()
            ),
        }
    }
}

/// The keys of one session's UDP heartbeats: each side's own, sent to the
/// other inside the handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatKeys {
    /// Keys the datagrams this side sends.
    pub send: [u8; KEY_LEN],
    /// Keys the datagrams the peer sends.
    pub receive: [u8; KEY_LEN],
}

impl fmt::Debug for HeartbeatKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeartbeatKeys { .. }")
    }
}

/// One established connection: its reading and writing halves.
pub struct Channel {
    /// Reads the peer's bytes (decrypted).
    pub reader: ChannelReader,
    /// Writes bytes to the peer (encrypted on flush or when a record fills).
    pub writer: ChannelWriter,
    /// The heartbeat keys, with Noise.
    pub heartbeat_keys: Option<HeartbeatKeys>,
    /// The peer's proven key, with Noise.
    pub peer_key: Option<PublicKey>,
}

impl Channel {
    /// Opens the channel as the initiator (primary, migration source).
    pub fn connect(
        stream: TcpStream,
        security: &Security,
        deadline: Duration,
    ) -> Result<Self, ChannelError> {
        match security {
            Security::Plaintext => Self::plain(stream),
            Security::Noise(keyring) => handshake(stream, keyring, deadline, true, REKEY_RECORDS),
        }
    }

    /// Accepts the channel as the responder (secondary, migration target).
    pub fn accept(
        stream: TcpStream,
        security: &Security,
        deadline: Duration,
    ) -> Result<Self, ChannelError> {
        match security {
            Security::Plaintext => Self::plain(stream),
            Security::Noise(keyring) => handshake(stream, keyring, deadline, false, REKEY_RECORDS),
        }
    }

    fn plain(stream: TcpStream) -> Result<Self, ChannelError> {
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: ChannelReader {
                stream,
                secure: None,
                received: 0,
            },
            writer: ChannelWriter {
                stream: writer,
                secure: None,
            },
            heartbeat_keys: None,
            peer_key: None,
        })
    }
}

fn noise_params() -> snow::params::NoiseParams {
    NOISE_PATTERN
        .parse()
        .expect("the pattern name is one snow knows")
}

fn random_key() -> Result<[u8; KEY_LEN], ChannelError> {
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(|error| {
        ChannelError::Io(std::io::Error::other(format!(
            "no randomness for a heartbeat key: {error}"
        )))
    })?;
    Ok(key)
}

fn handshake(
    stream: TcpStream,
    keyring: &Keyring,
    deadline: Duration,
    initiator: bool,
    rekey_every: u64,
) -> Result<Channel, ChannelError> {
    let until = Instant::now() + deadline;
    let builder = snow::Builder::new(noise_params())
        .local_private_key(&keyring.local.private)?
        .prologue(PROLOGUE)?;
    let mut state = if initiator {
        builder.build_initiator()?
    } else {
        builder.build_responder()?
    };
    let own_heartbeat_key = random_key()?;
    let mut incoming = DeadlineReader::new(&stream, stream.try_clone()?, until, deadline);
    let mut message = vec![0u8; MAX_RECORD];
    let mut payload = vec![0u8; MAX_RECORD];
    let peer_heartbeat_key;
    if initiator {
        write_all_by(&stream, &NOISE_PREAMBLE, until, deadline)?;
        let length = state.write_message(&[], &mut message)?;
        send_handshake(&stream, &message[..length], until, deadline)?;
        let received = receive_handshake(&mut incoming, &mut message)?;
        let length = state.read_message(&message[..received], &mut payload)?;
        peer_heartbeat_key = heartbeat_key_of(&payload[..length])?;
        authorise(&state, keyring)?;
        let length = state.write_message(&own_heartbeat_key, &mut message)?;
        send_handshake(&stream, &message[..length], until, deadline)?;
    } else {
        let mut preamble = [0u8; 4];
        read_handshake(&mut incoming, &mut preamble)?;
        if preamble == *b"URPL" {
            return Err(ChannelError::WrongMode(
                "speaks plain text; this side requires an authenticated channel (--key and --peer-key)",
            ));
        }
        if preamble != NOISE_PREAMBLE {
            return Err(ChannelError::WrongMode(
                "does not speak the replication channel (bad preamble)",
            ));
        }
        let received = receive_handshake(&mut incoming, &mut message)?;
        state.read_message(&message[..received], &mut payload)?;
        let length = state.write_message(&own_heartbeat_key, &mut message)?;
        send_handshake(&stream, &message[..length], until, deadline)?;
        let received = receive_handshake(&mut incoming, &mut message)?;
        let length = state.read_message(&message[..received], &mut payload)?;
        peer_heartbeat_key = heartbeat_key_of(&payload[..length])?;
        authorise(&state, keyring)?;
    }
    let peer_key = state
        .get_remote_static()
        .and_then(|key| key.try_into().ok())
        .map(PublicKey);
    let transport = state.into_stateless_transport_mode()?;
    drop(incoming);
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let session = Arc::new(Session {
        transport: RwLock::new(transport),
        rekey_every,
    });
    let writer = stream.try_clone()?;
    Ok(Channel {
        reader: ChannelReader {
            stream,
            secure: Some(SecureIn::new(session.clone())),
            received: 0,
        },
        writer: ChannelWriter {
            stream: writer,
            secure: Some(SecureOut::new(session)),
        },
        heartbeat_keys: Some(HeartbeatKeys {
            send: own_heartbeat_key,
            receive: peer_heartbeat_key,
        }),
        peer_key,
    })
}

fn heartbeat_key_of(payload: &[u8]) -> Result<[u8; KEY_LEN], ChannelError> {
    payload
        .try_into()
        .map_err(|_| ChannelError::Malformed("the heartbeat key is not 32 bytes"))
}

fn authorise(state: &snow::HandshakeState, keyring: &Keyring) -> Result<(), ChannelError> {
    let key: [u8; KEY_LEN] = state
        .get_remote_static()
        .and_then(|key| key.try_into().ok())
        .ok_or(ChannelError::Malformed("the peer proved no static key"))?;
    let key = PublicKey(key);
    if keyring.peers.contains(&key) {
        Ok(())
    } else {
        Err(ChannelError::Unauthorised(key))
    }
}

fn remaining(until: Instant, deadline: Duration) -> Result<Duration, ChannelError> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ChannelError::Deadline(deadline))
    } else {
        Ok(left)
    }
}

/// Reads from `reader` until a fixed moment, then fails with `TimedOut`:
/// a read timeout alone starts again with every byte a slow peer trickles
/// in. `socket` is the reader's socket (its read timeout is set here).
pub struct DeadlineReader<R> {
    reader: R,
    socket: TcpStream,
    until: Instant,
    deadline: Duration,
}

impl<R: Read> DeadlineReader<R> {
    /// Reads from `reader` over `socket` (a handle of the reader's
    /// socket) until `until` (`deadline` after the start, for the error
    /// message).
    pub fn new(reader: R, socket: TcpStream, until: Instant, deadline: Duration) -> Self {
        Self {
            reader,
            socket,
            until,
            deadline,
        }
    }
}

impl<R: Read> Read for DeadlineReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let left = self.until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("the deadline of {:?} passed", self.deadline),
                ));
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.reader.read(buffer) {
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                other => return other,
            }
        }
    }
}

/// Fills `buffer` from the handshake's reader.
fn read_handshake(
    incoming: &mut DeadlineReader<&TcpStream>,
    buffer: &mut [u8],
) -> Result<(), ChannelError> {
    incoming
        .read_exact(buffer)
        .map_err(|error| match error.kind() {
            ErrorKind::TimedOut => ChannelError::Deadline(incoming.deadline),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => {
                ChannelError::ClosedDuringHandshake
            }
            _ => ChannelError::Io(error),
        })
}

fn write_all_by(
    mut stream: &TcpStream,
    bytes: &[u8],
    until: Instant,
    deadline: Duration,
) -> Result<(), ChannelError> {
    stream.set_write_timeout(Some(remaining(until, deadline)?))?;
    stream.write_all(bytes).map_err(|error| match error.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ChannelError::Deadline(deadline),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => ChannelError::ClosedDuringHandshake,
        _ => ChannelError::Io(error),
    })
}

fn send_handshake(
    stream: &TcpStream,
    message: &[u8],
    until: Instant,
    deadline: Duration,
) -> Result<(), ChannelError> {
    let length = u16::try_from(message.len())
        .map_err(|_| ChannelError::Malformed("a handshake message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&length.to_le_bytes());
    framed.extend_from_slice(message);
    write_all_by(stream, &framed, until, deadline)
}

fn receive_handshake(
    incoming: &mut DeadlineReader<&TcpStream>,
    buffer: &mut [u8],
) -> Result<usize, ChannelError> {
    let mut length = [0u8; 2];
    read_handshake(incoming, &mut length)?;
    let length = usize::from(u16::from_le_bytes(length));
    read_handshake(incoming, &mut buffer[..length])?;
    Ok(length)
}

/// The transport keys both halves share; each half keeps its own nonce.
struct Session {
    transport: RwLock<StatelessTransportState>,
    rekey_every: u64,
}

fn invalid(why: &'static str) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, why)
}

/// Records buffered per socket call: reads take whatever arrived (up to
/// this many records' bytes), writes go out this many records at a time.
const RECORDS_PER_CALL: usize = 4;
/// Bytes of one framed record at most.
const FRAMED_RECORD: usize = 2 + MAX_RECORD;

/// Opens the record `ciphertext` (number `nonce`) into `out`, which holds
/// at least `ciphertext.len()` bytes; returns the plaintext's length.
fn open_record(
    session: &Session,
    nonce: u64,
    ciphertext: &[u8],
    out: &mut [u8],
) -> std::io::Result<usize> {
    let opened = session
        .transport
        .read()
        .map_err(|_| invalid("the channel's keys are poisoned"))?
        .read_message(nonce, ciphertext, out)
        .map_err(|_| {
            invalid("a record failed authentication: the channel was altered, or a record was lost or replayed")
        })?;
    if (nonce + 1).is_multiple_of(session.rekey_every) {
        session
            .transport
            .write()
            .map_err(|_| invalid("the channel's keys are poisoned"))?
            .rekey_incoming();
    }
    Ok(opened)
}

struct SecureIn {
    session: Arc<Session>,
    nonce: u64,
    /// Bytes received, not opened yet: `raw[start..end]`.
    raw: Vec<u8>,
    start: usize,
    end: usize,
    /// The last record's plaintext, and how much of it was read.
    plain: Vec<u8>,
    plain_read: usize,
}

impl SecureIn {
    fn new(session: Arc<Session>) -> Self {
        Self {
            session,
            nonce: 0,
            raw: vec![0u8; RECORDS_PER_CALL * FRAMED_RECORD],
            start: 0,
            end: 0,
            plain: Vec::new(),
            plain_read: 0,
        }
    }

    /// The ciphertext length of the next record, once it arrived whole.
    fn whole_record(&self) -> std::io::Result<Option<usize>> {
        let buffered = &self.raw[self.start..self.end];
        let Some(prefix) = buffered.get(..2) else {
            return Ok(None);
        };
        let length = usize::from(u16::from_le_bytes([prefix[0], prefix[1]]));
        if length <= TAG_LEN {
            return Err(invalid("a record shorter than its authentication tag"));
        }
        Ok((buffered.len() >= 2 + length).then_some(length))
    }

    /// Opens the next record (`length` bytes of ciphertext, whole in `raw`)
    /// into `out`, or into `plain` when `out` is too small for it.
    fn open_next(&mut self, length: usize, out: &mut [u8]) -> std::io::Result<usize> {
        let ciphertext = self.start + 2..self.start + 2 + length;
        let nonce = self.nonce;
        self.start = ciphertext.end;
        self.nonce += 1;
        if out.len() >= length {
            // A large read: decrypt straight into it.
            return open_record(&self.session, nonce, &self.raw[ciphertext], out);
        }
        self.plain.resize(length, 0);
        self.plain_read = 0;
        let opened = open_record(&self.session, nonce, &self.raw[ciphertext], &mut self.plain);
        // Nothing of a record that failed is ever read.
        self.plain.truncate(*opened.as_ref().unwrap_or(&0));
        let copied = self.plain.len().min(out.len());
        out[..copied].copy_from_slice(&self.plain[..copied]);
        self.plain_read = copied;
        opened.map(|_| copied)
    }

    /// Makes room for a whole record after `end`.
    fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.raw.len() - self.end < FRAMED_RECORD {
            self.raw.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

/// The reading half of a [`Channel`]. A read that times out keeps what it
/// received of a record: the next read goes on from there.
pub struct ChannelReader {
    stream: TcpStream,
    secure: Option<SecureIn>,
    received: u64,
}

impl ChannelReader {
    /// The socket (for timeouts and addresses).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Bytes received from the socket so far (records included whole or
    /// not): a reader waiting for a large record sees them arrive.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let Some(secure) = &mut self.secure else {
            let read = self.stream.read(buffer)?;
            self.received += read as u64;
            return Ok(read);
        };
        if buffer.is_empty() {
            return Ok(0);
        }
        loop {
            if secure.plain_read < secure.plain.len() {
                let available = &secure.plain[secure.plain_read..];
                let copied = available.len().min(buffer.len());
                buffer[..copied].copy_from_slice(&available[..copied]);
                secure.plain_read += copied;
                return Ok(copied);
            }
            if let Some(length) = secure.whole_record()? {
                return secure.open_next(length, buffer);
            }
            secure.compact();
            let read = self.stream.read(&mut secure.raw[secure.end..])?;
            if read == 0 {
                return if secure.start == secure.end {
                    Ok(0)
                } else {
                    Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the peer closed the connection in the middle of a record",
                    ))
                };
            }
            self.received += read as u64;
            secure.end += read;
        }
    }
}

struct SecureOut {
    session: Arc<Session>,
    nonce: u64,
    /// Plaintext not sealed yet (less than a record).
    pending: Vec<u8>,
    /// Sealed records not written yet.
    outgoing: Vec<u8>,
    broken: bool,
}

impl SecureOut {
    fn new(session: Arc<Session>) -> Self {
        Self {
            session,
            nonce: 0,
            pending: Vec::with_capacity(MAX_PLAINTEXT),
            outgoing: Vec::with_capacity(RECORDS_PER_CALL * FRAMED_RECORD),
            broken: false,
        }
    }

    /// Encrypts `plain` as the next record into the outgoing buffer, and
    /// writes the buffer once it holds a socket call's worth.
    fn seal(&mut self, stream: &mut TcpStream, plain: &[u8]) -> std::io::Result<()> {
        let at = self.outgoing.len();
        self.outgoing.resize(at + 2 + plain.len() + TAG_LEN, 0);
        let sealed = self
            .session
            .transport
            .read()
            .map_err(|_| invalid("the channel's keys are poisoned"))?
            .write_message(self.nonce, plain, &mut self.outgoing[at + 2..])
            .map_err(|_| invalid("a record could not be encrypted"))?;
        let length = u16::try_from(sealed).map_err(|_| invalid("a record over 65535 bytes"))?;
        self.outgoing[at..at + 2].copy_from_slice(&length.to_le_bytes());
        self.outgoing.truncate(at + 2 + sealed);
        self.nonce += 1;
        if self.nonce.is_multiple_of(self.session.rekey_every) {
            self.session
                .transport
                .write()
                .map_err(|_| invalid("the channel's keys are poisoned"))?
                .rekey_outgoing();
        }
        if self.outgoing.capacity() - self.outgoing.len() < FRAMED_RECORD {
            self.write_outgoing(stream)?;
        }
        Ok(())
    }

    /// Writes the sealed records. A failed write breaks the half (a record
    /// may be cut): later writes fail too.
    fn write_outgoing(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        if let Err(error) = stream.write_all(&self.outgoing) {
            self.broken = true;
            return Err(error);
        }
        self.outgoing.clear();
        Ok(())
    }

    fn seal_pending(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let result = self.seal(stream, &pending);
        self.pending = pending;
        self.pending.clear();
        result
    }
}

/// The writing half of a [`Channel`]. With Noise, bytes are sealed into
/// records as they fill, and records go out a few at a time and on `flush`:
/// a message is sent once flushed.
pub struct ChannelWriter {
    stream: TcpStream,
    secure: Option<SecureOut>,
}

impl ChannelWriter {
    /// The socket (for timeouts, addresses and shutting down).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn broken_half() -> std::io::Error {
    std::io::Error::new(
        ErrorKind::BrokenPipe,
        "an earlier write failed part-way through a record",
    )
}

impl Write for ChannelWriter {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        let Some(secure) = &mut self.secure else {
            return self.stream.write(buffer);
        };
        if secure.broken {
            return Err(broken_half());
        }
        if secure.pending.is_empty() && buffer.len() >= MAX_PLAINTEXT {
            // Large writes are sealed straight from the caller's buffer.
            secure.seal(&mut self.stream, &buffer[..MAX_PLAINTEXT])?;
            return Ok(MAX_PLAINTEXT);
        }
        let taken = buffer.len().min(MAX_PLAINTEXT - secure.pending.len());
        secure.pending.extend_from_slice(&buffer[..taken]);
        if secure.pending.len() == MAX_PLAINTEXT {
            secure.seal_pending(&mut self.stream)?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(secure) = &mut self.secure {
            if secure.broken {
                return Err(broken_half());
            }
            secure.seal_pending(&mut self.stream)?;
            secure.write_outgoing(&mut self.stream)?;
        }
        self.stream.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn parse_key(text: &str) -> Result<[u8; KEY_LEN], &'static str> {
    let text = text.trim();
    if text.len() != 2 * KEY_LEN || !text.is_ascii() {
        return Err("a key is 64 hexadecimal digits");
    }
    let mut key = [0u8; KEY_LEN];
    for (index, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16)
            .map_err(|_| "a key is 64 hexadecimal digits")?;
    }
    Ok(key)
}

/// Writes `keypair` as `PREFIX.key` (mode 0600, never over an existing
/// file) and `PREFIX.pub`; returns both paths.
pub fn write_key_files(prefix: &Path, keypair: &KeyPair) -> std::io::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let with_extension = |extension: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(extension);
        PathBuf::from(name)
    };
    let private_path = with_extension(".key");
    let public_path = with_extension(".pub");
    let mut private = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&private_path)?;
    private.write_all(keypair.to_file_text().as_bytes())?;
    private.sync_all()?;
    let mut public = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&public_path)?;
    public.write_all(format!("{}\n", keypair.public).as_bytes())?;
    public.sync_all()?;
    Ok((private_path, public_path))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn keyring(local: &KeyPair, peers: &[&KeyPair]) -> Security {
        Security::Noise(Arc::new(Keyring {
            local: local.clone(),
            peers: peers.iter().map(|peer| peer.public).collect(),
        }))
    }

    fn sockets() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    /// Connects `client_security` to `server_security`; the server's result
    /// comes from its thread.
    fn open(
        client_security: Security,
        server_security: Security,
    ) -> (Result<Channel, ChannelError>, Result<Channel, ChannelError>) {
        let (client, server) = sockets();
        let deadline = Duration::from_secs(5);
        let server =
            std::thread::spawn(move || Channel::accept(server, &server_security, deadline));
        let client = Channel::connect(client, &client_security, deadline);
        (client, server.join().expect("server thread"))
    }

    #[test]
    fn authorised_peers_exchange_bytes_both_ways() {
        let primary = KeyPair::generate().expect("key");
        let secondary = KeyPair::generate().expect("key");
        let (client, server) = open(
            keyring(&primary, &[&secondary]),
            keyring(&secondary, &[&primary]),
        );
        let mut client = client.expect("client channel");
        let mut server = server.expect("server channel");
        let large: Vec<u8> = (0..200_000u32).map(|index| (index % 251) as u8).collect();

        client.writer.write_all(&large).expect("write");
        client.writer.write_all(b"tail").expect("write");
        client.writer.flush().expect("flush");
        server.writer.write_all(b"answer").expect("write");
        server.writer.flush().expect("flush");
        let mut received = vec![0u8; large.len() + 4];
        server.reader.read_exact(&mut received).expect("read");
        let mut answer = [0u8; 6];
        client.reader.read_exact(&mut answer).expect("read");

        assert_eq!(&received[..large.len()], &large[..]);
        assert_eq!(&received[large.len()..], b"tail");
        assert_eq!(&answer, b"answer");
        assert_eq!(client.peer_key, Some(secondary.public));
        assert_eq!(server.peer_key, Some(primary.public));
        let (client_keys, server_keys) = (
            client.heartbeat_keys.expect("keys"),
            server.heartbeat_keys.expect("keys"),
        );
        assert_eq!(client_keys.send, server_keys.receive);
        assert_eq!(client_keys.receive, server_keys.send);
    }

    #[test]
    fn an_unknown_initiator_is_refused_by_the_responder() {
        let primary = KeyPair::generate().expect("key");
        let stranger = KeyPair::generate().expect("key");
        let secondary = KeyPair::generate().expect("key");

        let (_, server) = open(
            keyring(&stranger, &[&secondary]),
            keyring(&secondary, &[&primary]),
        );

        assert!(
            matches!(server, Err(ChannelError::Unauthorised(key)) if key == stranger.public),
            "{:?}",
            server.err()
        );
    }

    #[test]
    fn an_unknown_responder_is_refused_by_the_initiator() {
        let primary = KeyPair::generate().expect("key");
        let impostor = KeyPair::generate().expect("key");
        let secondary = KeyPair::generate().expect("key");

        let (client, server) = open(
            keyring(&primary, &[&secondary]),
            keyring(&impostor, &[&primary]),
        );

        assert!(
            matches!(client, Err(ChannelError::Unauthorised(key)) if key == impostor.public),
            "{:?}",
            client.err()
        );
        assert!(server.is_err(), "the impostor completed a handshake");
    }

    #[test]
    fn plain_text_is_refused_by_a_noise_responder() {
        let secondary = KeyPair::generate().expect("key");
        let (mut client, server) = sockets();
        client.write_all(b"URPL and more").expect("write");

        let result = Channel::accept(server, &keyring(&secondary, &[]), Duration::from_secs(5));

        assert!(matches!(result, Err(ChannelError::WrongMode(_))));
    }

    #[test]
    fn a_silent_peer_misses_the_handshake_deadline() {
        let secondary = KeyPair::generate().expect("key");
        let (_client, server) = sockets();

        let result = Channel::accept(
            server,
            &keyring(&secondary, &[]),
            Duration::from_millis(100),
        );

        assert!(matches!(result, Err(ChannelError::Deadline(_))));
    }

    #[test]
    fn an_altered_record_fails_authentication() {
        let primary = KeyPair::generate().expect("key");
        let secondary = KeyPair::generate().expect("key");
        let (client, server) = open(
            keyring(&primary, &[&secondary]),
            keyring(&secondary, &[&primary]),
        );
        let mut client = client.expect("client channel");
        let mut server = server.expect("server channel");
        // Seal a record by hand, flip a bit, send it raw.
        let secure = client.writer.secure.as_mut().expect("noise");
        let mut record = vec![0u8; 64];
        let sealed = secure
            .session
            .transport
            .read()
            .expect("keys")
            .write_message(0, b"hello", &mut record)
            .expect("seal");
        record[0] ^= 1;
        let mut raw = client.writer.stream.try_clone().expect("clone");
        raw.write_all(&u16::try_from(sealed).expect("short").to_le_bytes())
            .expect("write");
        raw.write_all(&record[..sealed]).expect("write");

        let mut buffer = [0u8; 5];
        let result = server.reader.read_exact(&mut buffer);

        assert!(matches!(result, Err(error) if error.kind() == ErrorKind::InvalidData));
    }

    #[test]
    fn both_directions_rekey_at_the_same_record() {
        let primary = KeyPair::generate().expect("key");
        let secondary = KeyPair::generate().expect("key");
        let (client, server) = sockets();
        let (client_ring, server_ring) = (
            Keyring {
                local: primary.clone(),
                peers: vec![secondary.public],
            },
            Keyring {
                local: secondary,
                peers: vec![primary.public],
            },
        );
        let deadline = Duration::from_secs(5);
        let server =
            std::thread::spawn(move || handshake(server, &server_ring, deadline, false, 3));
        let mut client = handshake(client, &client_ring, deadline, true, 3).expect("client");
        let mut server = server.join().expect("thread").expect("server");

        for round in 0..10u8 {
            client.writer.write_all(&[round; 100]).expect("write");
            client.writer.flush().expect("flush");
        }
        let mut received = vec![0u8; 1000];
        server
            .reader
            .read_exact(&mut received)
            .expect("ten records across three re-keys");

        assert_eq!(received[999], 9);
        assert_eq!(client.writer.secure.as_ref().expect("noise").nonce, 10);
    }
}
