//! The key-value store the built-in guest serves: the Redis protocol (RESP 2)
//! and the commands `PING`, `ECHO`, `GET`, `SET`, `DEL`, `INCR`, `EXISTS`,
//! `DBSIZE`, `TIME` (plus `CONFIG GET`, answered with nothing, and `QUIT`),
//! so that `redis-cli` and `redis-benchmark` work against it unchanged.
//!
//! `TIME` answers from the store's clock (the guest's: its time stamp
//! counter since boot), so two copies of the guest answer it differently:
//! the workload that makes COLO's copies diverge on purpose.
//!
//! `no_std` with `alloc`: the guest links it; the host runs its tests.
//!
//! ```text
//! client bytes -> Connection::receive -> parse (array of bulk strings, or an
//!                 inline command) -> Store::execute -> reply bytes queued
//!                 -> Connection::output, sent as the socket has room
//! ```
#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Longest bulk string accepted (a key or a value).
pub const MAX_BULK_LEN: usize = 512 * 1024;
/// Most arguments in one command.
pub const MAX_ARGUMENTS: usize = 1024;
/// Most unparsed input kept per connection.
pub const MAX_PENDING_INPUT: usize = 2 * MAX_BULK_LEN;

/// A request that cannot be parsed: the connection is answered with an error and closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// A length or count is not a number.
    BadLength,
    /// A bulk string or command is too large.
    TooLarge,
    /// A bulk string is not followed by CRLF, or an array holds something else.
    Malformed,
}

impl ProtocolError {
    /// The error reply sent before closing.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Self::BadLength => b"-ERR Protocol error: invalid length\r\n",
            Self::TooLarge => b"-ERR Protocol error: request too large\r\n",
            Self::Malformed => b"-ERR Protocol error: malformed request\r\n",
        }
    }
}

/// One parsed command: its arguments (the first is the name).
pub type Command<'a> = Vec<&'a [u8]>;

/// Parses one command from the start of `input`: `Ok(None)` when more bytes
/// are needed, else the command and the bytes it used.
pub fn parse(input: &[u8]) -> Result<Option<(Command<'_>, usize)>, ProtocolError> {
    match input.first() {
        None => Ok(None),
        Some(b'*') => parse_array(input),
        Some(_) => parse_inline(input),
    }
}

fn line(input: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let end = input[from..].windows(2).position(|w| w == b"\r\n")? + from;
    Some((&input[from..end], end + 2))
}

fn number(digits: &[u8]) -> Result<i64, ProtocolError> {
    let text = core::str::from_utf8(digits).map_err(|_| ProtocolError::BadLength)?;
    text.parse().map_err(|_| ProtocolError::BadLength)
}

fn parse_array(input: &[u8]) -> Result<Option<(Command<'_>, usize)>, ProtocolError> {
    let Some((header, mut at)) = line(input, 1) else {
        return if input.len() > 32 {
            Err(ProtocolError::BadLength)
        } else {
            Ok(None)
        };
    };
    // A negative count (`*-1`, a null array) holds no arguments.
    let count = usize::try_from(number(header)?).unwrap_or(0);
    if count > MAX_ARGUMENTS {
        return Err(ProtocolError::TooLarge);
    }
    let mut arguments = Vec::with_capacity(count);
    for _ in 0..count {
        if at >= input.len() {
            return Ok(None);
        }
        if input[at] != b'$' {
            return Err(ProtocolError::Malformed);
        }
        let Some((length, data)) = line(input, at + 1) else {
            return if input.len() - at > 32 {
                Err(ProtocolError::BadLength)
            } else {
                Ok(None)
            };
        };
        let length = usize::try_from(number(length)?)
            .ok()
            .filter(|length| *length <= MAX_BULK_LEN)
            .ok_or(ProtocolError::TooLarge)?;
        let end = data + length;
        if input.len() < end + 2 {
            return Ok(None);
        }
        if &input[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::Malformed);
        }
        arguments.push(&input[data..end]);
        at = end + 2;
    }
    Ok(Some((arguments, at)))
}

