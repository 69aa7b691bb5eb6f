//! A KVM virtual machine running the built-in guest: memory slots with dirty
//! logging, one thread per vCPU, pause/resume, and state capture/restore.
//!
//! # vCPU threads and pausing
//!
//! Each vCPU runs `KVM_RUN` on its own thread. The guest runs in ring 3 and
//! does not exit on its own, so [`Vm::pause`] sets the requested state to
//! "paused", sets each vCPU's `immediate_exit` flag and kicks its thread with
//! a real-time signal; `KVM_RUN` returns `EINTR`, the thread sees the request
//! and parks. `pause` returns once every thread is parked, so the caller may
//! then read vCPU state and memory at an instruction boundary.

use std::sync::atomic::{AtomicBool, AtomicPtr};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use understudy_guest_abi::{
    BOOT_INFO_GPA, BootInfo, PORT_YIELD, VIRTIO_NET_MMIO_GPA, VIRTIO_NET_MMIO_SIZE, VcpuStatus,
    status_gpa,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootError};
use crate::bus::Bus;
use crate::dirty::{DirtyLogError, DirtySet, DirtyTracker};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::state::VmState;
use crate::tap::Tap;
use crate::vcpu::{self, Vcpu, VcpuError};
use crate::vcpu_thread::{
    Control, ControlState, GuestControlPorts, RunRequest, VcpuSlot, VcpuThread,
    install_kick_handler, kick_signal,
};
use crate::virtio_net::{DiscardFrames, FrameSink, NetError, VirtioNet};
use crate::workload::WorkloadSpec;

/// How long [`Vm::pause`] waits for all vCPUs before it gives up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of VM set-up and control.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you root?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{operation} failed")]
    Kvm {
        /// The operation.
        operation: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory set-up or access failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot preparation failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Harvesting the dirty set failed.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// A state does not fit this VM.
    #[error("the saved state is for {saved}, this VM has {actual}")]
    StateMismatch {
        /// What the state describes.
        saved: String,
        /// What the VM has.
        actual: String,
    },
    /// The vCPUs did not stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// An operation needs the VM paused (or not started).
    #[error("the VM must be paused to {0}")]
    NotPaused(&'static str),
    /// The vCPU kick signal could not be installed or sent.
    #[error("failed to {0} the vCPU kick signal")]
    Signal(&'static str, #[source] vmm_sys_util::errno::Error),
    /// A vCPU thread could not be started.
    #[error("failed to start a vCPU thread")]
    SpawnThread(#[source] std::io::Error),
    /// The network device's state could not be restored.
    #[error("the network device could not be restored")]
    Net(#[from] NetError),
    /// A device can only be attached before the vCPUs first run.
    #[error("devices must be attached before the VM first runs")]
    AlreadyStarted,
}

/// Shape of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Register memory slots with `KVM_MEM_LOG_DIRTY_PAGES`. Always on for a
    /// VM that is checkpointed; off only for baseline measurements.
    pub dirty_log: bool,
}

impl VmConfig {
    /// A VM of `memory_bytes` and `vcpus`, with dirty logging on.
    pub fn new(memory_bytes: u64, vcpus: u32) -> Self {
        Self {
            memory_bytes,
            vcpus,
            dirty_log: true,
        }
    }
}

/// Something a vCPU reports that the VMM should act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest finished its workload with an exit code.
    GuestExited {
        /// The vCPU.
        vcpu: u32,
        /// The guest's exit code.
        code: u32,
    },
    /// The guest panicked.
    GuestPanicked {
        /// The vCPU.
        vcpu: u32,
        /// The panic message from its status slot.
        message: String,
    },
    /// KVM stopped the vCPU (triple fault, failed entry, internal error).
    VcpuFailed {
        /// The vCPU.
        vcpu: u32,
        /// What happened, with the registers.
        reason: String,
    },
}

impl std::fmt::Display for VmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmEvent::GuestPanicked { vcpu, message } => {
                write!(f, "guest panicked on vCPU {vcpu}: {message}")
            }
            VmEvent::VcpuFailed { vcpu, reason } => write!(f, "vCPU {vcpu} stopped: {reason}"),
            VmEvent::GuestExited { vcpu, code } => {
                write!(f, "guest exited on vCPU {vcpu} with code {code}")
            }
        }
    }
}

