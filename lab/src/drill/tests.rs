//! Tests of the drill's accounting, with a real socket that resets.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

use super::*;

/// A RESP server on loopback that answers `INCR` with 1, 2, 3… and
/// `SET` with `+OK`, and resets the connection (RST, via SO_LINGER 0)
/// after `replies` replies.
fn resetting_server(replies: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer: TcpStream = stream;
        let mut counter = 0;
        for _ in 0..replies {
            // *N, then $len/arg pairs.
            let mut header = String::new();
            reader.read_line(&mut header).expect("request header");
            let count: usize = header.trim()[1..].parse().expect("array length");
            let mut command = String::new();
            for argument in 0..count * 2 {
                let mut line = String::new();
                reader.read_line(&mut line).expect("request line");
                if argument == 1 {
                    command = line.trim().to_owned();
                }
            }
            let reply = if command == "INCR" {
                counter += 1;
                format!(":{counter}\r\n")
            } else {
                "+OK\r\n".to_owned()
            };
            writer.write_all(reply.as_bytes()).expect("reply");
        }
        set_linger_zero(&writer);
        drop(writer);
    });
    (address, server)
}

fn set_linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger value.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("a small size"),
        )
    };
    assert_eq!(result, 0, "setsockopt SO_LINGER");
}

#[test]
fn a_reset_during_a_round_fails_the_round_and_is_counted() {
    let (address, server) = resetting_server(5);
    let client = RespClient::connect(address, Duration::from_secs(10)).expect("connect");
    let never = AtomicBool::new(false);

    let log = Writer::new(client).run(&never);
    let result = log.result(Instant::now());
    let summary = DrillSummary::of(std::slice::from_ref(&result));

    server.join().expect("server");
    assert_eq!(result.resets, 1);
    assert_eq!(result.incr_acked, 3);
    assert!(!result.passed());
    assert_eq!(summary.failed, 1);
    assert_eq!(summary.resets, 1);
}

#[test]
fn a_clean_round_passes() {
    let result = RoundResult {
        verified: true,
        incr_acked: 10,
        survivor: Some(Survivor::Secondary),
        ..RoundResult::default()
    };

    assert!(result.passed());
}

#[test]
fn a_round_where_the_other_copy_sent_output_fails() {
    let result = RoundResult {
        verified: true,
        survivor: Some(Survivor::Secondary),
        loser_frames: 4,
        ..RoundResult::default()
    };

    let summary = DrillSummary::of(std::slice::from_ref(&result));

    assert!(!result.passed());
    assert_eq!(summary.two_copies, 1);
}

#[test]
fn an_unverified_round_fails() {
    let result = RoundResult::default();

    assert!(!result.passed());
}

#[test]
fn the_summary_takes_the_median_and_worst_outage() {
    let round = |ms| RoundResult {
        outage: Duration::from_millis(ms),
        verified: true,
        survivor: Some(Survivor::Primary),
        ..RoundResult::default()
    };

    let summary = DrillSummary::of(&[round(30), round(5), round(200)]);

    assert_eq!(summary.outage_median, Duration::from_millis(30));
    assert_eq!(summary.outage_worst, Duration::from_millis(200));
    assert_eq!(summary.failed, 0);
}

#[test]
fn failure_points_stay_within_bounds() {
    let mut rng = Rng(42);

    let point = rng.between(Duration::from_millis(500), Duration::from_secs(2));

    assert!((Duration::from_millis(500)..Duration::from_secs(2)).contains(&point));
}
