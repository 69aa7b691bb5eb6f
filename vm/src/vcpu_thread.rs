//! The vCPU side of a VM: each vCPU's thread, running `KVM_RUN` and the
//! exits it handles (port I/O, MMIO, the guest's yield/panic/exit ports),
//! and the run/pause/stop control it shares with [`crate::vm::Vm`] (see
//! that module for how pausing works).

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

use kvm_ioctls::VcpuExit;
use understudy_guest_abi::{
    MESSAGE_LEN, PORT_EXIT, PORT_PANIC, PORT_YIELD, VcpuStatus, status_gpa,
};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::bus::{Bus, BusAction, BusDevice};
use crate::log_limited;
use crate::memory::{self, GuestMemory};
use crate::vcpu::Vcpu;
use crate::virtio_net::VirtioNet;
use crate::vm::{VmError, VmEvent};

/// How long a yielding guest (its `HLT`) waits before it is run again.
const YIELD_NAP: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunRequest {
    Run,
    Pause,
    Stop,
}

/// Run/pause/stop requests shared with the vCPU threads.
pub(crate) struct Control {
    pub(crate) state: Mutex<ControlState>,
    pub(crate) changed: Condvar,
}

pub(crate) struct ControlState {
    pub(crate) requested: RunRequest,
    /// vCPU threads currently parked (not in `KVM_RUN`).
    pub(crate) parked: u32,
}

impl Control {
    pub(crate) fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().expect("vCPU control lock poisoned")
    }

    /// Parks the calling vCPU thread while it should not run. Returns false on stop.
    pub(crate) fn wait_until_running(&self, slot: &VcpuSlot) -> bool {
        let mut state = self.lock();
        loop {
            match state.requested {
                RunRequest::Stop => return false,
                RunRequest::Run if !slot.stopped.load(Ordering::Acquire) => {
                    // A pauser sets the flag only after changing `requested` under
                    // this lock, so clearing it here cannot lose a kick.
                    slot.set_immediate_exit(false);
                    return true;
                }
                _ => {
                    state.parked += 1;
                    self.changed.notify_all();
                    state = self
                        .changed
                        .wait(state)
                        .expect("vCPU control lock poisoned");
                    state.parked -= 1;
                }
            }
        }
    }

    /// Sleeps up to `duration`, waking early if the VM is paused or stopped.
    pub(crate) fn nap(&self, duration: Duration) {
        let state = self.lock();
        if state.requested == RunRequest::Run {
            let _ = self.changed.wait_timeout(state, duration);
        }
    }
}

/// One vCPU as the VM and its thread share it.
pub(crate) struct VcpuSlot {
    pub(crate) vcpu: Mutex<Vcpu>,
    /// `kvm_run.immediate_exit` of this vCPU (set once the thread starts).
    pub(crate) immediate_exit: AtomicPtr<u8>,
    /// The guest stopped on this vCPU (exit, panic or failure); it stays parked.
    pub(crate) stopped: AtomicBool,
}

impl VcpuSlot {
    pub(crate) fn set_immediate_exit(&self, value: bool) {
        let flag = self.immediate_exit.load(Ordering::Acquire);
        if !flag.is_null() {
            // SAFETY: the pointer is to `immediate_exit` inside the vCPU's mmap'd
            // kvm_run, which lives as long as the VcpuFd owned by this slot. KVM
            // reads the byte on entry to KVM_RUN; a racing plain byte store is
            // what KVM's API documents for this flag.
            unsafe { flag.write_volatile(u8::from(value)) };
        }
    }
}

/// The ports of the guest's paravirtual interface (yield, panic, exit).
pub(crate) struct GuestControlPorts;

impl BusDevice for GuestControlPorts {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) -> BusAction {
        let mut value = [0u8; 4];
        let len = data.len().min(4);
        value[..len].copy_from_slice(&data[..len]);
        match u16::try_from(offset).map_or(0, |offset| PORT_YIELD.wrapping_add(offset)) {
            PORT_YIELD => BusAction::Yield,
            PORT_PANIC => BusAction::Panic,
            PORT_EXIT => BusAction::Exit(u32::from_le_bytes(value)),
            _ => BusAction::Continue,
        }
    }
}

/// The kick signal's handler: it only has to exist, so `KVM_RUN` returns `EINTR`.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

