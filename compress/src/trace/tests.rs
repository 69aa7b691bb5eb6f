//! Tests of the trace format.

use super::*;
use crate::trace::synthetic::{SyntheticTrace, generate};

fn info() -> TraceInfo {
    TraceInfo {
        source: TraceSource::Synthetic,
        description: "unit test".to_owned(),
        interval_ns: 25_000_000,
        created_unix_s: 1,
    }
}

fn write_trace(path: &Path, batches: &[PageBatch]) {
    let mut writer = TraceWriter::create(path, &info()).expect("create");
    for (index, batch) in batches.iter().enumerate() {
        writer
            .write_epoch(index as u64 * 1000, 10, batch)
            .expect("write epoch");
    }
    writer.finish().expect("finish");
}

fn batches() -> Vec<PageBatch> {
    generate(&SyntheticTrace {
        pages: 64,
        epochs: 3,
        seed: 1,
    })
}

#[test]
fn written_trace_reads_back() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("t.trace");
    let batches = batches();
    write_trace(&path, &batches);

    let (read_info, epochs) = load(&path).expect("load");

    assert_eq!(read_info, info());
    assert_eq!(
        epochs.iter().map(|e| e.pages.clone()).collect::<Vec<_>>(),
        batches
    );
    assert_eq!(epochs[2].time_ns, 2000);
}

#[test]
fn unfinished_trace_does_not_exist_under_its_name() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("t.trace");
    let mut writer = TraceWriter::create(&path, &info()).expect("create");
    writer.write_epoch(0, 0, &batches()[0]).expect("write");
    drop(writer);

    assert!(!path.exists());
}

#[test]
fn truncated_trace_is_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("t.trace");
    write_trace(&path, &batches());
    let length = std::fs::metadata(&path).expect("metadata").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(length - END_LEN as u64 - 5).expect("truncate");

    let result = load(&path);

    assert!(matches!(
        result,
        Err(TraceError::Truncated { epochs: 2, .. })
    ));
}

#[test]
fn flipped_content_bit_is_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("t.trace");
    write_trace(&path, &batches());
    let mut bytes = std::fs::read(&path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&path, bytes).expect("write");

    let result = load(&path);

    assert!(matches!(result, Err(TraceError::Corrupted { .. })));
}

#[test]
fn unordered_pages_are_refused_by_the_writer() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut writer =
        TraceWriter::create(&directory.path().join("t.trace"), &info()).expect("create");
    let mut batch = PageBatch::new();
    batch.push(2, &[0; PAGE_BYTES]);
    batch.push(1, &[0; PAGE_BYTES]);

    assert!(matches!(
        writer.write_epoch(0, 0, &batch),
        Err(TraceError::Unordered)
    ));
}