fn parse_inline(input: &[u8]) -> Result<Option<(Command<'_>, usize)>, ProtocolError> {
    let Some(end) = input.iter().position(|&b| b == b'\n') else {
        return if input.len() > MAX_BULK_LEN {
            Err(ProtocolError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let text = input[..end].strip_suffix(b"\r").unwrap_or(&input[..end]);
    let arguments = text
        .split(|&b| b == b' ')
        .filter(|word| !word.is_empty())
        .collect();
    Ok(Some((arguments, end + 1)))
}

/// What the connection does after a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Keep reading.
    Continue,
    /// Close once the replies are sent.
    Close,
}

/// The store.
#[derive(Default)]
pub struct Store {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    commands: u64,
    /// Microseconds of the store's clock (`TIME`); none: always 0.
    clock: Option<fn() -> u64>,
}

fn simple(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'+');
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

fn error(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(b"-ERR ");
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

fn integer(out: &mut Vec<u8>, value: i64) {
    out.push(b':');
    push_decimal(out, value);
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => {
            out.push(b'$');
            push_decimal(out, count(value.len()));
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"$-1\r\n"),
    }
}

/// A count as a RESP integer.
fn count(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn push_decimal(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10).to_le_bytes()[0];
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

fn wrong_arity(out: &mut Vec<u8>, name: &[u8]) {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    out.extend_from_slice(name);
    out.extend_from_slice(b"' command\r\n");
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose `TIME` reads `clock` (microseconds).
    pub fn with_clock(clock: fn() -> u64) -> Self {
        Self {
            clock: Some(clock),
            ..Self::default()
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Commands executed so far.
    pub fn commands(&self) -> u64 {
        self.commands
    }

    /// Executes `command`, appending its reply to `out`.
    pub fn execute(&mut self, command: &[&[u8]], out: &mut Vec<u8>) -> After {
        let Some((name, arguments)) = command.split_first() else {
            return After::Continue;
        };
        self.commands += 1;
        let mut upper = [0u8; 16];
        let name_len = name.len().min(upper.len());
        for (slot, byte) in upper.iter_mut().zip(&name[..name_len]) {
            *slot = byte.to_ascii_uppercase();
        }
        let upper_name: &[u8] = if name.len() <= upper.len() {
            &upper[..name_len]
        } else {
            name
        };
        match (upper_name, arguments.len()) {
            (b"PING", 0) => simple(out, b"PONG"),
            (b"PING", 1) => bulk(out, Some(arguments[0])),
            (b"ECHO", 1) => bulk(out, Some(arguments[0])),
            (b"GET", 1) => bulk(out, self.entries.get(arguments[0]).map(Vec::as_slice)),
            (b"SET", 2) => {
                self.entries
                    .insert(arguments[0].to_vec(), arguments[1].to_vec());
                simple(out, b"OK");
            }
            (b"SET", n) if n > 2 => error(out, b"syntax error"),
            (b"DEL", n) if n >= 1 => {
                let removed = arguments
                    .iter()
                    .filter(|key| self.entries.remove(**key).is_some())
                    .count();
                integer(out, count(removed));
            }
            (b"EXISTS", n) if n >= 1 => {
                let found = arguments
                    .iter()
                    .filter(|key| self.entries.contains_key(**key))
                    .count();
                integer(out, count(found));
            }
            (b"INCR", 1) => self.increment(arguments[0], out),
            (b"DBSIZE", 0) => integer(out, count(self.entries.len())),
            (b"TIME", 0) => {
                // Redis's reply: seconds and microseconds, as bulk strings.
                let micros = self.clock.map_or(0, |clock| clock());
                let mut text = Vec::new();
                out.extend_from_slice(b"*2\r\n");
                push_decimal(
                    &mut text,
                    i64::try_from(micros / 1_000_000).unwrap_or(i64::MAX),
                );
                bulk(out, Some(&text));
                text.clear();
                push_decimal(&mut text, i64::try_from(micros % 1_000_000).unwrap_or(0));
                bulk(out, Some(&text));
            }
            (b"CONFIG", n) if n >= 1 => out.extend_from_slice(b"*0\r\n"),
            (b"QUIT", _) => {
                simple(out, b"OK");
                return After::Close;
            }
            (
                b"PING" | b"ECHO" | b"GET" | b"SET" | b"DEL" | b"EXISTS" | b"INCR" | b"DBSIZE"
                | b"CONFIG" | b"TIME",
                _,
            ) => wrong_arity(out, name),
            _ => {
                out.extend_from_slice(b"-ERR unknown command '");
                out.extend_from_slice(&name[..name.len().min(64)]);
                out.extend_from_slice(b"'\r\n");
            }
        }
        After::Continue
    }

    fn increment(&mut self, key: &[u8], out: &mut Vec<u8>) {
        let current = match self.entries.get(key) {
            None => 0,
            Some(value) => match core::str::from_utf8(value)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
            {
                Some(number) => number,
                None => return error(out, b"value is not an integer or out of range"),
            },
        };
        let Some(next) = current.checked_add(1) else {
            return error(out, b"increment or decrement would overflow");
        };
        let mut text = Vec::new();
        push_decimal(&mut text, next);
        self.entries.insert(key.to_vec(), text);
        integer(out, next);
    }
}

/// One client connection's buffers.
#[derive(Default)]
pub struct Connection {
    input: Vec<u8>,
    /// Replies not yet taken by the socket.
    pub output: Vec<u8>,
    closing: bool,
}

impl Connection {
    /// A fresh connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the connection should close once `output` is sent.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Takes bytes from the client and executes every complete command.
    pub fn receive(&mut self, bytes: &[u8], store: &mut Store) {
        if self.closing {
            return;
        }
        self.input.extend_from_slice(bytes);
        let mut consumed = 0;
        loop {
            match parse(&self.input[consumed..]) {
                Ok(Some((command, used))) => {
                    consumed += used;
                    if store.execute(&command, &mut self.output) == After::Close {
                        self.closing = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    self.output.extend_from_slice(error.reply());
                    self.closing = true;
                    break;
                }
            }
        }
        self.input.drain(..consumed);
        if self.input.len() > MAX_PENDING_INPUT && !self.closing {
            self.output
                .extend_from_slice(ProtocolError::TooLarge.reply());
            self.closing = true;
        }
    }

    /// Forgets everything (the socket was closed).
    pub fn reset(&mut self) {
        self.input.clear();
        self.output.clear();
        self.closing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn run(store: &mut Store, request: &[u8]) -> Vec<u8> {
        let mut connection = Connection::new();
        connection.receive(request, store);
        connection.output
    }

    #[test]
    fn ping_answers_pong() {
        assert_eq!(
            run(&mut Store::new(), b"*1\r\n$4\r\nPING\r\n"),
            b"+PONG\r\n"
        );
    }

    #[test]
    fn inline_commands_work_as_redis_cli_sends_them() {
        assert_eq!(run(&mut Store::new(), b"ping\r\n"), b"+PONG\r\n");
    }

    #[test]
    fn set_then_get_returns_the_value() {
        let mut store = Store::new();
        run(&mut store, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n");
        assert_eq!(
            run(&mut store, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            b"$5\r\nhello\r\n"
        );
    }

    #[test]
    fn get_of_a_missing_key_is_nil() {
        assert_eq!(run(&mut Store::new(), b"GET nothing\r\n"), b"$-1\r\n");
    }

    #[test]
    fn time_answers_seconds_and_microseconds_of_the_clock() {
        let mut store = Store::with_clock(|| 12_000_345);

        let reply = run(&mut store, b"TIME\r\n");

        assert_eq!(reply, b"*2\r\n$2\r\n12\r\n$3\r\n345\r\n");
    }

    #[test]
    fn incr_counts_from_zero() {
        let mut store = Store::new();
        run(&mut store, b"INCR c\r\n");
        assert_eq!(run(&mut store, b"INCR c\r\n"), b":2\r\n");
    }

    #[test]
    fn incr_of_a_non_number_is_an_error() {
        let mut store = Store::new();
        run(&mut store, b"SET c abc\r\n");
        assert_eq!(
            run(&mut store, b"INCR c\r\n"),
            b"-ERR value is not an integer or out of range\r\n"
        );
    }

    #[test]
    fn incr_at_the_maximum_overflows_cleanly() {
        let mut store = Store::new();
        run(&mut store, b"SET c 9223372036854775807\r\n");
        assert_eq!(
            run(&mut store, b"INCR c\r\n"),
            b"-ERR increment or decrement would overflow\r\n"
        );
    }

    fn store_with_a_and_b() -> Store {
        let mut store = Store::new();
        run(&mut store, b"SET a 1\r\nSET b 2\r\n");
        store
    }

    #[test]
    fn exists_counts_the_keys_present() {
        let mut store = store_with_a_and_b();
        assert_eq!(run(&mut store, b"EXISTS a b z\r\n"), b":2\r\n");
    }

    #[test]
    fn del_counts_the_keys_removed() {
        let mut store = store_with_a_and_b();
        assert_eq!(run(&mut store, b"DEL a z\r\n"), b":1\r\n");
    }

    #[test]
    fn dbsize_counts_what_is_left_after_a_del() {
        let mut store = store_with_a_and_b();
        run(&mut store, b"DEL a\r\n");
        assert_eq!(run(&mut store, b"DBSIZE\r\n"), b":1\r\n");
    }

    #[test]
    fn echo_returns_its_argument() {
        assert_eq!(
            run(&mut Store::new(), b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n"),
            b"$2\r\nhi\r\n"
        );
    }

    #[test]
    fn a_command_split_across_reads_runs_once_complete() {
        let mut store = Store::new();
        let mut connection = Connection::new();
        connection.receive(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhel", &mut store);
        assert!(connection.output.is_empty());
        connection.receive(b"lo\r\n", &mut store);
        assert_eq!(connection.output, b"+OK\r\n");
    }

    #[test]
    fn pipelined_commands_get_replies_in_order() {
        assert_eq!(
            run(&mut Store::new(), b"PING\r\nINCR x\r\nINCR x\r\n"),
            b"+PONG\r\n:1\r\n:2\r\n"
        );
    }

    #[test]
    fn wrong_arity_is_reported() {
        assert_eq!(
            run(&mut Store::new(), b"GET\r\n"),
            b"-ERR wrong number of arguments for 'GET' command\r\n"
        );
    }

    #[test]
    fn unknown_commands_are_reported() {
        assert_eq!(
            run(&mut Store::new(), b"FLUSHALL\r\n"),
            b"-ERR unknown command 'FLUSHALL'\r\n"
        );
    }

    #[test]
    fn a_bad_length_closes_the_connection() {
        let mut connection = Connection::new();
        connection.receive(b"*1\r\n$x\r\nPING\r\n", &mut Store::new());
        assert!(connection.closing());
        assert_eq!(connection.output, ProtocolError::BadLength.reply());
    }

    #[test]
    fn a_bulk_string_without_crlf_is_malformed() {
        assert_eq!(parse(b"*1\r\n$4\r\nPINGxx"), Err(ProtocolError::Malformed));
    }

    #[test]
    fn an_oversized_bulk_string_is_refused() {
        assert_eq!(parse(b"*1\r\n$999999999\r\n"), Err(ProtocolError::TooLarge));
    }

    #[test]
    fn quit_closes_after_ok() {
        let mut connection = Connection::new();
        connection.receive(b"QUIT\r\nPING\r\n", &mut Store::new());
        assert!(connection.closing());
        assert_eq!(connection.output, b"+OK\r\n");
    }

    #[test]
    fn config_get_answers_an_empty_list() {
        assert_eq!(run(&mut Store::new(), b"CONFIG GET save\r\n"), b"*0\r\n");
    }

    #[test]
    fn an_empty_array_is_ignored() {
        assert_eq!(parse(b"*0\r\n"), Ok(Some((vec![], 4))));
    }
}
