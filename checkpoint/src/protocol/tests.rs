//! Tests of the protocol: encoding, framing, the receiver.

use xxhash_rust::xxh3::xxh3_64;

use super::*;

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        purpose: Purpose::Replicate,
        memory_bytes: 256 << 20,
        vcpus: 2,
        guest_image_hash: 7,
        vm_id: 9,
        owner: 1,
        generation: 0,
        store_pages: 0,
        heartbeat_interval: std::time::Duration::from_millis(10),
        heartbeat_timeout: std::time::Duration::from_millis(50),
        checkpoint_interval: std::time::Duration::from_millis(25),
        base_image: 0,
    }
}

fn end() -> EpochEnd {
    EpochEnd {
        pages: 3,
        memory_hash: Some(11),
    }
}

/// Encodes messages as a sender would, and reads them back.
fn wire(messages: &[(u64, Message)]) -> Vec<Envelope> {
    let mut sender = Sender::new();
    let mut bytes = Vec::new();
    for (epoch, message) in messages {
        sender
            .send(&mut bytes, *epoch, message)
            .expect("write to a Vec");
    }
    let mut reader = bytes.as_slice();
    messages
        .iter()
        .map(|_| read_message(&mut reader).expect("valid message"))
        .collect()
}

fn one_epoch(epoch: u64) -> Vec<(u64, Message)> {
    vec![
        (epoch, Message::EpochBegin(0)),
        (epoch, Message::Pages(vec![1, 2, 3])),
        (epoch, Message::State(vec![4, 5])),
        (epoch, Message::EpochEnd(end())),
    ]
}

#[test]
fn an_epoch_of_another_generation_is_refused() {
    let mut receiver = Receiver::new();
    let mut sender = Sender::new();
    let greeting = Hello {
        generation: 5,
        ..hello()
    };
    let mut accept = |message: Message| {
        let bytes = sender.encode(0, &message).expect("encodes");
        receiver.accept(read_message(&mut bytes.as_slice()).expect("reads"))
    };
    accept(Message::Hello(greeting)).expect("the greeting");

    let stale = accept(Message::EpochBegin(4));

    assert!(matches!(
        stale,
        Err(ProtocolError::StaleGeneration { hello: 5, epoch: 4 })
    ));
}

#[test]
fn every_message_round_trips() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::Welcome),
        (0, Message::Refuse("memory size differs".to_owned())),
        (0, Message::EpochBegin(0)),
        (0, Message::Pages(vec![9; 100])),
        (0, Message::State(vec![8; 10])),
        (0, Message::EpochEnd(end())),
        (
            0,
            Message::EpochEnd(EpochEnd {
                pages: 0,
                memory_hash: None,
            }),
        ),
        (0, Message::Ack),
        (0, Message::Heartbeat(123)),
        (0, Message::Goodbye("bye".to_owned())),
        (0, Message::Sync(7)),
        (0, Message::Synced(7)),
        (3, Message::Input(vec![0xff; 60])),
        (3, Message::Output(vec![0xee; 60])),
        (4, Message::SecondaryOutput(vec![0xdd; 60])),
        (1, Message::PageRequest(12_345)),
        (0, Message::Discard(vec![3, 4, 1 << 40])),
        (1, Message::PagesHeld(vec![0b1011, 0, 0, 0, 0, 0, 0, 0])),
        (1, Message::PageHashes(vec![u64::MAX, 0, 7])),
        (
            0,
            Message::Handover(Handover {
                kept_image: 0xfeed,
                protect_to: "10.0.0.1:7000".to_owned(),
            }),
        ),
        (0, Message::TookOver),
        (0, Message::BaseImage(42)),
    ];

    let received: Vec<Message> = wire(&messages).into_iter().map(|e| e.message).collect();

    assert_eq!(
        received,
        messages.into_iter().map(|(_, m)| m).collect::<Vec<_>>()
    );
}

#[test]
fn a_whole_session_is_accepted_and_commits_each_epoch() {
    let mut messages = vec![(0, Message::Hello(hello()))];
    messages.extend(one_epoch(0));
    messages.push((0, Message::Heartbeat(5)));
    messages.extend(one_epoch(1));
    let mut receiver = Receiver::new();

    let commits: Vec<u64> = wire(&messages)
        .into_iter()
        .map(|envelope| receiver.accept(envelope).expect("in order"))
        .filter_map(|action| match action {
            Action::Commit { epoch, .. } => Some(epoch),
            _ => None,
        })
        .collect();

    assert_eq!(commits, vec![0, 1]);
    assert_eq!(receiver.committed(), Some(1));
}

