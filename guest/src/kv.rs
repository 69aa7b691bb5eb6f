//! The `kv` workload: a Redis-protocol key-value store on the guest's
//! network interface (smoltcp over virtio-net), all in ring 3.
//!
//! The heap is the work area. vCPU 0 serves; other vCPUs idle. Sockets
//! are made as connections come: [`BACKLOG`] always listen, up to
//! [`MAX_SOCKETS`] in all, and closed ones beyond the backlog are freed. The loop
//! polls the stack, moves bytes between sockets and connections, and yields
//! to the VMM (one exit; the VMM waits there for the next frame) when
//! nothing happened. Time is the TSC, which a checkpoint carries over.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use understudy_guest_abi::{BootInfo, PORT_EXIT, PORT_YIELD, STATE_RUNNING};
use understudy_guest_kv::{Connection, Store};

use crate::heap::ReportingHeap;
use crate::net::NetDevice;
use crate::{Status, port_out, rdtsc};

#[global_allocator]
static HEAP: ReportingHeap = ReportingHeap::empty();

/// Sockets kept listening at all times: the listen backlog. A client that
/// closes many connections and opens as many again at once (as
/// redis-benchmark does between tests) finds them while the old ones are
/// still closing.
const BACKLOG: usize = 64;
/// Most sockets (connections plus the backlog).
const MAX_SOCKETS: usize = 320;
/// Receive buffer of each socket.
const SOCKET_RX: usize = 8 * 1024;
/// Transmit buffer of each socket.
const SOCKET_TX: usize = 16 * 1024;
/// Exit code when there is no network device.
const EXIT_NO_NETWORK: u32 = 4;

struct Client {
    handle: SocketHandle,
    connection: Connection,
}

/// Milliseconds of guest time from the TSC.
fn now(tsc_khz: u64) -> Instant {
    Instant::from_micros(tsc_micros(tsc_khz) as i64)
}

/// Microseconds of the TSC at `tsc_khz`.
fn tsc_micros(tsc_khz: u64) -> u64 {
    (u128::from(rdtsc()) * 1000 / u128::from(tsc_khz.max(1))) as u64
}

/// The TSC frequency, for the store's clock (a plain function).
static TSC_KHZ: AtomicU64 = AtomicU64::new(1);

/// The store's clock (`TIME`): microseconds of the TSC. A COLO secondary's
/// copy reads another value than the primary's: its reply diverges.
fn store_clock() -> u64 {
    tsc_micros(TSC_KHZ.load(Ordering::Relaxed))
}

pub(crate) fn serve(boot: &BootInfo, status: &Status) -> ! {
    // SAFETY: the work area [WORK_AREA_GPA, +wss) is identity-mapped guest
    // memory that only this workload uses, and this is the only init.
    unsafe { HEAP.init(boot.wss_bytes) };
    let Some(mut device) = NetDevice::probe() else {
        port_out(PORT_EXIT, EXIT_NO_NETWORK);
        crate::idle(status);
    };
    let mac = device.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = rdtsc() ^ boot.seed;
    let tsc_khz = boot.tsc_khz;
    let mut iface = Interface::new(config, &mut device, now(tsc_khz));
    let [a, b, c, d] = boot.net_ipv4;
    iface.update_ip_addrs(|addresses| {
        // One address: the list has room for it.
        let _ = addresses.push(IpCidr::new(
            Ipv4Address::new(a, b, c, d).into(),
            boot.net_prefix_len as u8,
        ));
    });
    let port = boot.kv_port as u16;
    let mut sockets = SocketSet::new(Vec::new());
    let mut clients: Vec<Client> = Vec::new();
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    let mut store = Store::with_clock(store_clock);
    status.set_state(STATE_RUNNING);
    loop {
        let timestamp = now(tsc_khz);
        device.begin_poll();
        let polled = iface.poll(timestamp, &mut device, &mut sockets);
        let mut worked = false;
        let mut listening = 0;
        clients.retain_mut(|client| {
            let socket = sockets.get_mut::<tcp::Socket>(client.handle);
            if !socket.is_open() {
                client.connection.reset();
                if listening >= BACKLOG {
                    // Enough are listening: give this one's memory back.
                    sockets.remove(client.handle);
                    return false;
                }
                // Listening on a valid port cannot fail for a closed socket.
                let _ = socket.listen(port);
            }
            if socket.state() == tcp::State::Listen {
                listening += 1;
            } else {
                worked |= serve_client(socket, &mut client.connection, &mut store);
            }
            true
        });
        while listening < BACKLOG && clients.len() < MAX_SOCKETS {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; SOCKET_RX]),
                tcp::SocketBuffer::new(vec![0; SOCKET_TX]),
            );
            // As above: a fresh socket listens on any valid port.
            let _ = socket.listen(port);
            clients.push(Client {
                handle: sockets.add(socket),
                connection: Connection::new(),
            });
            listening += 1;
            worked = true;
        }
        status.set_kv_progress(store.commands(), store.len() as u64);
        if worked || polled == smoltcp::iface::PollResult::SocketStateChanged || device.received() {
            continue;
        }
        match iface.poll_delay(timestamp, &sockets) {
            Some(delay) if delay == Duration::ZERO => continue,
            _ => port_out(PORT_YIELD, 0),
        }
    }
}

/// Moves bytes for one connected socket; returns whether anything happened.
fn serve_client(socket: &mut tcp::Socket, connection: &mut Connection, store: &mut Store) -> bool {
    let mut worked = false;
    if socket.can_recv() {
        let received = socket.recv(|bytes| {
            connection.receive(bytes, store);
            (bytes.len(), bytes.len())
        });
        worked |= received.is_ok_and(|count| count > 0);
    }
    if !connection.output.is_empty()
        && socket.can_send()
        && let Ok(sent) = socket.send_slice(&connection.output)
    {
        connection.output.drain(..sent);
        worked |= sent > 0;
    }
    let peer_done = socket.state() == tcp::State::CloseWait;
    if connection.output.is_empty() && (connection.closing() || peer_done) {
        socket.close();
    }
    worked
}
