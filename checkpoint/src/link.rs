//! One replication connection: messages out from several threads, messages
//! in with liveness, and heartbeats on their own schedule.
//!
//! Liveness is "heard recently": bytes on the connection, or a UDP heartbeat
//! ([`crate::heartbeat`]), which cannot get stuck behind a large epoch's
//! `Pages`. Each side also sends a `Heartbeat` message whenever it has sent
//! nothing on the connection for one interval; the other side declares it
//! lost after `misses` intervals without hearing anything.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;
use zerocopy::IntoBytes;

use crate::channel::{ChannelReader, ChannelWriter};

/// Frames a frame writer sends in one write at most
/// ([`LinkSender::spawn_frame_writer`]).
pub const FRAMES_PER_WRITE: usize = 64;
use crate::heartbeat::{Heard, HeartbeatPolicy, nanos_since};
use crate::protocol::{Envelope, MAX_PAYLOAD, Message, ProtocolError, Sender, read_message_within};

/// The sending half: numbered messages, one writer at a time. Shutting
/// the connection down never waits for a writer (a writer blocked on a
/// stalled peer holds the lock): it goes through a second handle of the
/// same socket.
#[derive(Clone)]
pub struct LinkSender {
    inner: Arc<Mutex<SenderState>>,
    control: Arc<TcpStream>,
}

struct SenderState {
    sender: Sender,
    stream: ChannelWriter,
    last_sent: Instant,
}

impl SenderState {
    /// Numbers `message` and writes it whole (header, payload, flush).
    fn write(
        &mut self,
        epoch: u64,
        message: &Message,
        payload: &[u8],
        checksum: u64,
    ) -> Result<(), ProtocolError> {
        let header = self
            .sender
            .header(epoch, message, payload.len(), checksum)?;
        self.stream.write_all(header.as_bytes())?;
        self.stream.write_all(payload)?;
        self.stream.flush()?;
        self.last_sent = Instant::now();
        Ok(())
    }
}

impl LinkSender {
    /// Wraps the writing half of a channel. A write that makes no progress
    /// for `write_timeout` fails (a peer that stopped reading must not
    /// block a sender forever).
    pub fn new(stream: ChannelWriter, write_timeout: Duration) -> std::io::Result<Self> {
        stream
            .stream()
            .set_write_timeout(Some(write_timeout.max(Duration::from_millis(1))))?;
        let control = Arc::new(stream.stream().try_clone()?);
        Ok(Self {
            inner: Arc::new(Mutex::new(SenderState {
                sender: Sender::new(),
                stream,
                last_sent: Instant::now(),
            })),
            control,
        })
    }