#[test]
fn replayed_message_is_refused() {
    let mut messages = vec![(0, Message::Hello(hello()))];
    messages.extend(one_epoch(0));
    let envelopes = wire(&messages);
    let mut receiver = Receiver::new();
    receiver.accept(envelopes[0].clone()).expect("hello");
    receiver.accept(envelopes[1].clone()).expect("begin");

    let replay = receiver.accept(envelopes[1].clone());

    assert!(matches!(
        replay,
        Err(ProtocolError::OutOfSequence {
            expected: 2,
            actual: 1
        })
    ));
}

#[test]
fn epoch_end_without_state_is_refused() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (0, Message::Pages(vec![1])),
        (0, Message::EpochEnd(end())),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    for envelope in &envelopes[..3] {
        receiver.accept(envelope.clone()).expect("in order");
    }

    let result = receiver.accept(envelopes[3].clone());

    assert!(matches!(
        result,
        Err(ProtocolError::Unexpected {
            kind: "EpochEnd",
            ..
        })
    ));
    assert_eq!(receiver.committed(), None);
}

#[test]
fn skipped_epoch_is_refused() {
    let mut messages = vec![(0, Message::Hello(hello()))];
    messages.extend(one_epoch(0));
    messages.push((2, Message::EpochBegin(0)));
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    for envelope in &envelopes[..5] {
        receiver.accept(envelope.clone()).expect("in order");
    }

    let result = receiver.accept(envelopes[5].clone());

    assert!(matches!(
        result,
        Err(ProtocolError::Unexpected { epoch: 2, .. })
    ));
}

#[test]
fn pages_from_another_epoch_are_refused() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (1, Message::Pages(vec![1])),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    receiver.accept(envelopes[0].clone()).expect("hello");
    receiver.accept(envelopes[1].clone()).expect("begin");

    let result = receiver.accept(envelopes[2].clone());

    assert!(matches!(
        result,
        Err(ProtocolError::Unexpected { kind: "Pages", .. })
    ));
}

#[test]
fn sync_is_answered_inside_an_epoch() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (0, Message::Sync(42)),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    receiver.accept(envelopes[0].clone()).expect("hello");
    receiver.accept(envelopes[1].clone()).expect("begin");

    let action = receiver.accept(envelopes[2].clone()).expect("sync");

    assert_eq!(action, Action::Sync(42));
    assert!(matches!(
        receiver.state(),
        ReceiverState::InEpoch { epoch: 0, .. }
    ));
}

#[test]
fn input_frames_are_logged_with_their_epoch_inside_an_epoch() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (1, Message::Input(vec![7; 60])),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    receiver.accept(envelopes[0].clone()).expect("hello");
    receiver.accept(envelopes[1].clone()).expect("begin");

    let action = receiver.accept(envelopes[2].clone()).expect("input");

    assert_eq!(
        action,
        Action::LogInput {
            epoch: 1,
            frame: vec![7; 60]
        }
    );
}

#[test]
fn output_before_the_state_is_refused() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (0, Message::Output(vec![1; 60])),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    receiver.accept(envelopes[0].clone()).expect("hello");
    receiver.accept(envelopes[1].clone()).expect("begin");

    let result = receiver.accept(envelopes[2].clone());

    assert!(matches!(result, Err(ProtocolError::Unexpected { .. })));
}

#[test]
fn output_after_the_state_is_staged() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (0, Message::State(vec![1])),
        (0, Message::Output(vec![2; 60])),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    for envelope in &envelopes[..3] {
        receiver.accept(envelope.clone()).expect("in order");
    }

    let action = receiver.accept(envelopes[3].clone()).expect("output");

    assert_eq!(action, Action::StageOutput(vec![2; 60]));
}

/// `message` written alone and read back.
fn sent_and_read(message: &Message) -> Result<Envelope, ProtocolError> {
    let mut bytes = Vec::new();
    Sender::new()
        .send(&mut bytes, 0, message)
        .expect("write to a Vec");
    read_message(&mut bytes.as_slice())
}

