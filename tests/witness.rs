//! The witness client against a real etcd (Debian's etcd-server): the
//! test-and-set that decides who may run a VM alone.

use understudy_checkpoint::witness::{OwnerState, Record, Witness, WitnessError};
use understudy_lab::etcd::Etcd;

fn etcd() -> Etcd {
    Etcd::start_on_free_ports("127.0.0.1").unwrap_or_else(|error| panic!("{error:#}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn record(owner: u64, state: OwnerState, generation: u64) -> Record {
    Record {
        vm_id: 7,
        owner,
        state,
        generation,
    }
}

#[test]
fn only_one_of_two_sides_wins_the_test_and_set() {
    // Arrange: a pair in sync at some revision.
    let server = etcd();
    let witness = Witness::new(vec![server.url.clone()]);
    assert!(
        witness
            .create(record(1, OwnerState::Solo, 1))
            .expect("create")
    );
    let solo = witness.read(7).expect("read").expect("a record");
    assert!(
        witness
            .replace(solo.revision, record(1, OwnerState::InSync, 2))
            .expect("in sync")
    );
    let in_sync = witness.read(7).expect("read").expect("a record");

    // Act: both sides try to go alone from the same revision.
    let secondary_won = witness
        .replace(in_sync.revision, record(2, OwnerState::Solo, 3))
        .expect("the secondary's try");
    let primary_won = witness
        .replace(in_sync.revision, record(1, OwnerState::Solo, 3))
        .expect("the primary's try");

    // Assert
    assert!(secondary_won);
    assert!(!primary_won);
    let now = witness.read(7).expect("read").expect("a record");
    assert_eq!(now.record, record(2, OwnerState::Solo, 3));
}

#[test]
fn a_second_create_does_not_overwrite() {
    let server = etcd();
    let witness = Witness::new(vec![server.url.clone()]);
    assert!(
        witness
            .create(record(1, OwnerState::Solo, 1))
            .expect("create")
    );

    let again = witness
        .create(record(9, OwnerState::Solo, 1))
        .expect("create");

    assert!(!again);
    assert_eq!(
        witness
            .read(7)
            .expect("read")
            .expect("a record")
            .record
            .owner,
        1
    );
}

#[test]
fn a_dead_endpoint_is_skipped_and_a_dead_cluster_reported() {
    let mut server = etcd();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let witness = Witness::new(vec![dead, server.url.clone()]);
    assert!(
        witness
            .read(7)
            .expect("the live endpoint answers")
            .is_none()
    );

    server.kill();
    let read = witness.read(7);

    assert!(matches!(read, Err(WitnessError::Unreachable { .. })));
}
