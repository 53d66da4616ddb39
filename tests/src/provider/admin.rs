//! The plain-HTTP admin listener (loopback only) used by the `fake-provider` binary.
//!
//! | route | does |
//! |---|---|
//! | `GET /requests` | JSON array of [`RequestRecord`](super::RequestRecord) |
//! | `GET /issued` | JSON array of [`IssuedCredentials`](super::IssuedCredentials) |
//! | `GET /stats` | [`Stats`](super::Stats) |
//! | `GET /faults` | `{"persistent":[…],"queued":[…]}` |
//! | `POST /fault` | body: a [`Fault`] in JSON; applies to every request |
//! | `POST /fault/once` | body: a [`Fault`]; applies to the next request only |
//! | `DELETE /fault` (or `POST /fault/clear`) | removes all faults |
//! | `POST /reset` | forgets faults, requests and issued credentials |
//!
//! Every answer closes the connection.

use std::sync::Arc;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use super::http::{self, ReadError};
use super::{Fault, Shared};

pub(crate) async fn serve(shared: Arc<Shared>, mut tcp: TcpStream) {
    let mut buf = Vec::new();
    let (status, body) = match http::read_request(&mut tcp, &mut buf, 1 << 20).await {
        Ok(Some(req)) => route(&shared, &req.method, &req.path, &req.body),
        Ok(None) | Err(ReadError::Gone) => return,
        Err(ReadError::Bad(status)) => (status, http::message_body(http::reason(status))),
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        http::reason(status),
        body.len()
    );
    let _ = tcp.write_all(head.as_bytes()).await;
    let _ = tcp.write_all(&body).await;
    let _ = tcp.shutdown().await;
}

fn json<T: serde_std::Serialize>(value: &T) -> (u16, Vec<u8>) {
    match serde_json::to_vec(value) {
        Ok(body) => (200, body),
        Err(e) => (500, http::message_body(&e.to_string())),
    }
}

fn route(shared: &Shared, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let ok = || (200, b"{\"ok\":true}".to_vec());
    let fault = || serde_json::from_slice::<Fault>(body);
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/requests") => json(&shared.requests()),
        ("GET", "/issued") => json(&shared.issued()),
        ("GET", "/stats") => json(&*shared.stats.borrow()),
        ("GET", "/faults") => {
            let (persistent, queued) = shared.faults();
            json(&serde_json::json!({ "persistent": persistent, "queued": queued }))
        }
        ("POST", "/fault") => match fault() {
            Ok(f) => {
                shared.set_fault(f);
                ok()
            }
            Err(e) => (400, http::message_body(&format!("bad fault: {e}"))),
        },
        ("POST", "/fault/once") => match fault() {
            Ok(f) => {
                shared.push_fault(f);
                ok()
            }
            Err(e) => (400, http::message_body(&format!("bad fault: {e}"))),
        },
        ("DELETE", "/fault") | ("POST", "/fault/clear") => {
            shared.clear_faults();
            ok()
        }
        ("POST", "/reset") => {
            shared.reset();
            ok()
        }
        (_, "/requests" | "/issued" | "/stats" | "/faults" | "/fault" | "/fault/once")
        | (_, "/fault/clear" | "/reset") => (405, http::message_body("Method Not Allowed")),
        _ => (404, http::message_body("Not Found")),
    }
}