#[test]
fn an_empty_input_frame_is_malformed() {
    let result = sent_and_read(&Message::Input(Vec::new()));

    assert!(matches!(result, Err(ProtocolError::Malformed { .. })));
}

#[test]
fn anything_before_hello_is_refused() {
    let envelopes = wire(&[(0, Message::EpochBegin(0))]);

    let result = Receiver::new().accept(envelopes[0].clone());

    assert!(matches!(result, Err(ProtocolError::Unexpected { .. })));
}

#[test]
fn corrupted_payload_is_refused() {
    let mut bytes = Sender::new()
        .encode(0, &Message::Pages(vec![7; 64]))
        .expect("encodes");
    bytes[HEADER_LEN + 10] ^= 1;

    let result = read_message(&mut bytes.as_slice());

    assert!(matches!(
        result,
        Err(ProtocolError::PayloadChecksum { kind: "Pages" })
    ));
}

#[test]
fn corrupted_header_is_refused() {
    let mut bytes = Sender::new().encode(3, &Message::Ack).expect("encodes");
    bytes[16] ^= 1; // The epoch.

    let result = read_message(&mut bytes.as_slice());

    assert!(matches!(result, Err(ProtocolError::HeaderChecksum)));
}

#[test]
fn truncated_message_is_an_io_error() {
    let bytes = Sender::new()
        .encode(0, &Message::Pages(vec![7; 64]))
        .expect("encodes");

    let result = read_message(&mut &bytes[..bytes.len() - 1]);

    assert!(matches!(result, Err(ProtocolError::Io(_))));
}

#[test]
fn an_oversized_payload_is_refused_before_sending() {
    let mut sender = Sender::new();

    let result = sender.header(0, &Message::Ack, MAX_PAYLOAD + 1, 0);

    assert!(matches!(result, Err(ProtocolError::PayloadTooLarge(_))));
}

#[test]
fn an_unknown_kind_is_refused() {
    let mut bytes = Sender::new().encode(0, &Message::Ack).expect("encodes");
    bytes[4] = 200;
    let checksum = xxh3_64(&bytes[..40]);
    bytes[40..48].copy_from_slice(&checksum.to_le_bytes());

    let result = read_message(&mut bytes.as_slice());

    assert!(matches!(result, Err(ProtocolError::UnknownKind(200))));
}

#[test]
fn every_kind_byte_names_its_kind() {
    let kind = MessageKind::from_byte(MessageKind::EpochEnd as u8);

    assert_eq!(kind, Some(MessageKind::EpochEnd));
    assert_eq!(MessageKind::EpochEnd.name(), "EpochEnd");
    assert_eq!(MessageKind::from_byte(0), None);
}

#[test]
fn a_long_reason_is_cut_at_a_character_boundary() {
    let reason = "é".repeat(MAX_TEXT);

    let payload = Message::Goodbye(reason).payload().into_owned();

    assert!(payload.len() <= MAX_TEXT);
    assert!(String::from_utf8(payload).is_ok());
}

#[test]
fn oversized_payload_is_refused_before_reading_it() {
    let mut bytes = Sender::new().encode(0, &Message::Ack).expect("encodes");
    bytes[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    let checksum = xxh3_64(&bytes[..40]);
    bytes[40..48].copy_from_slice(&checksum.to_le_bytes());

    let result = read_message(&mut bytes.as_slice());

    assert!(matches!(result, Err(ProtocolError::PayloadTooLarge(_))));
}

#[test]
fn not_our_protocol_is_refused() {
    let result = read_message(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n_____________________"[..]);

    assert!(matches!(result, Err(ProtocolError::BadMagic)));
}

#[test]
fn a_payload_longer_than_its_kind_allows_is_refused_from_the_header() {
    let mut sender = Sender::new();
    let bytes = sender
        .encode(0, &Message::State(vec![0; 64]))
        .expect("encodes");

    let result = read_message_within(&mut bytes.as_slice(), 16);

    assert!(matches!(result, Err(ProtocolError::PayloadTooLarge(64))));
}

#[test]
fn a_heartbeat_announcing_a_large_payload_is_refused() {
    let mut sender = Sender::new();
    let mut bytes = sender.encode(0, &Message::Heartbeat(1)).expect("encodes");
    // Rewrite the length (and the header checksum) to announce 1 MiB.
    bytes[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let checksum = xxhash_rust::xxh3::xxh3_64(&bytes[..40]);
    bytes[40..48].copy_from_slice(&checksum.to_le_bytes());

    let result = read_message(&mut bytes.as_slice());

    assert!(matches!(
        result,
        Err(ProtocolError::PayloadTooLarge(1_048_576))
    ));
}

#[test]
fn a_discard_after_the_state_is_refused() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (0, Message::State(vec![1])),
        (0, Message::Discard(vec![5])),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    for envelope in &envelopes[..3] {
        receiver.accept(envelope.clone()).expect("in order");
    }

    let result = receiver.accept(envelopes[3].clone());

    assert!(matches!(result, Err(ProtocolError::Unexpected { .. })));
}

#[test]
fn a_discard_before_the_state_is_passed_on() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (0, Message::EpochBegin(0)),
        (0, Message::Discard(vec![5, 9])),
    ];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    for envelope in &envelopes[..2] {
        receiver.accept(envelope.clone()).expect("in order");
    }

    let action = receiver.accept(envelopes[2].clone()).expect("discard");

    assert_eq!(action, Action::Discard(vec![5, 9]));
}

