//! A deliberately small HTTP/1.1 request reader (httparse) shared by the TLS and admin listeners.

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest request head accepted.
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// One parsed request.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    /// HTTP/1.x minor version.
    pub(crate) minor: u8,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the connection should stay open after this request.
    pub(crate) fn keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        let has = |t: &str| conn.split(',').any(|p| p.trim() == t);
        if self.minor == 0 {
            has("keep-alive")
        } else {
            !has("close")
        }
    }
}

/// Why a request could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed or broke the connection (nothing to answer).
    Gone,
    /// Not HTTP, or too large: answer with this status, then close.
    Bad(u16),
}

/// Reads one request from `stream`; `buf` carries bytes over between requests of a connection.
/// `Ok(None)`: clean end of stream between requests.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    max_body: usize,
) -> Result<Option<Request>, ReadError> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let mut request = Request {
                        method: req.method.unwrap_or("").to_owned(),
                        path: req.path.unwrap_or("").to_owned(),
                        minor: req.version.unwrap_or(1),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_owned(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                        body: Vec::new(),
                    };
                    buf.drain(..n);
                    if request.header("transfer-encoding").is_some() {
                        return Err(ReadError::Bad(400));
                    }
                    let len = match request.header("content-length") {
                        None => 0,
                        Some(v) => v.trim().parse::<usize>().map_err(|_| ReadError::Bad(400))?,
                    };
                    if len > max_body {
                        return Err(ReadError::Bad(413));
                    }
                    while buf.len() < len {
                        if stream.read_buf(buf).await.map_err(|_| ReadError::Gone)? == 0 {
                            return Err(ReadError::Gone);
                        }
                    }
                    request.body = buf.drain(..len).collect();
                    return Ok(Some(request));
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_HEAD {
                        return Err(ReadError::Bad(431));
                    }
                }
                Err(httparse::Error::TooManyHeaders) => return Err(ReadError::Bad(431)),
                Err(_) => return Err(ReadError::Bad(400)),
            }
        }
        buf.reserve(4096);
        match stream.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err(ReadError::Gone),
            Ok(_) => {}
        }
    }
}

/// Reason phrase for the statuses this crate sends.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// `{"message":"…"}` with JSON escaping.
pub(crate) fn message_body(message: &str) -> Vec<u8> {
    let mut s = String::from("{\"message\":");
    s.push_str(&serde_json::Value::from(message).to_string());
    s.push('}');
    s.into_bytes()
}
