//! The few system calls std does not wrap: opening a TUN queue (`TUNSETIFF`, `TUNSETPERSIST`),
//! non-blocking mode and `poll`, and batched datagram I/O (`recvmmsg`, `sendmmsg`). Every
//! `unsafe` block of the crate is here, each a single call whose pointers point into buffers
//! that outlive it.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const TUNSETIFF: libc::Ioctl = 0x4004_54ca;
const TUNSETPERSIST: libc::Ioctl = 0x4004_54cb;
pub const IFF_TUN: libc::c_short = 0x0001;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The interface index of `name` in this namespace, if there is such a device.
pub fn if_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// A queue of the TUN device `name` (made, not persistent, when there is none: see
/// [`set_persist`]).
pub fn tun_open(name: &str, flags: libc::c_short) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is no interface name")));
    }
    // SAFETY: a NUL-terminated path; the returned descriptor is owned from here on.
    let fd = check(unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) })?;
    Ok(fd)
}

/// Whether the device of `fd` outlives its last queue (`ip tuntap add` makes persistent ones).
pub fn set_persist(fd: BorrowedFd<'_>, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(persist)) }).map(drop)
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller holds.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Waits until `fd` is readable (or has an error to report).
pub fn wait_readable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one pollfd that lives across the call.
        match check(unsafe { libc::poll(&mut pfd, 1, -1) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

/// Headers for up to `n` datagrams at a time, reused from call to call.
pub struct Batch {
    iov: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_in>,
    headers: Vec<libc::mmsghdr>,
}

/// A received datagram: its length (more than the buffer when it was cut), and its sender.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub truncated: bool,
    pub from: SocketAddrV4,
}

fn zeroed_name() -> libc::sockaddr_in {
    libc::sockaddr_in { sin_family: 0, sin_port: 0, sin_addr: libc::in_addr { s_addr: 0 }, sin_zero: [0; 8] }
}

fn empty_header() -> libc::mmsghdr {
    libc::mmsghdr {
        msg_hdr: libc::msghdr {
            msg_name: std::ptr::null_mut(),
            msg_namelen: 0,
            msg_iov: std::ptr::null_mut(),
            msg_iovlen: 0,
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        },
        msg_len: 0,
    }
}

impl Batch {
    pub fn new(n: usize) -> Batch {
        Batch {
            iov: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            names: vec![zeroed_name(); n],
            headers: (0..n).map(|_| empty_header()).collect(),
        }
    }

    /// Receives into `buffers` (as many datagrams as there are buffers, at most the batch's
    /// size), blocking for the first; what each is goes into `out`. How many.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, buffers: &mut [Vec<u8>], out: &mut [Received]) -> io::Result<usize> {
        let n = buffers.len().min(self.headers.len()).min(out.len());
        for (i, buffer) in buffers.iter_mut().enumerate().take(n) {
            self.iov[i] = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
            self.names[i] = zeroed_name();
            let h = &mut self.headers[i];
            *h = empty_header();
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        let got = loop {
            // SAFETY: `n` headers, each pointing at its own iovec (into a buffer of the length
            // given) and sockaddr_in, all alive for the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_WAITFORONE | libc::MSG_TRUNC,
                    std::ptr::null_mut(),
                )
            };
            match check(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other? as usize,
            }
        };
        for i in 0..got {
            let h = &self.headers[i];
            let name = &self.names[i];
            out[i] = Received {
                len: h.msg_len as usize,
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || h.msg_len as usize > buffers[i].len(),
                from: SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
                    u16::from_be(name.sin_port),
                ),
            };
        }
        Ok(got)
    }

    /// Sends each of `packets` (bytes, destination) as one datagram, as many as the kernel
    /// takes in one call; how many went.
    pub fn send(&mut self, fd: BorrowedFd<'_>, packets: &[(&[u8], SocketAddrV4)]) -> io::Result<usize> {
        let n = packets.len().min(self.headers.len());
        for (i, (bytes, to)) in packets.iter().take(n).enumerate() {
            self.iov[i] = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
            self.names[i] = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: to.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
                sin_zero: [0; 8],
            };
            let h = &mut self.headers[i];
            *h = empty_header();
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        loop {
            // SAFETY: `n` headers pointing at iovecs over the callers' slices (only read) and
            // at sockaddr_in, all alive for the call.
            let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), self.headers.as_mut_ptr(), n as libc::c_uint, 0) };
            match check(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(|n| n as usize),
            }
        }
    }
}
