//! Guest progress as the VMM sees it: the status slots of all vCPUs, read from
//! shared memory without stopping the guest, and rates between two samples.

use std::time::Instant;

use understudy_guest_abi::{PAGE_SIZE, STATE_PANICKED, STATE_RUNNING, VcpuStatus};

use crate::vm::{Vm, VmError};

/// A reading of every vCPU's status slot.
#[derive(Clone, Debug)]
pub struct ProgressSample {
    /// When the slots were read.
    pub at: Instant,
    /// One status per vCPU.
    pub vcpus: Vec<VcpuStatus>,
}

impl ProgressSample {
    /// Reads all status slots (live; a pair of fields may be one step apart).
    pub fn read(vm: &Vm) -> Result<Self, VmError> {
        let vcpus = (0..vm.config().vcpus)
            .map(|index| vm.vcpu_status(index))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            at: Instant::now(),
            vcpus,
        })
    }

    /// Whether every vCPU has started its workload.
    pub fn all_running(&self) -> bool {
        self.vcpus
            .iter()
            .all(|status| status.state == STATE_RUNNING)
    }

    /// Whether any vCPU panicked.
    pub fn any_panicked(&self) -> bool {
        self.vcpus
            .iter()
            .any(|status| status.state == STATE_PANICKED)
    }

    /// memtouch: pages written by all vCPUs.
    pub fn pages_written(&self) -> u64 {
        self.vcpus.iter().map(|status| status.pages_written).sum()
    }

    /// counter: steps taken by all vCPUs.
    pub fn counter_steps(&self) -> u64 {
        self.vcpus.iter().map(|status| status.counter).sum()
    }

    /// Heartbeats of all vCPUs (advances with any workload).
    pub fn heartbeats(&self) -> u64 {
        self.vcpus.iter().map(|status| status.heartbeat).sum()
    }

    /// Rates from `earlier` to `self`.
    pub fn rates_since(&self, earlier: &ProgressSample) -> ProgressRates {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let per_second = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
        ProgressRates {
            dirtied_bytes_per_sec: per_second(self.pages_written(), earlier.pages_written())
                * PAGE_SIZE as f64,
            counter_steps_per_sec: per_second(self.counter_steps(), earlier.counter_steps()),
            heartbeats_per_sec: per_second(self.heartbeats(), earlier.heartbeats()),
        }
    }
}

/// Progress per second between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProgressRates {
    /// memtouch: bytes of pages written per second (whole pages).
    pub dirtied_bytes_per_sec: f64,
    /// counter: steps per second.
    pub counter_steps_per_sec: f64,
    /// Heartbeats per second.
    pub heartbeats_per_sec: f64,
}