pub(crate) fn install_kick_handler() -> Result<(), VmError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|source| VmError::Signal("install", source));
    });
    result
}

/// Everything a vCPU thread needs.
pub(crate) struct VcpuThread {
    pub(crate) slot: Arc<VcpuSlot>,
    pub(crate) control: Arc<Control>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) net: Option<Arc<VirtioNet>>,
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) events: Sender<VmEvent>,
}

impl VcpuThread {
    pub(crate) fn run(self) {
        let index = {
            let mut vcpu = self.slot.vcpu.lock().expect("vCPU lock poisoned");
            let run = vcpu.fd_mut().get_kvm_run();
            self.slot
                .immediate_exit
                .store(&raw mut run.immediate_exit, Ordering::Release);
            vcpu.index()
        };
        while self.control.wait_until_running(&self.slot) {
            let action = {
                let mut vcpu = self.slot.vcpu.lock().expect("vCPU lock poisoned");
                self.run_once(&mut vcpu)
            };
            match action {
                BusAction::Continue => {}
                BusAction::Yield => match &self.net {
                    // An idle guest with a network waits for its next frame.
                    Some(net) => net.wait_for_input(YIELD_NAP),
                    None => self.control.nap(YIELD_NAP),
                },
                BusAction::Exit(code) => self.stop(VmEvent::GuestExited { vcpu: index, code }),
                BusAction::Panic => {
                    let message = self.panic_message(index);
                    tracing::error!(vcpu = index, %message, "guest panicked");
                    self.stop(VmEvent::GuestPanicked {
                        vcpu: index,
                        message,
                    });
                }
            }
        }
    }

    pub(crate) fn stop(&self, event: VmEvent) {
        self.slot.stopped.store(true, Ordering::Release);
        // The receiver may be gone when the VMM is shutting down; nothing to do then.
        let _ = self.events.send(event);
    }

    pub(crate) fn panic_message(&self, index: u32) -> String {
        match memory::read_value::<VcpuStatus>(&self.memory, status_gpa(index)) {
            Ok(status) => {
                let len = status
                    .message
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(MESSAGE_LEN);
                String::from_utf8_lossy(&status.message[..len]).into_owned()
            }
            Err(error) => format!("(status slot unreadable: {error})"),
        }
    }

    /// Enters the guest once and handles the exit.
    pub(crate) fn run_once(&self, vcpu: &mut Vcpu) -> BusAction {
        let index = vcpu.index();
        let exit = match vcpu.fd_mut().run() {
            Ok(exit) => exit,
            Err(error) if matches!(error.errno(), libc::EINTR | libc::EAGAIN) => {
                return BusAction::Continue;
            }
            Err(error) => return self.failed(vcpu, format!("KVM_RUN failed: {error}")),
        };
        match exit {
            VcpuExit::IoOut(port, data) => match self.pio.write(u64::from(port), data) {
                Some(action) => action,
                None => {
                    log_limited!(warn, vcpu = index, port, "guest wrote to an unclaimed port");
                    BusAction::Continue
                }
            },
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    log_limited!(warn, vcpu = index, port, "guest read an unclaimed port");
                }
                BusAction::Continue
            }
            VcpuExit::MmioWrite(address, data) => match self.mmio.write(address, data) {
                Some(action) => action,
                None => {
                    log_limited!(warn, vcpu = index, address, "guest wrote unclaimed MMIO");
                    BusAction::Continue
                }
            },
            VcpuExit::MmioRead(address, data) => {
                if !self.mmio.read(address, data) {
                    log_limited!(warn, vcpu = index, address, "guest read unclaimed MMIO");
                }
                BusAction::Continue
            }
            VcpuExit::Hlt => BusAction::Yield,
            VcpuExit::Intr => BusAction::Continue,
            other => {
                let reason = format!("{other:?}");
                self.failed(vcpu, reason)
            }
        }
    }

    pub(crate) fn failed(&self, vcpu: &mut Vcpu, what: String) -> BusAction {
        let index = vcpu.index();
        let registers = match vcpu.capture() {
            Ok(state) => format!("{state:?}"),
            Err(error) => format!("(registers unreadable: {error})"),
        };
        let reason = format!("{what}; {registers}");
        tracing::error!(vcpu = index, %reason, "vCPU stopped");
        self.stop(VmEvent::VcpuFailed {
            vcpu: index,
            reason,
        });
        BusAction::Continue
    }
}