    /// Sends `Goodbye` with `reason` unless another message is being
    /// written for longer than a moment (a goodbye cannot be cut into the
    /// middle of another message, and a writer stuck on a stalled peer must
    /// not hold up the caller).
    pub fn try_goodbye(&self, reason: &str) -> bool {
        let message = Message::Goodbye(reason.to_owned());
        let payload = message.payload();
        let checksum = xxh3_64(&payload);
        let patience = Instant::now() + Duration::from_millis(200);
        let mut state = loop {
            match self.inner.try_lock() {
                Ok(state) => break state,
                Err(_) if Instant::now() < patience => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        };
        state.write(0, &message, &payload, checksum).is_ok()
    }

    /// Sends `message` for `epoch`. The payload is checksummed before the
    /// lock is taken and written without a copy, so a heartbeat waits for
    /// the bytes of a large message to flow, never for them to be prepared.
    pub fn send(&self, epoch: u64, message: &Message) -> Result<(), ProtocolError> {
        let payload = message.payload();
        let checksum = xxh3_64(&payload);
        let mut state = self
            .inner
            .lock()
            .expect("a sender never panics holding the lock");
        state.write(epoch, message, &payload, checksum)
    }

    /// Sends several small messages (frames) with one flush: one record
    /// and one socket write for a burst instead of one per message.
    pub fn send_batch(&self, messages: &[(u64, Message)]) -> Result<(), ProtocolError> {
        let mut state = self
            .inner
            .lock()
            .expect("a sender never panics holding the lock");
        for (epoch, message) in messages {
            let payload = message.payload();
            let checksum = xxh3_64(&payload);
            let header = state
                .sender
                .header(*epoch, message, payload.len(), checksum)?;
            state.stream.write_all(header.as_bytes())?;
            state.stream.write_all(&payload)?;
        }
        state.stream.flush()?;
        state.last_sent = Instant::now();
        Ok(())
    }

    /// Starts a thread (`name`) that sends the frames queued on `frames`,
    /// each as `message(frame)` for its epoch, what queued meanwhile in
    /// one write (at most [`FRAMES_PER_WRITE`]). It ends when every sender
    /// of the queue is gone or the link fails.
    pub fn spawn_frame_writer(
        &self,
        name: &str,
        frames: std::sync::mpsc::Receiver<(u64, Vec<u8>)>,
        message: fn(Vec<u8>) -> Message,
    ) -> std::io::Result<JoinHandle<()>> {
        let link = self.clone();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut batch = Vec::new();
                while let Ok((epoch, frame)) = frames.recv() {
                    batch.push((epoch, message(frame)));
                    batch.extend(
                        frames
                            .try_iter()
                            .take(FRAMES_PER_WRITE - 1)
                            .map(|(epoch, frame)| (epoch, message(frame))),
                    );
                    if link.send_batch(&batch).is_err() {
                        break;
                    }
                    batch.clear();
                }
            })
    }

    fn idle_for(&self) -> Duration {
        self.inner
            .lock()
            .expect("a sender never panics holding the lock")
            .last_sent
            .elapsed()
    }

    /// Starts a thread that sends a heartbeat whenever nothing was sent for
    /// an interval, until `stop` is set or a send fails.
    pub fn start_heartbeats(
        &self,
        policy: HeartbeatPolicy,
        stop: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        let sender = self.clone();
        let started = Instant::now();
        std::thread::Builder::new()
            .name("heartbeat".to_owned())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let idle = sender.idle_for();
                    if idle >= policy.interval {
                        let clock = nanos_since(started);
                        if sender.send(0, &Message::Heartbeat(clock)).is_err() {
                            return;
                        }
                        std::thread::sleep(policy.interval);
                    } else {
                        std::thread::sleep(policy.interval - idle);
                    }
                }
            })
            .expect("spawning the heartbeat thread")
    }

    /// The connection's local address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.control.local_addr()
    }

    /// Closes the sending direction only: the peer reads the end of the
    /// stream after everything sent, and can still answer. Call it after
    /// the last send (it does not wait for a writer).
    pub fn shutdown_write(&self) {
        let _ = self.control.shutdown(std::net::Shutdown::Write);
    }

    /// Closes both directions at once: wakes a blocked reader and a writer
    /// blocked on a stalled peer.
    pub fn shutdown(&self) {
        let _ = self.control.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads from a stream whose read timeout is short, failing with
/// `TimedOut` once nothing arrived, neither on the stream nor as a UDP
/// heartbeat ([`crate::heartbeat`]), for the policy's timeout.
pub struct LivenessReader {
    stream: ChannelReader,
    timeout: Duration,
    payload_limit: usize,
    last_progress: Instant,
    heard: Option<Arc<Heard>>,
}

impl LivenessReader {
    /// Wraps the reading half of a channel (its read timeout is set here).
    pub fn new(stream: ChannelReader, policy: HeartbeatPolicy) -> std::io::Result<Self> {
        stream
            .stream()
            .set_read_timeout(Some(policy.interval.max(Duration::from_millis(1))))?;
        Ok(Self {
            stream,
            timeout: policy.timeout(),
            payload_limit: MAX_PAYLOAD,
            last_progress: Instant::now(),
            heard: None,
        })
    }

    /// Silence after which the peer is lost.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Counts the peer's UDP heartbeats as signs of life too.
    pub fn hear(&mut self, heard: Arc<Heard>) {
        self.heard = Some(heard);
    }

    /// When the peer was last heard from (bytes or heartbeat).
    pub fn last_progress(&self) -> Instant {
        let heartbeat = self.heard.as_ref().and_then(|heard| heard.last());
        heartbeat.map_or(self.last_progress, |at| at.max(self.last_progress))
    }

    /// Refuses, before allocating, any message whose payload is longer
    /// than `limit` (a peer that has not said `Hello` yet gets a small one).
    pub fn limit_payload(&mut self, limit: usize) {
        self.payload_limit = limit.min(MAX_PAYLOAD);
    }

    /// Reads the next message.
    pub fn receive(&mut self) -> Result<Envelope, ProtocolError> {
        let limit = self.payload_limit;
        read_message_within(self, limit)
    }
}

impl Read for LivenessReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        // Silence counts only while this side is actually waiting: a
        // receiver that was busy (applying an epoch) must not blame the
        // peer for bytes it did not ask for.
        let waiting_since = Instant::now();
        let mut confirming = false;
        loop {
            let bytes_before = self.stream.bytes_received();
            let result = self.stream.read(buffer);
            if self.stream.bytes_received() != bytes_before {
                // Part of an encrypted record arrived: the peer is there.
                self.last_progress = Instant::now();
            }
            match result {
                Ok(0) if !buffer.is_empty() => {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    ));
                }
                Ok(read) => {
                    self.last_progress = Instant::now();
                    return Ok(read);
                }
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    if self.last_progress().elapsed() >= self.timeout
                        && waiting_since.elapsed() >= self.timeout
                    {
                        // This thread may itself have been kept off the CPU
                        // past the deadline: only a further wait that also
                        // brings nothing proves the peer silent.
                        if !confirming {
                            confirming = true;
                            continue;
                        }
                        return Err(std::io::Error::new(
                            ErrorKind::TimedOut,
                            format!("nothing heard from the peer for {:?}", self.timeout),
                        ));
                    }
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }
}

