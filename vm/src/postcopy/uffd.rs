//! The userfaultfd(2) calls post-copy needs, on the kernel's stable ABI
//! (`include/uapi/linux/userfaultfd.h`): create, register a range in
//! missing mode, read fault messages, and resolve a fault with a copy, a
//! zero page or a wake. Written here rather than taken from the
//! `userfaultfd` crate, whose bindings are generated at build time with
//! libclang: the project builds with a Rust toolchain and a C linker only.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{_IOC_READ, _IOC_WRITE, ioctl_expr, ioctl_with_mut_ref};

/// `UFFDIO`, the ioctl type.
const UFFDIO: u32 = 0xAA;
/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: the event byte, then (for a page fault) flags and
/// the faulting address; 32 bytes in all.
#[repr(C)]
#[derive(Default)]
struct Message {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    feature: u64,
}

fn request<T>(nr: u32) -> libc::c_ulong {
    let size = u32::try_from(std::mem::size_of::<T>()).expect("ioctl arguments are small");
    ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, nr, size)
}

fn request_read<T>(nr: u32) -> libc::c_ulong {
    let size = u32::try_from(std::mem::size_of::<T>()).expect("ioctl arguments are small");
    ioctl_expr(_IOC_READ, UFFDIO, nr, size)
}

/// What resolving a fault found.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The page was installed now.
    Installed,
    /// It was already there (another install won the race).
    AlreadyPresent,
}

/// A userfaultfd.
pub struct Userfaultfd(OwnedFd);

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Userfaultfd {
    /// A non-blocking userfaultfd that also takes kernel-mode faults (KVM's
    /// accesses to guest memory are kernel-mode).
    pub fn new() -> std::io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes flags and returns a new descriptor
        // or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::other("a bad descriptor"))?;
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
        let uffd = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = Api {
            api: UFFD_API,
            ..Api::default()
        };
        uffd.ioctl(request::<Api>(0x3F), &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: libc::c_ulong, argument: &mut T) -> std::io::Result<()> {
        // SAFETY: `argument` is the repr(C) structure `request` was built
        // for (its size is part of the request number), valid for the call.
        let result = unsafe { ioctl_with_mut_ref(self, request, argument) };
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `[start, start + len)` for missing-page faults.
    pub fn register(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut register = Register {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(request::<Register>(0x00), &mut register)
    }

    /// Unregisters `[start, start + len)`: its missing pages fill with
    /// zeroes on access from now on, like any anonymous memory.
    pub fn unregister(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut range = Range {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(request_read::<Range>(0x01), &mut range)
    }

    /// Installs `len` bytes from `source` at `destination` (page aligned,
    /// registered) and wakes the threads waiting on it.
    ///
    /// # Safety
    /// `source` must be valid for reading `len` bytes.
    pub unsafe fn copy(
        &self,
        source: *const u8,
        destination: usize,
        len: usize,
    ) -> std::io::Result<Resolved> {
        let mut copy = Copy {
            dst: destination as u64,
            src: source as u64,
            len: len as u64,
            mode: 0,
            copy: 0,
        };
        self.resolve(request::<Copy>(0x03), &mut copy, destination, len)
    }

    /// Installs zero pages at `destination` (registered, page aligned) and
    /// wakes the threads waiting on them.
    pub fn zeropage(&self, destination: usize, len: usize) -> std::io::Result<Resolved> {
        let mut zeropage = Zeropage {
            range: Range {
                start: destination as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        self.resolve(request::<Zeropage>(0x04), &mut zeropage, destination, len)
    }

    fn resolve<T>(
        &self,
        request: libc::c_ulong,
        argument: &mut T,
        destination: usize,
        len: usize,
    ) -> std::io::Result<Resolved> {
        match self.ioctl(request, argument) {
            Ok(()) => Ok(Resolved::Installed),
            Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {
                // Already present: make sure whoever faulted on it runs.
                self.wake(destination, len)?;
                Ok(Resolved::AlreadyPresent)
            }
            Err(error) => Err(error),
        }
    }

    /// Wakes the threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut range = Range {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(request_read::<Range>(0x02), &mut range)
    }

    /// The next page fault's address, if one is queued (`None`: nothing
    /// to read now). Other events are refused (none are enabled).
    pub fn next_fault(&self) -> std::io::Result<Option<usize>> {
        let mut message = Message::default();
        let size = std::mem::size_of::<Message>();
        // SAFETY: `message` is a writable buffer of `size` bytes.
        let read = unsafe { libc::read(self.as_raw_fd(), (&raw mut message).cast(), size) };
        if read < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(error);
        }
        if usize::try_from(read).ok() != Some(size) {
            return Err(std::io::Error::other("a truncated userfaultfd message"));
        }
        if message.event != EVENT_PAGEFAULT {
            return Err(std::io::Error::other(format!(
                "an unexpected userfaultfd event {:#x}",
                message.event
            )));
        }
        usize::try_from(message.address)
            .map(Some)
            .map_err(|_| std::io::Error::other("a fault address beyond this host's addresses"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<Message>(), 32);
        assert_eq!(std::mem::size_of::<Copy>(), 40);
        assert_eq!(std::mem::size_of::<Zeropage>(), 32);
    }

    #[test]
    fn request_numbers_are_the_kernels() {
        // From <linux/userfaultfd.h> on x86_64.
        assert_eq!(request::<Api>(0x3F), 0xc018_aa3f);
        assert_eq!(request::<Register>(0x00), 0xc020_aa00);
        assert_eq!(request::<Copy>(0x03), 0xc028_aa03);
        assert_eq!(request::<Zeropage>(0x04), 0xc020_aa04);
        assert_eq!(request_read::<Range>(0x02), 0x8010_aa02);
    }
}
