//! Traces captured from real processes and from the built-in guest hold what
//! their source changed, and the codec benchmark runs on them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use common::{event, json_lines, require_kvm, understudy};
use understudy_compress::PAGE_BYTES;
use understudy_compress::trace::{self, TraceSource};

/// A program that mutates memory in a known way: it fills 64 pages with
/// 0x11, prints where they are, waits for "go", then changes byte 100 of
/// every fifth page (1, 6, 11, ...) and, a little later, byte 200 of every
/// tenth (1, 11, 21, ...), prints "done", and waits for its input to close.
const PAGE_WRITER: &str = r#"
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
    const size_t pages = 64;
    unsigned char *buffer = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buffer == MAP_FAILED) return 1;
    memset(buffer, 0x11, pages * 4096);
    printf("%lu %lu\n", (unsigned long)buffer, (unsigned long)pages);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 2;
    for (size_t i = 1; i < pages; i += 5) {
        buffer[i * 4096 + 100] = (unsigned char)i;
        usleep(2000);
    }
    for (size_t i = 1; i < pages; i += 10) {
        buffer[i * 4096 + 200] = (unsigned char)(i + 1);
        usleep(2000);
    }
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {}
    return 0;
}
"#;

fn compile_page_writer(directory: &Path) -> std::path::PathBuf {
    let source = directory.join("page_writer.c");
    let binary = directory.join("page_writer");
    std::fs::write(&source, PAGE_WRITER).expect("write the C source");
    let status = Command::new("cc")
        .arg("-O1")
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .status()
        .expect("cc runs (gcc is installed by .ci/run)");
    assert!(status.success(), "cc failed to build the page writer");
    binary
}

fn read_line(reader: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read a line");
    line
}

/// Reads the capture's JSON lines until `count` more epochs were reported.
fn wait_for_epochs(reader: &mut BufReader<ChildStdout>, count: usize) {
    let mut seen = 0;
    while seen < count {
        let line = read_line(reader);
        assert!(!line.is_empty(), "the capture ended early");
        if line.contains("\"event\":\"epoch\"") {
            seen += 1;
        }
    }
}

fn stop(child: &mut Child) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGINT) };
}

