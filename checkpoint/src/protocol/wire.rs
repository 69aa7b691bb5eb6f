//! Framing: the fixed message header, numbering on the way out, and
//! reading one checked message on the way in.

use std::io::{Read, Write};

use xxhash_rust::xxh3::xxh3_64;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{HEADER_LEN, MAGIC, MAX_PAYLOAD, Message, MessageKind, ProtocolError};

/// The 48-byte message header (see the module docs), little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// A [`MessageKind`].
    pub kind: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// Per direction: 0, 1, 2, ...
    pub sequence: U64,
    /// The epoch the message belongs to.
    pub epoch: U64,
    /// Bytes of payload after the header.
    pub payload_len: U32,
    /// Zero.
    pub reserved2: U32,
    /// xxh3 of the payload.
    pub payload_checksum: U64,
    /// xxh3 of the header's bytes before this field.
    pub header_checksum: U64,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_LEN);

impl Header {
    /// The bytes the header checksum covers.
    fn checksummed(&self) -> &[u8] {
        &self.as_bytes()[..HEADER_LEN - 8]
    }
}

/// A received message with its header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Sender's sequence number.
    pub sequence: u64,
    /// Epoch.
    pub epoch: u64,
    /// The message.
    pub message: Message,
}

/// Writes messages, numbering them.
#[derive(Debug, Default)]
pub struct Sender {
    next_sequence: u64,
}

impl Sender {
    /// A sender at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sequence number the next message gets.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// The header of the next message: `message` for `epoch`, whose payload
    /// is `payload_len` bytes with xxh3 `payload_checksum`. Numbers it. A
    /// payload longer than [`MAX_PAYLOAD`] is refused before anything is sent.
    pub fn header(
        &mut self,
        epoch: u64,
        message: &Message,
        payload_len: usize,
        payload_checksum: u64,
    ) -> Result<Header, ProtocolError> {
        let too_large =
            || ProtocolError::PayloadTooLarge(u64::try_from(payload_len).unwrap_or(u64::MAX));
        if payload_len > MAX_PAYLOAD {
            return Err(too_large());
        }
        let mut header = Header {
            magic: MAGIC,
            kind: message.kind() as u8,
            reserved: [0; 3],
            sequence: self.next_sequence.into(),
            epoch: epoch.into(),
            payload_len: u32::try_from(payload_len).map_err(|_| too_large())?.into(),
            reserved2: 0.into(),
            payload_checksum: payload_checksum.into(),
            header_checksum: 0.into(),
        };
        header.header_checksum = xxh3_64(header.checksummed()).into();
        self.next_sequence += 1;
        Ok(header)
    }

    /// Encodes `message` for `epoch` as the next message (header and
    /// payload in one buffer).
    pub fn encode(&mut self, epoch: u64, message: &Message) -> Result<Vec<u8>, ProtocolError> {
        let payload = message.payload();
        let header = self.header(epoch, message, payload.len(), xxh3_64(&payload))?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&payload);
        Ok(bytes)
    }

    /// Writes `message` for `epoch` to `writer`.
    pub fn send(
        &mut self,
        writer: &mut impl Write,
        epoch: u64,
        message: &Message,
    ) -> Result<(), ProtocolError> {
        writer.write_all(&self.encode(epoch, message)?)?;
        Ok(())
    }
}

/// Reads one message (no sequence or state checks: see [`Receiver`](super::Receiver)).
pub fn read_message(reader: &mut impl Read) -> Result<Envelope, ProtocolError> {
    read_message_within(reader, MAX_PAYLOAD)
}

/// Reads one message whose payload is at most `limit` bytes and within its
/// kind's own bound ([`MessageKind::max_payload`]); a longer one is refused
/// from its header, before anything is allocated for it.
pub fn read_message_within(
    reader: &mut impl Read,
    limit: usize,
) -> Result<Envelope, ProtocolError> {
    let mut header = Header::new_zeroed();
    reader.read_exact(header.as_mut_bytes())?;
    if header.magic != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    if xxh3_64(header.checksummed()) != header.header_checksum.get() {
        return Err(ProtocolError::HeaderChecksum);
    }
    let kind =
        MessageKind::from_byte(header.kind).ok_or(ProtocolError::UnknownKind(header.kind))?;
    let length = header.payload_len.get();
    let length = usize::try_from(length)
        .ok()
        .filter(|length| *length <= limit.min(kind.max_payload()))
        .ok_or(ProtocolError::PayloadTooLarge(u64::from(length)))?;
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload)?;
    if xxh3_64(&payload) != header.payload_checksum.get() {
        return Err(ProtocolError::PayloadChecksum { kind: kind.name() });
    }
    Ok(Envelope {
        sequence: header.sequence.get(),
        epoch: header.epoch.get(),
        message: Message::parse(kind, payload)?,
    })
}
