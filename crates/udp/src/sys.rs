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
pub const IFF_TAP: libc::c_short = 0x0002;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::Ioctl = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_UDP_TUNNEL_GSO: libc::c_ulong = 0x80;
const TUNSETVNETHDRSZ: libc::Ioctl = 0x4004_54d8;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

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

/// SIGKILL to `pid`.
pub fn kill(pid: i32) -> io::Result<()> {
    // SAFETY: kill(2) with a plain number and signal.
    check(unsafe { libc::kill(pid, libc::SIGKILL) }).map(drop)
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

/// Lets the kernel hand over TCP packets of up to 64 KiB with a partial checksum (the queue
/// was opened with `IFF_VNET_HDR`): TSO for IPv4.
pub fn tun_offload_tso4(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4) }).map(drop)
}

/// A queue of the TAP device `name` (made when there is none, gone with its last queue) that
/// takes packets already in UDP for the kernel to cut (GSO over a UDP tunnel: Linux 6.17 and
/// later), with the 24-byte vnet header that carries the tunnel's offsets.
pub fn tap_open_tunnel_gso(name: &str) -> io::Result<OwnedFd> {
    let fd = tun_open(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    let size = crate::offload::TUNNEL_VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which lives across the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &size as *const libc::c_int) })?;
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO) })?;
    Ok(fd)
}

/// `struct ifreq` for the flag, MTU and hardware address requests.
#[repr(C)]
struct IfReqData {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

fn ifreq(name: &str, request: libc::Ioctl, set: Option<[u8; 24]>) -> io::Result<[u8; 24]> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is no interface name")));
    }
    // Any socket serves for the request (bound to no address: loopback may be down).
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut req = IfReqData { name: [0; libc::IFNAMSIZ], data: set.unwrap_or([0; 24]) };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the request reads and writes a `struct ifreq`, which `req` is laid out as.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut req as *mut IfReqData) })?;
    Ok(req.data)
}

/// Sets the device `name` up; its MAC address.
pub fn link_up(name: &str) -> io::Result<[u8; 6]> {
    let mut flags = ifreq(name, libc::SIOCGIFFLAGS, None)?;
    let up = i16::from_ne_bytes([flags[0], flags[1]]) | libc::IFF_UP as i16;
    flags[..2].copy_from_slice(&up.to_ne_bytes());
    ifreq(name, libc::SIOCSIFFLAGS, Some(flags))?;
    // A `struct sockaddr`: the family, then the address.
    let hw = ifreq(name, libc::SIOCGIFHWADDR, None)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&hw[2..8]);
    Ok(mac)
}

/// The MTU of the device `name`.
pub fn mtu(name: &str) -> io::Result<usize> {
    let data = ifreq(name, libc::SIOCGIFMTU, None)?;
    Ok(i32::from_ne_bytes([data[0], data[1], data[2], data[3]]).max(0) as usize)
}

/// The address the kernel sends from to `peer` (a route lookup: no packet goes out).
pub fn source_for(peer: SocketAddrV4) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(peer).ok()?;
    match socket.local_addr().ok()? {
        std::net::SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

/// The MTU of the route to `dst` (the device's, or the route's own): no packet goes out.
pub fn route_mtu(dst: Ipv4Addr) -> Option<usize> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(SocketAddrV4::new(dst, 9)).ok()?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: IP_MTU writes an int into `mtu`, whose size `len` gives.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0 && mtu > 0).then_some(mtu as usize)
}

/// A random number from the kernel (probe nonces).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Unpredictable enough for a nonce only a peer on the path could see anyway.
        return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_ne_bytes(b)
}

/// Writes `head` and `body` to `fd` as one packet (`writev`: the body is not copied here).
pub fn write_two(fd: BorrowedFd<'_>, head: &[u8], body: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec { iov_base: head.as_ptr() as *mut libc::c_void, iov_len: head.len() },
        libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() },
    ];
    loop {
        // SAFETY: two iovecs over the callers' slices (only read), alive across the call.
        match check(unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 2) } as libc::c_int) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// Asks the kernel to hand over datagrams of one flow joined (UDP GRO): one receive, many
/// datagrams of the size the control message gives.
pub fn udp_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::SOL_UDP, UDP_GRO, 1)
}

fn set_int(fd: BorrowedFd<'_>, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: an int option, its size given.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Socket buffers of `bytes` each way: past the system's limits when the process may
/// (`SO_RCVBUFFORCE`), else as large as they allow. A burst of joined 64 KiB datagrams
/// overflows the default receive buffer at once.
pub fn set_buffers(fd: BorrowedFd<'_>, bytes: libc::c_int) {
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        if set_int(fd, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = set_int(fd, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

fn sockaddr(to: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// Sends `bytes`, datagrams of `size` bytes back to back (the last may be shorter), to `to`
/// in one call (UDP GSO).
pub fn send_segments(fd: BorrowedFd<'_>, bytes: &[u8], size: u16, to: SocketAddrV4) -> io::Result<usize> {
    let mut name = sockaddr(to);
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = [0u64; 4];
    let mut msg = empty_header().msg_hdr;
    msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one header of `space` bytes (32 bytes are enough for a
    // u16 payload); the macros compute addresses inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
    }
    loop {
        // SAFETY: every pointer in `msg` points into locals alive across the call.
        match check(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) } as libc::c_int) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller holds.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Waits until one of `fds` is readable (or has an error to report).
pub fn wait_readable(fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut pfds = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; 2];
    let n = fds.len().min(pfds.len());
    for (p, fd) in pfds.iter_mut().zip(fds) {
        p.fd = fd.as_raw_fd();
    }
    loop {
        // SAFETY: `n` pollfds that live across the call.
        match check(unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, -1) }) {
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
    /// A control buffer per datagram (the UDP GRO segment size comes in one).
    control: Vec<[u64; 4]>,
}

/// A received datagram: its length (more than the buffer when it was cut), its sender, and
/// (UDP GRO) the size of the datagrams it joins, when it joins several.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub truncated: bool,
    pub from: SocketAddrV4,
    pub segment: Option<u16>,
}

impl Default for Received {
    fn default() -> Self {
        Received { len: 0, truncated: false, from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), segment: None }
    }
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
            control: vec![[0u64; 4]; n],
        }
    }

    /// Receives into `buffers` (as many datagrams as there are buffers, at most the batch's
    /// size) without waiting (`WouldBlock` when there is none); what each is goes into `out`.
    /// How many.
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
            h.msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 4]>() as _;
        }
        let got = loop {
            // SAFETY: `n` headers, each pointing at its own iovec (into a buffer of the length
            // given) and sockaddr_in, all alive for the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
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
            let mut segment = None;
            // SAFETY: the kernel filled `msg_controllen` bytes of this header's control buffer;
            // the macros walk headers inside it.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                        let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                        segment = u16::try_from(size).ok();
                    }
                    cmsg = libc::CMSG_NXTHDR(&h.msg_hdr, cmsg);
                }
            }
            out[i] = Received {
                len: h.msg_len as usize,
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || h.msg_len as usize > buffers[i].len(),
                from: SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
                    u16::from_be(name.sin_port),
                ),
                segment,
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
            self.names[i] = sockaddr(*to);
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
