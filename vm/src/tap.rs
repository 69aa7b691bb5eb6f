//! A tap device: the host side of a guest network interface. Frames the
//! guest sends are written to it and appear on the host interface; frames
//! routed to that interface are read from it. Non-blocking, one Ethernet
//! frame per read or write, no packet-information prefix.
//!
//! The virtio-net device moves frames between its queues and a `Tap`; on
//! failover the secondary opens a tap of its own with the same guest behind
//! it. Reads and writes take `&self`: one thread may read while others write.

use std::ffi::CStr;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Largest frame read: Ethernet MTU plus header, with room for VLAN tags.
pub const MAX_FRAME: usize = 1522;

/// A tap that cannot be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (needs the tun module and CAP_NET_ADMIN)")]
    Open(#[source] std::io::Error),
    /// The kernel refused to create or attach the interface.
    #[error("cannot create tap interface '{name}'")]
    Create {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing a frame failed.
    #[error("tap '{name}' I/O failed")]
    Io {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::BadName(name.to_owned()));
        }
        let path = c"/dev/net/tun";
        // SAFETY: `path` is a NUL-terminated string that outlives the call;
        // the flags ask for a new descriptor we own.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else; the File
        // closes it.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte.cast_signed();
        }
        request.ifr_ifru.ifru_flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI)
            .expect("tap flags fit a short");
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `request` is,
        // and the descriptor is a tun device.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) } < 0 {
            return Err(TapError::Create {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the kernel wrote a NUL-terminated name into ifr_name.
        let actual = unsafe { CStr::from_ptr(request.ifr_name.as_ptr()) };
        Ok(Self {
            file,
            name: actual.to_string_lossy().into_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buffer` (at least [`MAX_FRAME`] bytes), or
    /// returns `None` when none is waiting.
    pub fn read_frame(&self, buffer: &mut [u8]) -> Result<Option<usize>, TapError> {
        match (&self.file).read(buffer) {
            Ok(length) => Ok(Some(length)),
            Err(error) if error.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(source) => Err(TapError::Io {
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> Result<(), TapError> {
        (&self.file)
            .write_all(frame)
            .map_err(|source| TapError::Io {
                name: self.name.clone(),
                source,
            })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_an_interface_name_are_refused() {
        assert!(matches!(
            Tap::open("a-name-far-too-long"),
            Err(TapError::BadName(_))
        ));
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
    }
}