/// A virtual machine with the built-in guest.
pub struct Vm {
    config: VmConfig,
    tsc_khz: u32,
    vcpus: Vec<Arc<VcpuSlot>>,
    threads: Vec<JoinHandle<()>>,
    control: Arc<Control>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    net: Option<Arc<VirtioNet>>,
    dirty: DirtyTracker,
    events_sender: Sender<VmEvent>,
    events: Receiver<VmEvent>,
    fd: VmFd,
    memory: Arc<GuestMemory>,
    _kvm: Kvm,
}

impl Vm {
    /// Creates a VM with zeroed memory and vCPUs that have not been set up.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if !(1..=understudy_guest_abi::MAX_VCPUS).contains(&config.vcpus) {
            return Err(VmError::Boot(BootError::TooManyVcpus(config.vcpus)));
        }
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(|source| VmError::Kvm {
            operation: "KVM_CREATE_VM",
            source,
        })?;
        let memory = Arc::new(memory::create(config.memory_bytes)?);
        for (slot, region) in memory.iter().enumerate() {
            let slot_region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("a handful of memory slots"),
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: if config.dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes,
            // owned by `memory`, which the Vm keeps until after `fd` is closed
            // (fields drop in declaration order: `fd` before `memory`).
            unsafe { fd.set_user_memory_region(slot_region) }.map_err(|source| VmError::Kvm {
                operation: "KVM_SET_USER_MEMORY_REGION",
                source,
            })?;
        }
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                operation: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let mut vcpus = Vec::new();
        let mut msr_indices = Vec::new();
        for index in 0..config.vcpus {
            let mut vcpu = Vcpu::new(&fd, index, &cpuid, msr_indices.clone())?;
            if index == 0 {
                msr_indices = vcpu::saveable_msrs(&kvm, &vcpu)?;
                vcpu.set_msr_indices(msr_indices.clone());
            }
            vcpus.push(Arc::new(VcpuSlot {
                vcpu: Mutex::new(vcpu),
                immediate_exit: AtomicPtr::new(std::ptr::null_mut()),
                stopped: AtomicBool::new(false),
            }));
        }
        let tsc_khz = vcpus[0].vcpu.lock().expect("fresh lock").tsc_khz()?;
        let mut pio = Bus::new();
        pio.insert(u64::from(PORT_YIELD), 3, Arc::new(GuestControlPorts))
            .expect("an empty bus has room for the guest control ports");
        let (events_sender, events) = channel();
        Ok(Self {
            config,
            tsc_khz,
            dirty: DirtyTracker::new(&memory),
            vcpus,
            threads: Vec::new(),
            control: Arc::new(Control {
                state: Mutex::new(ControlState {
                    requested: RunRequest::Pause,
                    parked: 0,
                }),
                changed: Condvar::new(),
            }),
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            net: None,
            events_sender,
            events,
            fd,
            memory,
            _kvm: kvm,
        })
    }

    /// Creates a VM and prepares the built-in guest to run `workload`.
    pub fn boot(config: VmConfig, workload: &WorkloadSpec) -> Result<Self, VmError> {
        let vm = Self::new(config)?;
        let image = boot::prepare(&vm.memory, config.vcpus, vm.tsc_khz, workload)?;
        for slot in &vm.vcpus {
            slot.vcpu
                .lock()
                .expect("fresh lock")
                .configure_boot(&image)?;
        }
        Ok(vm)
    }

    /// The VM's shape.
    pub fn config(&self) -> VmConfig {
        self.config
    }

    /// The vCPUs' TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Events from the vCPUs (guest exit, panic, failure).
    pub fn events(&self) -> &Receiver<VmEvent> {
        &self.events
    }

    /// Puts a virtio-net device on the MMIO bus at `VIRTIO_NET_MMIO_GPA`.
    /// Only before the first [`Vm::resume`].
    pub fn attach_net(&mut self, net: Arc<VirtioNet>) -> Result<(), VmError> {
        if !self.threads.is_empty() || self.net.is_some() {
            return Err(VmError::AlreadyStarted);
        }
        let bus = Arc::get_mut(&mut self.mmio).ok_or(VmError::AlreadyStarted)?;
        bus.insert(VIRTIO_NET_MMIO_GPA, VIRTIO_NET_MMIO_SIZE, net.clone())
            .expect("the MMIO bus holds only the network device");
        self.net = Some(net);
        Ok(())
    }

    /// Gives the built-in guest its virtio-net interface, with the MAC its
    /// boot page names: frames come from `input` (none: nothing arrives) and
    /// the guest's go to `output`; `observer`, if any, hears of every frame
    /// delivered. Only before the first [`Vm::resume`].
    pub fn attach_guest_net(
        &mut self,
        input: Option<Arc<Tap>>,
        output: Arc<dyn FrameSink>,
        observer: Option<Arc<dyn FrameSink>>,
    ) -> Result<Arc<VirtioNet>, VmError> {
        let mac = self.boot_info()?.mac();
        let mut device = VirtioNet::new(self.memory.clone(), mac, input, output);
        if let Some(observer) = observer {
            device = device.with_delivery_observer(observer);
        }
        let device = Arc::new(device);
        self.attach_net(device.clone())?;
        Ok(device)
    }

    /// Gives the built-in guest its virtio-net interface on `tap`: frames
    /// come from it and the guest's go to it. Without a tap the interface
    /// is unplugged (nothing arrives, what the guest sends is dropped).
    pub fn attach_guest_tap(&mut self, tap: Option<Arc<Tap>>) -> Result<Arc<VirtioNet>, VmError> {
        let output: Arc<dyn FrameSink> = match &tap {
            Some(tap) => tap.clone(),
            None => Arc::new(DiscardFrames),
        };
        self.attach_guest_net(tap, output, None)
    }

    /// The network device, if one is attached.
    pub fn net(&self) -> Option<&Arc<VirtioNet>> {
        self.net.as_ref()
    }

    /// Starts the vCPU threads (the first call) or lets them run again.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.threads.is_empty() {
            for slot in &self.vcpus {
                let thread = VcpuThread {
                    slot: slot.clone(),
                    control: self.control.clone(),
                    pio: self.pio.clone(),
                    mmio: self.mmio.clone(),
                    net: self.net.clone(),
                    memory: self.memory.clone(),
                    events: self.events_sender.clone(),
                };
                let index = slot.vcpu.lock().expect("vCPU lock poisoned").index();
                let handle = std::thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn(move || thread.run())
                    .map_err(VmError::SpawnThread)?;
                self.threads.push(handle);
            }
        }
        self.control.lock().requested = RunRequest::Run;
        self.control.changed.notify_all();
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary; returns how long it took.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let started = Instant::now();
        self.control.lock().requested = RunRequest::Pause;
        self.control.changed.notify_all();
        self.kick_all()?;
        let mut state = self.control.lock();
        let mut last_kick = Instant::now();
        while (state.parked as usize) < self.threads.len() {
            if started.elapsed() > PAUSE_TIMEOUT {
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
            }
            let (next, _) = self
                .control
                .changed
                .wait_timeout(state, Duration::from_millis(10))
                .expect("vCPU control lock poisoned");
            state = next;
            if last_kick.elapsed() > Duration::from_millis(10) {
                // A thread between its check and KVM_RUN saw immediate_exit;
                // one that somehow missed both gets kicked again.
                drop(state);
                self.kick_all()?;
                last_kick = Instant::now();
                state = self.control.lock();
            }
        }
        Ok(started.elapsed())
    }

    fn kick_all(&self) -> Result<(), VmError> {
        for slot in &self.vcpus {
            slot.set_immediate_exit(true);
        }
        for thread in &self.threads {
            thread
                .kill(kick_signal())
                .map_err(|source| VmError::Signal("send", source))?;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        let state = self.control.lock();
        state.requested != RunRequest::Run && state.parked as usize == self.threads.len()
    }

    /// Captures the state of every vCPU and of the VM. The VM must be paused.
    pub fn capture_state(&self) -> Result<VmState, VmError> {
        if !self.is_paused() {
            return Err(VmError::NotPaused("capture its state"));
        }
        let clock = self.fd.get_clock().map_err(|source| VmError::Kvm {
            operation: "KVM_GET_CLOCK",
            source,
        })?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|slot| slot.vcpu.lock().expect("vCPU lock poisoned").capture())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            memory_bytes: self.config.memory_bytes,
            clock,
            vcpus,
            net: self.net.as_ref().map(|net| net.save()),
        })
    }

    /// Restores a captured state into this VM, whose memory the caller has
    /// already filled. The VM must not be running.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        if !self.is_paused() {
            return Err(VmError::NotPaused("restore a state"));
        }
        let actual = self.config;
        if state.memory_bytes != actual.memory_bytes || state.vcpus.len() != actual.vcpus as usize {
            return Err(VmError::StateMismatch {
                saved: format!(
                    "{} bytes and {} vCPUs",
                    state.memory_bytes,
                    state.vcpus.len()
                ),
                actual: format!("{} bytes and {} vCPUs", actual.memory_bytes, actual.vcpus),
            });
        }
        match (&state.net, &self.net) {
            (Some(saved), Some(net)) => net.restore(saved)?,
            (None, None) => {}
            (saved, _) => {
                return Err(VmError::StateMismatch {
                    saved: format!(
                        "a VM with{} a network device",
                        if saved.is_some() { "" } else { "out" }
                    ),
                    actual: format!("one with{}", if self.net.is_some() { "" } else { "out" }),
                });
            }
        }
        let mut clock = state.clock;
        // Restore the clock as it was: no adjustment for the time spent saved.
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(|source| VmError::Kvm {
            operation: "KVM_SET_CLOCK",
            source,
        })?;
        for (slot, vcpu_state) in self.vcpus.iter().zip(&state.vcpus) {
            slot.vcpu
                .lock()
                .expect("vCPU lock poisoned")
                .restore(vcpu_state)?;
        }
        Ok(())
    }

    /// Reads and clears the dirty set (KVM's log OR the VMM's own writes).
    pub fn harvest_dirty(&self) -> Result<DirtySet, VmError> {
        Ok(self.dirty.harvest(&self.fd, &self.memory)?)
    }

    /// Counts every page written from now on (by the guest or the VMM)
    /// until [`Vm::forget_mark`], whoever harvests the dirty log: the
    /// memory as it is now is an image kept elsewhere (a migration's
    /// source, a switchover's old primary), and a later copy there needs
    /// only the pages changed since.
    pub fn mark_image(&self) -> Result<(), VmError> {
        Ok(self.dirty.mark(&self.fd, &self.memory)?)
    }

    /// [`Vm::mark_image`] with the memory as of the last harvest as the
    /// image (a checkpoint's, taken while paused): writes since count as
    /// changes, so nothing written after the checkpoint is missed.
    pub fn mark_image_as_of_last_harvest(&self) {
        self.dirty.mark_as_of_last_harvest(&self.memory);
    }

    /// Every page written since [`Vm::mark_image`] (with a fresh harvest
    /// included), or `None` without a mark.
    pub fn dirty_since_mark(&self) -> Result<Option<DirtySet>, VmError> {
        let latest = self.harvest_dirty()?;
        // The harvest joined the mark's count; the caller's next harvest
        // must still see these pages.
        self.put_back_dirty(&latest)?;
        Ok(self.dirty.since_mark(&self.memory))
    }

    /// Stops counting pages since a mark.
    pub fn forget_mark(&self) {
        self.dirty.forget_mark();
    }

    /// Gives back a harvested dirty set whose consumer failed.
    pub fn put_back_dirty(&self, set: &DirtySet) -> Result<(), VmError> {
        Ok(self.dirty.put_back(set)?)
    }

    /// The boot page the guest was started with.
    pub fn boot_info(&self) -> Result<BootInfo, VmError> {
        Ok(memory::read_value(&self.memory, BOOT_INFO_GPA)?)
    }

    /// vCPU `index`'s status slot, read from guest memory (live, no pause).
    pub fn vcpu_status(&self, index: u32) -> Result<VcpuStatus, VmError> {
        Ok(memory::read_value(&self.memory, status_gpa(index))?)
    }

    /// Stops and joins the vCPU threads.
    pub fn shutdown(&mut self) {
        self.control.lock().requested = RunRequest::Stop;
        self.control.changed.notify_all();
        if let Err(error) = self.kick_all() {
            tracing::warn!(%error, "could not kick vCPUs for shutdown");
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
