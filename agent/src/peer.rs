//! Who is on the other end of a local TCP connection (SPEC §4.6).
//!
//! The kernel knows the owner of both ends of a loopback connection. The agent asks it over
//! `NETLINK_SOCK_DIAG` with an `inet_diag` request for the exact client socket: its 4-tuple is
//! the accepted connection's 4-tuple seen from the other side (source = our peer, destination =
//! our local address). The answer carries the uid that owns the client socket, as seen from the
//! agent's user namespace. A peer in another network namespace (a container on a bridge) has no
//! socket in ours: the lookup finds nothing, and such a peer is refused wherever `allow_uids`
//! is set.
//!
//! Cost and blocking: one request per connection, made the first time a request needs it and
//! cached for the connection's life ([`TcpPeer::uid`]). The kernel answers a single-socket
//! `inet_diag` request synchronously inside `sendmsg`, so the reply is already queued when
//! `send` returns; the socket is non-blocking and `recv` uses `MSG_DONTWAIT`, so a lookup never
//! waits on anything and runs inline on the async worker (one netlink socket for the
//! process, created on first use). The message encoding and parsing are the
//! `netlink-packet-sock-diag` crate's.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

/// Why a peer's uid could not be found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// No TCP socket with that 4-tuple in this network namespace (the peer is in another
    /// namespace, or it is gone).
    #[error(
        "no local socket owns {peer} -> {local} (peer in another network namespace, or closed)"
    )]
    NotFound {
        /// The peer's address.
        peer: SocketAddr,
        /// Our address.
        local: SocketAddr,
    },
    /// The netlink socket failed.
    #[error("NETLINK_SOCK_DIAG: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel's answer could not be understood.
    #[error("NETLINK_SOCK_DIAG: unexpected answer: {0}")]
    Protocol(&'static str),
}

/// One TCP connection's addresses, and its peer's uid once asked for.
#[derive(Debug)]
pub struct TcpPeer {
    local: SocketAddr,
    remote: SocketAddr,
    uid: OnceLock<Option<u32>>,
}

impl TcpPeer {
    /// A connection from `remote` to our `local` address.
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        TcpPeer {
            local,
            remote,
            uid: OnceLock::new(),
        }
    }

    /// Our address the connection arrived on (the listener's, for a listener bound to one
    /// address).
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The uid owning the peer socket, looked up on the first call and cached; `None` when it
    /// cannot be found (logged at debug level).
    pub fn uid(&self) -> Option<u32> {
        *self
            .uid
            .get_or_init(|| match lookup_uid(self.local, self.remote) {
                Ok(uid) => Some(uid),
                Err(e) => {
                    tracing::debug!(peer = %self.remote, "peer uid unknown: {e}");
                    None
                }
            })
    }
}

/// The uid owning the TCP socket at `peer` connected to our `local` address.
///
/// One netlink socket serves the whole process (opened on first use), behind a lock: a query
/// takes a few microseconds and happens once per connection, and a socket per thread would
/// leave a descriptor behind for every thread the runtime ever ran a lookup on.
pub fn lookup_uid(local: SocketAddr, peer: SocketAddr) -> Result<u32, LookupError> {
    static DIAG: Mutex<Option<Diag>> = Mutex::new(None);
    let mut slot = DIAG.lock().unwrap_or_else(|e| e.into_inner());
    let diag = match slot.as_mut() {
        Some(d) => d,
        None => slot.insert(Diag::open()?),
    };
    let result = diag.query(local, peer);
    if matches!(result, Err(LookupError::Io(_) | LookupError::Protocol(_))) {
        // Start afresh next time (a stale reply may be queued).
        *slot = None;
    }
    result
}

/// A netlink socket for `inet_diag` queries, with its sequence counter and receive buffer.
struct Diag {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Replies read while looking for ours (stale ones are skipped) before giving up.
const MAX_SKIPPED: usize = 8;

impl Diag {
    fn open() -> Result<Diag, LookupError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        socket.set_non_blocking(true)?;
        Ok(Diag {
            socket,
            seq: 0,
            buf: Vec::with_capacity(4096),
        })
    }