/// Whether `error` means the peer is gone (rather than misbehaving).
pub fn is_peer_lost(error: &ProtocolError) -> bool {
    matches!(error, ProtocolError::Io(_))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::channel::{Channel, Security};

    fn pair() -> (Channel, Channel) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let open = |stream| {
            Channel::connect(stream, &Security::Plaintext, Duration::from_secs(1))
                .expect("a plain channel")
        };
        (open(client), open(server))
    }

    #[test]
    fn heartbeats_keep_a_quiet_peer_alive() {
        let (client, server) = pair();
        let policy = HeartbeatPolicy {
            interval: Duration::from_millis(5),
            misses: 4,
            progress: crate::heartbeat::DEFAULT_PROGRESS_TIMEOUT,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeats = LinkSender::new(client.writer, policy.progress)
            .expect("a sender")
            .start_heartbeats(policy, stop.clone());
        let mut reader = LivenessReader::new(server.reader, policy).expect("reader");

        let beats = (0..10)
            .map(|_| reader.receive())
            .filter(|r| r.is_ok())
            .count();

        stop.store(true, Ordering::Relaxed);
        heartbeats.join().expect("heartbeat thread");
        assert_eq!(beats, 10);
    }

    #[test]
    fn silent_peer_is_lost_after_the_timeout() {
        let (_client, server) = pair();
        let policy = HeartbeatPolicy {
            interval: Duration::from_millis(5),
            misses: 4,
            progress: crate::heartbeat::DEFAULT_PROGRESS_TIMEOUT,
        };
        let mut reader = LivenessReader::new(server.reader, policy).expect("reader");
        let started = Instant::now();

        let result = reader.receive();

        let waited = started.elapsed();
        assert!(matches!(result, Err(ProtocolError::Io(ref e)) if e.kind() == ErrorKind::TimedOut));
        assert!(waited >= policy.timeout());
    }
}
