//! A small RESP (Redis protocol) client on one TCP connection: what the
//! drill's writer, the demo and the tests use to talk to the `kv` guest, so
//! none of them needs `redis-cli` on the machine.
//!
//! Replies come back as the text `redis-cli` would print for the simple
//! cases: `+OK` as `+OK`, integers as `:N`, bulk strings as their contents,
//! a nil bulk string as `(nil)`, errors as `-ERR ...`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A RESP connection.
pub struct RespClient {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RespClient {
    /// Connects to `address`; every later read gives up after `read_timeout`.
    pub fn connect(address: SocketAddr, read_timeout: Duration) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(read_timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends one command (as a RESP array of bulk strings) and reads its reply.
    pub fn command(&mut self, arguments: &[&str]) -> std::io::Result<String> {
        self.stream.write_all(&encode_command(arguments))?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        let line = line.trim_end().to_owned();
        if let Some(count) = line.strip_prefix('*')
            && let Ok(count) = count.parse::<usize>()
        {
            // An array (e.g. TIME's): its elements, space-separated.
            let elements = (0..count)
                .map(|_| self.read_reply())
                .collect::<std::io::Result<Vec<String>>>()?;
            return Ok(elements.join(" "));
        }
        if let Some(length) = line.strip_prefix('$') {
            let Ok(length) = length.parse::<i64>() else {
                return Ok(line);
            };
            if length < 0 {
                return Ok("(nil)".to_owned());
            }
            let mut value = String::new();
            self.reader.read_line(&mut value)?;
            return Ok(value.trim_end().to_owned());
        }
        Ok(line)
    }
}

/// A command as a RESP array of bulk strings.
pub fn encode_command(arguments: &[&str]) -> Vec<u8> {
    let mut request = format!("*{}\r\n", arguments.len());
    for argument in arguments {
        request.push_str(&format!("${}\r\n{argument}\r\n", argument.len()));
    }
    request.into_bytes()
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let encoded = encode_command(&["SET", "k", "value"]);

        assert_eq!(encoded, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n");
    }

    #[test]
    fn replies_read_as_redis_cli_prints_them() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 64];
            for reply in [&b":7\r\n"[..], b"$5\r\nhello\r\n", b"$-1\r\n"] {
                let _ = stream.read(&mut request).expect("a request");
                stream.write_all(reply).expect("reply");
            }
        });
        let mut client = RespClient::connect(address, Duration::from_secs(5)).expect("connect");

        let integer = client.command(&["INCR", "n"]).expect("INCR");
        let bulk = client.command(&["GET", "k"]).expect("GET");
        let nil = client.command(&["GET", "missing"]).expect("GET");

        server.join().expect("server");
        assert_eq!(integer, ":7");
        assert_eq!(bulk, "hello");
        assert_eq!(nil, "(nil)");
    }
}