    fn query(&mut self, local: SocketAddr, peer: SocketAddr) -> Result<u32, LookupError> {
        let (local_ip, peer_ip) = (canonical(local.ip()), canonical(peer.ip()));
        let family = match (local_ip, peer_ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
            (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
            _ => return Err(LookupError::Protocol("mixed address families")),
        };
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        // The client's socket: its source is our peer, its destination is us.
        let wanted = SocketId {
            source_port: peer.port(),
            destination_port: local.port(),
            source_address: peer_ip,
            destination_address: local_ip,
            interface_id: 0,
            // INET_DIAG_NOCOOKIE: match on the addresses and ports only.
            cookie: [0xff; 8],
        };
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: wanted.clone(),
            })
            .into(),
        );
        msg.finalize();
        let mut out = [0u8; 128];
        let len = msg.buffer_len();
        let out = out
            .get_mut(..len)
            .ok_or(LookupError::Protocol("request too long"))?;
        msg.serialize(out);
        self.socket.send(out, 0)?;

        for _ in 0..MAX_SKIPPED {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, libc::MSG_DONTWAIT)?;
            if n > self.buf.len() {
                return Err(LookupError::Protocol("reply truncated"));
            }
            match parse_reply(&self.buf, self.seq)? {
                Reply::Stale => continue,
                Reply::Missing => return Err(LookupError::NotFound { peer, local }),
                Reply::Found { id, uid } => {
                    return if same_socket(&id, &wanted) {
                        Ok(uid)
                    } else {
                        Err(LookupError::Protocol("reply names another socket"))
                    };
                }
            }
        }
        Err(LookupError::Protocol("no reply to our request"))
    }
}

/// What one received datagram says about the request with sequence number `seq`.
#[derive(Debug)]
enum Reply {
    /// An answer to an earlier request.
    Stale,
    /// No such socket.
    Missing,
    /// The socket and its owner.
    Found { id: SocketId, uid: u32 },
}

/// Parses one netlink datagram from the kernel.
fn parse_reply(bytes: &[u8], seq: u32) -> Result<Reply, LookupError> {
    let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
        .map_err(|_| LookupError::Protocol("malformed netlink message"))?;
    if msg.header.sequence_number != seq {
        return Ok(Reply::Stale);
    }
    match msg.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Reply::Found {
            id: r.header.socket_id,
            uid: r.header.uid,
        }),
        // ENOENT, or any refusal: the socket is not one we can see.
        NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => Ok(Reply::Missing),
        _ => Err(LookupError::Protocol("not an inet_diag answer")),
    }
}

fn same_socket(a: &SocketId, b: &SocketId) -> bool {
    a.source_port == b.source_port
        && a.destination_port == b.destination_port
        && canonical(a.source_address) == canonical(b.source_address)
        && canonical(a.destination_address) == canonical(b.destination_address)
}

/// IPv4-mapped IPv6 addresses as IPv4 (the kernel keeps such connections as IPv4 sockets).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn my_uid() -> u32 {
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() }
    }

    #[test]
    fn finds_own_uid_ipv4_and_ipv6() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(addr) else {
                eprintln!("skipping {addr}: cannot bind");
                continue;
            };
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, remote) = l.accept().unwrap();
            assert_eq!(remote, c.local_addr().unwrap());
            let peer = TcpPeer::new(s.local_addr().unwrap(), remote);
            assert_eq!(peer.uid(), Some(my_uid()), "{addr}");
            // Cached: the same answer after the client is gone.
            drop(c);
            assert_eq!(peer.uid(), Some(my_uid()));
        }
    }

    #[test]
    fn unknown_socket_is_not_found() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = l.local_addr().unwrap();
        // Nothing is connected from this port.
        let bogus: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            lookup_uid(local, bogus),
            Err(LookupError::NotFound { .. })
        ));
        // The socket still works after a miss.
        let c = TcpStream::connect(local).unwrap();
        let (s, remote) = l.accept().unwrap();
        assert_eq!(
            lookup_uid(s.local_addr().unwrap(), remote).unwrap(),
            my_uid()
        );
        drop(c);
    }

    #[test]
    fn garbage_replies_are_errors() {
        assert!(parse_reply(&[], 1).is_err());
        assert!(parse_reply(&[0xff; 16], 1).is_err());
        // Whatever the bytes, an answer and never a panic.
        for len in 0..96 {
            for fill in [0u8, 0x01, 0x7f, 0xff] {
                let _ = parse_reply(&vec![fill; len], 1);
            }
        }
    }
}