#[test]
fn an_empty_discard_is_malformed() {
    let result = sent_and_read(&Message::Discard(Vec::new()));

    assert!(matches!(result, Err(ProtocolError::Malformed { .. })));
}

#[test]
fn a_bitmap_of_a_partial_word_is_malformed() {
    let result = sent_and_read(&Message::PagesHeld(vec![0xff; 5]));

    assert!(matches!(result, Err(ProtocolError::Malformed { .. })));
}

#[test]
fn a_resumed_post_copy_accepts_epoch_one_first() {
    let messages = vec![(0, Message::Hello(hello())), (1, Message::EpochBegin(0))];
    let mut receiver = Receiver::new();
    let envelopes = wire(&messages);
    receiver.accept(envelopes[0].clone()).expect("hello");

    let resumed = receiver.resume_after(0);
    let action = receiver.accept(envelopes[1].clone()).expect("epoch 1");

    assert!(resumed);
    assert_eq!(action, Action::BeginEpoch(1));
}

#[test]
fn a_receiver_inside_an_epoch_cannot_be_resumed() {
    let messages = vec![(0, Message::Hello(hello())), (0, Message::EpochBegin(0))];
    let mut receiver = Receiver::new();
    for envelope in wire(&messages) {
        receiver.accept(envelope).expect("in order");
    }

    let resumed = receiver.resume_after(0);

    assert!(!resumed);
    assert_eq!(receiver.committed(), None);
}

#[test]
fn a_handover_before_any_commit_is_refused() {
    let messages = vec![
        (0, Message::Hello(hello())),
        (
            0,
            Message::Handover(Handover {
                kept_image: 0,
                protect_to: String::new(),
            }),
        ),
    ];
    let mut receiver = Receiver::new();
    let mut envelopes = wire(&messages).into_iter();
    receiver
        .accept(envelopes.next().expect("hello"))
        .expect("hello accepted");

    let result = receiver.accept(envelopes.next().expect("handover"));

    assert!(
        matches!(result, Err(ProtocolError::Unexpected { .. })),
        "{result:?}"
    );
}

#[test]
fn a_handover_after_a_commit_closes_the_receiver() {
    let mut messages = vec![(0, Message::Hello(hello()))];
    messages.extend(one_epoch(0));
    messages.push((
        0,
        Message::Handover(Handover {
            kept_image: 5,
            protect_to: String::new(),
        }),
    ));
    let mut receiver = Receiver::new();

    let last = wire(&messages)
        .into_iter()
        .map(|envelope| receiver.accept(envelope).expect("in order"))
        .last();

    assert!(matches!(
        last,
        Some(Action::Handover(Handover { kept_image: 5, .. }))
    ));
    assert_eq!(receiver.state(), ReceiverState::Closed);
}

#[test]
fn a_handover_with_an_overlong_address_is_malformed() {
    let result = sent_and_read(&Message::Handover(Handover {
        kept_image: 1,
        protect_to: "x".repeat(MAX_HANDOVER_ADDRESS + 1),
    }));

    assert!(result.is_err());
}
