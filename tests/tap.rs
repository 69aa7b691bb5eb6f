//! A tap device carries frames both ways between the VMM and a real host
//! interface, inside a network namespace of the test's own.

use std::time::{Duration, Instant};

use understudy_vm::tap::{MAX_FRAME, Tap};

/// An Ethernet frame with the local experimental EtherType 0x88b5 and a
/// recognisable payload.
fn frame(source_last_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6]; // Broadcast.
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, source_last_byte]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(payload);
    frame.resize(frame.len().max(60), 0);
    frame
}

/// Brings interface `name` up, through a socket of the current namespace.
fn set_up(name: &str) {
    // SAFETY: a plain socket call; the descriptor is closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(socket >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte.cast_signed();
    }
    request.ifr_ifru.ifru_flags =
        libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING).expect("flags fit a short");
    // SAFETY: SIOCSIFFLAGS reads one ifreq, which `request` is.
    let result = unsafe { libc::ioctl(socket, libc::SIOCSIFFLAGS, &request) };
    let error = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(socket) };
    assert_eq!(result, 0, "SIOCSIFFLAGS: {error}");
}

/// A raw packet socket on interface `index`, all EtherTypes, non-blocking.
fn packet_socket(index: u32) -> i32 {
    let all_protocols = u16::try_from(libc::ETH_P_ALL)
        .expect("an EtherType")
        .to_be();
    let all = i32::from(all_protocols);
    // SAFETY: a plain socket call; the caller closes the descriptor.
    let socket =
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, all) };
    assert!(
        socket >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = u16::try_from(libc::AF_PACKET).expect("an address family");
    address.sll_protocol = all_protocols;
    address.sll_ifindex = index.cast_signed();
    // SAFETY: `address` is a valid sockaddr_ll of the size given.
    let bound = unsafe {
        libc::bind(
            socket,
            (&address as *const libc::sockaddr_ll).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
                .expect("a small address"),
        )
    };
    assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
    socket
}

/// Waits up to a second for `wanted` from `receive`, skipping other frames
/// (the kernel sends its own, such as IPv6 router solicitations).
fn wait_for(wanted: &[u8], mut receive: impl FnMut(&mut [u8]) -> Option<usize>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buffer = vec![0u8; MAX_FRAME + 64];
    while Instant::now() < deadline {
        match receive(&mut buffer) {
            Some(length) if &buffer[..length] == wanted => return true,
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    false
}

#[test]
fn frames_cross_a_tap_in_both_directions() {
    // The namespace is the test thread's own, so that the interface and its
    // traffic never touch the host's network.
    let outcome = std::thread::spawn(|| {
        // SAFETY: unshare affects only this (new) thread's network namespace.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            unshared,
            0,
            "this test needs root (CAP_SYS_ADMIN) for a network namespace: {}",
            std::io::Error::last_os_error()
        );
        // Arrange: a tap, up, and a packet socket on its host side.
        let tap = Tap::open("ustap0").expect("create the tap");
        set_up(tap.name());
        let name = std::ffi::CString::new(tap.name()).expect("no NUL in the name");
        // SAFETY: `name` is NUL-terminated and lives across the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "the tap has no interface index");
        let socket = packet_socket(index);
        let from_vmm = frame(1, b"from the guest");
        let from_host = frame(2, b"to the guest");

        // Act: a frame out through the tap, one in through the interface.
        tap.write_frame(&from_vmm).expect("write to the tap");
        let seen_by_host = wait_for(&from_vmm, |buffer| {
            // SAFETY: `buffer` is writable for its whole length.
            let length = unsafe { libc::recv(socket, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            usize::try_from(length).ok().filter(|length| *length > 0)
        });
        // SAFETY: `from_host` is readable for its whole length; the socket
        // is bound to the interface, so no address is needed.
        let sent = unsafe { libc::send(socket, from_host.as_ptr().cast(), from_host.len(), 0) };
        let seen_by_vmm = wait_for(&from_host, |buffer| {
            tap.read_frame(buffer).expect("read from the tap")
        });
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(socket) };
        (seen_by_host, sent, seen_by_vmm, from_host.len())
    })
    .join()
    .expect("the test thread");

    // Assert: each frame arrived whole on the other side.
    let (seen_by_host, sent, seen_by_vmm, length) = outcome;
    assert!(
        seen_by_host,
        "the host interface never saw the frame written to the tap"
    );
    assert_eq!(usize::try_from(sent).ok(), Some(length));
    assert!(
        seen_by_vmm,
        "the tap never delivered the frame sent on the host interface"
    );
}