#[test]
fn process_trace_holds_exactly_the_pages_the_process_changed() {
    // Arrange: the page writer, stopped at its "go" prompt.
    let directory = tempfile::tempdir().expect("tempdir");
    let writer_binary = compile_page_writer(directory.path());
    let mut writer = Command::new(&writer_binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the page writer");
    let mut writer_out = BufReader::new(writer.stdout.take().expect("stdout"));
    let header = read_line(&mut writer_out);
    let mut fields = header
        .split_whitespace()
        .map(|f| f.parse::<u64>().expect("number"));
    let (address, pages) = (
        fields.next().expect("address"),
        fields.next().expect("pages"),
    );
    let first_page = address / PAGE_BYTES as u64;
    let trace_path = directory.path().join("writer.trace");

    // Act: capture it while it changes its pages.
    let mut capture = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args([
            "trace",
            "capture",
            "--interval",
            "10ms",
            "--duration",
            "60s",
            "--json",
            "-o",
        ])
        .arg(&trace_path)
        .args(["--pid", &writer.id().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the capture");
    let mut capture_out = BufReader::new(capture.stdout.take().expect("stdout"));
    wait_for_epochs(&mut capture_out, 2);
    let mut writer_in = writer.stdin.take().expect("stdin");
    writer_in.write_all(b"go\n").expect("tell the writer to go");
    writer_in.flush().expect("flush");
    assert_eq!(read_line(&mut writer_out), "done\n");
    wait_for_epochs(&mut capture_out, 3);
    stop(&mut capture);
    let status = capture.wait().expect("capture exits");
    drop(writer_in);
    writer.wait().expect("the page writer exits");

    // Assert: epoch 0 holds all 64 pages as filled; later epochs hold
    // exactly the changed pages, last seen with their final contents.
    assert!(status.success(), "capture failed: {status}");
    let (info, epochs) = trace::load(&trace_path).expect("the trace reads back");
    assert_eq!(info.source, TraceSource::Process);
    let in_buffer = |number: u64| (first_page..first_page + pages).contains(&number);
    let initial: Vec<u64> = epochs[0]
        .pages
        .iter()
        .filter(|(number, page)| in_buffer(*number) && page.iter().all(|b| *b == 0x11))
        .map(|(number, _)| number)
        .collect();
    assert_eq!(initial.len() as u64, pages);
    let mut last_seen = BTreeMap::new();
    for epoch in &epochs[1..] {
        for (number, page) in epoch.pages.iter() {
            if in_buffer(number) {
                last_seen.insert(number - first_page, *page);
            }
        }
    }
    let changed: BTreeSet<u64> = last_seen.keys().copied().collect();
    let expected: BTreeSet<u64> = (1..pages).step_by(5).collect();
    assert_eq!(changed, expected);
    let mut page_one = [0x11u8; PAGE_BYTES];
    page_one[100] = 1;
    page_one[200] = 2;
    assert_eq!(last_seen[&1], page_one);
    let mut page_six = [0x11u8; PAGE_BYTES];
    page_six[100] = 6;
    assert_eq!(last_seen[&6], page_six);
}

#[test]
fn guest_trace_feeds_the_codec_benchmark() {
    if !require_kvm() {
        return;
    }
    // Arrange: a guest rewriting 8 MiB sparsely, traced for 12 epochs once
    // it has written its whole working set (so that epoch 0 holds every
    // page later epochs change, whatever the machine's speed). The capture
    // ends after the epochs, with a generous time limit: a busy machine
    // takes longer, it does not produce fewer epochs.
    let directory = tempfile::tempdir().expect("tempdir");
    let trace_path = directory.path().join("guest.trace");
    let trace_arg = trace_path.to_str().expect("utf-8 path");
    let captured = understudy(&[
        "trace",
        "capture",
        "--guest",
        "--memory",
        "64M",
        "--workload",
        "memtouch:rate=100MB/s,wss=8M,pattern=sparse",
        "--interval",
        "25ms",
        "--epochs",
        "12",
        "--duration",
        "120s",
        "--warmup",
        "300ms",
        "--json",
        "-o",
        trace_arg,
    ]);
    assert!(
        captured.status.success(),
        "capture failed: {}",
        String::from_utf8_lossy(&captured.stderr)
    );

    // Act: compare two codecs on it.
    let plot = directory.path().join("plot.svg");
    let benched = understudy(&[
        "bench",
        "compress",
        trace_arg,
        "--codec",
        "raw",
        "--codec",
        "delta",
        "--json",
        "--plot",
        plot.to_str().expect("utf-8 path"),
    ]);

    // Assert: the trace has later epochs of dirty pages, and delta (sparse
    // writes against the previous versions) beats raw by far.
    assert!(
        benched.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&benched.stderr)
    );
    let summary = event(&json_lines(&captured), "captured");
    assert_eq!(summary["epochs"].as_u64(), Some(12));
    let report: serde_json::Value =
        serde_json::from_slice(&benched.stdout).expect("the report is JSON");
    let ratio = |codec: &str| {
        report["results"]
            .as_array()
            .expect("results")
            .iter()
            .find(|result| result["codec"] == codec)
            .and_then(|result| result["ratio"].as_f64())
            .expect("a ratio")
    };
    assert!(
        report["traces"][0]["mean_pages_per_epoch"]
            .as_f64()
            .expect("pages")
            > 10.0
    );
    assert!((ratio("raw") - 1.0).abs() < 0.01);
    assert!(ratio("delta") > 5.0, "delta ratio {}", ratio("delta"));
    assert!(
        std::fs::read_to_string(&plot)
            .expect("plot")
            .contains("<svg")
    );
}
