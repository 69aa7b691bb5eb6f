//! The dirty set holds every page the guest or the VMM wrote.

mod common;

use std::time::Duration;

use common::require_kvm;
use understudy_guest_abi::{PAGE_SIZE, WORK_AREA_GPA, WRITE_LOG_GPA};
use understudy_vm::dirty::DirtySet;
use understudy_vm::memory;
use understudy_vm::{Vm, VmConfig};

const WSS: u64 = 16 << 20;
/// Over 1 GiB, so guest memory spans two KVM slots.
const GUEST_MEMORY: u64 = 1536 << 20;

fn memtouch_vm(pattern: &str) -> Vm {
    let workload = format!("memtouch:log,pattern={pattern},wss=16M,rate=100MB/s")
        .parse()
        .expect("valid workload");
    let mut vm = Vm::boot(VmConfig::new(GUEST_MEMORY, 2), &workload).expect("boot");
    vm.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(100));
    vm
}

/// Work-area pages the guest's own write log says it wrote.
fn guest_logged_pages(vm: &Vm) -> Vec<u64> {
    let mut log = vec![0u8; (WSS / PAGE_SIZE / 8) as usize];
    memory::read(vm.memory(), WRITE_LOG_GPA, &mut log).expect("read write log");
    (0..WSS / PAGE_SIZE)
        .filter(|page| log[(page / 8) as usize] & (1 << (page % 8)) != 0)
        .map(|page| WORK_AREA_GPA + page * PAGE_SIZE)
        .collect()
}

/// Pauses, clears the guest's write log and the dirty set: a clean start.
fn start_window(vm: &mut Vm) {
    vm.pause().expect("pause");
    memory::write(
        vm.memory(),
        WRITE_LOG_GPA,
        &vec![0u8; (WSS / PAGE_SIZE / 8) as usize],
    )
    .expect("clear log");
    vm.harvest_dirty().expect("harvest");
}

fn missed(logged: &[u64], harvested: &DirtySet) -> Vec<u64> {
    logged
        .iter()
        .copied()
        .filter(|&gpa| !harvested.contains(gpa))
        .collect()
}

#[test]
fn the_dirty_log_holds_every_page_the_guest_wrote() {
    if !require_kvm() {
        return;
    }
    // Arrange.
    let mut vm = memtouch_vm("random");
    start_window(&mut vm);

    // Act: let the guest write for a while, then pause and harvest.
    vm.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(300));
    vm.pause().expect("pause");
    let logged = guest_logged_pages(&vm);
    let harvested = vm.harvest_dirty().expect("harvest");

    // Assert.
    assert!(
        logged.len() > 1000,
        "the guest wrote only {} pages",
        logged.len()
    );
    assert_eq!(
        missed(&logged, &harvested),
        Vec::<u64>::new(),
        "pages the guest wrote are missing from the dirty set"
    );
}

#[test]
fn the_dirty_set_holds_pages_the_vmm_wrote() {
    if !require_kvm() {
        return;
    }
    // Arrange: a paused guest with a clean dirty set; the pages span both memory slots.
    let mut vm = memtouch_vm("sparse");
    start_window(&mut vm);
    let vmm_pages = [
        WORK_AREA_GPA + 3 * PAGE_SIZE,
        (1 << 30) + 5 * PAGE_SIZE,
        GUEST_MEMORY - PAGE_SIZE,
    ];

    // Act: the VMM writes (as a device would) while the guest cannot.
    for gpa in vmm_pages {
        memory::write(vm.memory(), gpa + 100, b"device data").expect("write");
    }
    let harvested = vm.harvest_dirty().expect("harvest");

    // Assert.
    assert_eq!(missed(&vmm_pages, &harvested), Vec::<u64>::new());
}

#[test]
fn a_harvest_put_back_is_reported_again() {
    if !require_kvm() {
        return;
    }
    // Arrange: a harvest with guest writes in it, as if its consumer then failed.
    let mut vm = memtouch_vm("seq");
    start_window(&mut vm);
    vm.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().expect("pause");
    let failed = vm.harvest_dirty().expect("harvest");

    // Act.
    vm.put_back_dirty(&failed).expect("put back");
    let next = vm.harvest_dirty().expect("harvest");

    // Assert: nothing that KVM cleared for the failed harvest is lost.
    let lost: Vec<u64> = failed
        .page_addresses()
        .filter(|&gpa| !next.contains(gpa))
        .collect();
    assert!(
        failed.count() > 100,
        "the guest dirtied only {} pages",
        failed.count()
    );
    assert_eq!(lost, Vec::<u64>::new());
}

#[test]
fn pages_written_since_a_mark_are_counted_whoever_harvests() {
    if !require_kvm() {
        return;
    }
    // Arrange: a memtouch guest, its memory marked as an image.
    let mut vm = memtouch_vm("random");
    start_window(&mut vm);
    vm.mark_image().expect("mark");
    vm.resume().expect("resume");

    // Act: the guest writes while others harvest (as a checkpoint loop or
    // the statistics would), and the VMM writes one page itself.
    std::thread::sleep(Duration::from_millis(100));
    let first = vm.harvest_dirty().expect("harvest");
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().expect("pause");
    let vmm_page = GUEST_MEMORY - PAGE_SIZE;
    memory::write(vm.memory(), vmm_page, &[7u8; 16]).expect("a VMM write");
    let logged = guest_logged_pages(&vm);
    let since = vm
        .dirty_since_mark()
        .expect("read the mark")
        .expect("a mark");

    // Assert: every page the guest logged, the VMM's page, and what the
    // first harvest took, all counted against the image; forgetting the
    // mark forgets them.
    assert!(
        missed(&logged, &since).is_empty(),
        "{} logged pages missed",
        missed(&logged, &since).len()
    );
    assert!(since.contains(vmm_page));
    assert!(first.page_addresses().all(|gpa| since.contains(gpa)));
    vm.forget_mark();
    assert!(vm.dirty_since_mark().expect("read").is_none());
}
