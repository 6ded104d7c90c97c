//! The listening port: our own loops share it (`SO_REUSEPORT`), but a port that another socket
//! already listens on is a start-up error, even when that socket allows `SO_REUSEPORT` too (as
//! another server of the same user does), instead of a port silently shared with it.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};

use gale_server::{App, HttpRequest, HttpResponse};
use socket2::{Domain, Protocol, Socket, Type};

/// A free loopback port, found by binding port 0 and letting it go.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("its address")
}

fn app(threads: usize) -> App {
    App::new().threads(threads).get("/healthz", |_req: &HttpRequest<'_>| HttpResponse::text(200, "ok\n"))
}

#[test]
fn a_port_another_socket_listens_on_with_reuseport_is_refused() {
    let addr = free_port();
    let other = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    other.set_reuse_address(true).expect("SO_REUSEADDR");
    other.set_reuse_port(true).expect("SO_REUSEPORT");
    other.bind(&addr.into()).expect("bind the other socket");
    other.listen(16).expect("listen");
    let err = match app(2).listen(addr) {
        Ok(_) => panic!("listen joined a port another socket listens on"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    let message = err.to_string();
    assert!(message.contains(&addr.to_string()) && !message.contains('\n'), "{message}");
    assert!(message.contains("already listening"), "{message}");
}

#[test]
fn a_second_server_on_the_same_port_is_refused_and_the_loops_of_one_share_it() {
    let addr = free_port();
    // Three loops, three listeners on one fixed port: the check does not trip over our own.
    let first = app(3).listen(addr).expect("the first server binds");
    assert_eq!(first.local_addr(), addr);
    let err = app(1).listen(addr).err().expect("a second server on the port is refused");
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    drop(first);
    // Once the first is gone, the port is free again.
    app(2).listen(addr).expect("the port is free once the first server is gone");
}
