//! A blocking fetch over any `embedded_io` stream.
//!
//! The caller opens the (TLS) connection; [`fetch`] writes the request, reads the response
//! through [`ResponseParser`] and turns it into credentials with
//! [`exchange::parse_response`](crate::exchange::parse_response).

use core::fmt;

use embedded_io::{Read, Write};
use zeroize::Zeroize;

use crate::credentials::Issued;
use crate::exchange::{ErrorClass, ExchangeError, parse_response};
use crate::http::{HttpError, Limits, Response, ResponseParser};
use crate::request::{PreparedRequest, Request};
use crate::time::{Duration, UnixTime};

/// Bytes read from the stream per call (on the stack, zeroized afterwards).
pub(crate) const READ_BUF: usize = 1024;

/// Credentials from one exchange.
#[derive(Debug)]
pub struct Fetched {
    /// The credentials and their lifetime.
    pub issued: Issued,
    /// Whether the connection may be reused for the next request.
    pub keep_alive: bool,
}

/// Why a fetch failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum FetchError<E> {
    /// Reading or writing the stream failed (transient).
    Io(E),
    /// The stream accepted no bytes (`write` returned `Ok(0)`; transient).
    WriteZero,
    /// The response was a rejection, malformed, or unusable.
    Exchange(ExchangeError),
}

impl<E> FetchError<E> {
    /// [`ErrorClass::Transient`] for I/O; the exchange error's class otherwise.
    pub fn class(&self) -> ErrorClass {
        match self {
            FetchError::Exchange(e) => e.class(),
            _ => ErrorClass::Transient,
        }
    }

    /// The HTTP status of a rejection.
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Exchange(e) => e.status(),
            _ => None,
        }
    }

    /// The provider's `Retry-After` of a rejection, as a delay.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Exchange(e) => e.retry_after(),
            _ => None,
        }
    }

    /// The exchange error, if that is what this is.
    pub fn exchange(&self) -> Option<&ExchangeError> {
        match self {
            FetchError::Exchange(e) => Some(e),
            _ => None,
        }
    }
}

impl<E> From<ExchangeError> for FetchError<E> {
    fn from(e: ExchangeError) -> Self {
        FetchError::Exchange(e)
    }
}

impl<E> From<HttpError> for FetchError<E> {
    fn from(e: HttpError) -> Self {
        FetchError::Exchange(ExchangeError::Http(e))
    }
}

impl<E: fmt::Display> fmt::Display for FetchError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Io(e) => write!(f, "connection error: {e}; will retry"),
            FetchError::WriteZero => {
                f.write_str("connection error: the stream accepted no bytes; will retry")
            }
            FetchError::Exchange(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<E: core::error::Error + 'static> core::error::Error for FetchError<E> {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            FetchError::Io(e) => Some(e),
            FetchError::WriteZero => None,
            FetchError::Exchange(e) => Some(e),
        }
    }
}

/// One exchange over `stream`: writes `request`, reads one response (default [`Limits`]) and
/// parses it. `wall_now` is the wall clock, used only when the response has no `Date`.
///
/// The stream is left positioned after the response; reuse it only when
/// [`Fetched::keep_alive`] says so.
pub fn fetch<S: Read + Write>(
    stream: &mut S,
    request: &Request<'_>,
    wall_now: UnixTime,
) -> Result<Fetched, FetchError<S::Error>> {
    let response = round_trip(stream, &request.prepare(), Limits::DEFAULT)?;
    let issued = parse_response(&response, wall_now)?;
    Ok(Fetched {
        issued,
        keep_alive: response.keep_alive,
    })
}

/// Writes a prepared request ([`Request::prepare`]) and reads one response, without interpreting
/// its status.
pub fn round_trip<S: Read + Write>(
    stream: &mut S,
    request: &PreparedRequest,
    limits: Limits,
) -> Result<Response, FetchError<S::Error>> {
    let mut rest = request.as_bytes();
    while !rest.is_empty() {
        match stream.write(rest) {
            Ok(0) => return Err(FetchError::WriteZero),
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(e) => return Err(FetchError::Io(e)),
        }
    }
    stream.flush().map_err(FetchError::Io)?;

    let mut parser = ResponseParser::with_limits(limits);
    let mut buf = [0u8; READ_BUF];
    let result = loop {
        match stream.read(&mut buf) {
            Ok(n) => match handle_read(&mut parser, &buf, n) {
                Ok(Some(response)) => break Ok(response),
                Ok(None) => {}
                Err(e) => break Err(e.into()),
            },
            Err(e) => break Err(FetchError::Io(e)),
        }
    };
    buf.zeroize();
    result
}

/// Feeds the `n` bytes read into `buf` (`0`: end of stream); the response once complete.
pub(crate) fn handle_read(
    parser: &mut ResponseParser,
    buf: &[u8],
    n: usize,
) -> Result<Option<Response>, HttpError> {
    if n == 0 {
        parser.finish()?;
    } else {
        parser.feed(buf.get(..n).unwrap_or(buf))?;
    }
    match parser.take_response() {
        Some(response) => Ok(Some(response)),
        None if n == 0 => Err(HttpError::Truncated),
        None => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::exchange::ErrorClass;
    use crate::request::RoleAlias;
    use alloc::format;
    use alloc::vec::Vec;

    /// An in-memory connection: reads come from `input` at most `chunk` bytes at a time.
    pub(crate) struct Mock {
        pub(crate) input: Vec<u8>,
        pub(crate) pos: usize,
        pub(crate) chunk: usize,
        pub(crate) written: Vec<u8>,
        pub(crate) fail_read: bool,
        pub(crate) write_zero: bool,
    }

    impl Mock {
        pub(crate) fn new(input: &[u8], chunk: usize) -> Self {
            Mock {
                input: input.to_vec(),
                pos: 0,
                chunk,
                written: Vec::new(),
                fail_read: false,
                write_zero: false,
            }
        }

        pub(crate) fn read_into(
            &mut self,
            buf: &mut [u8],
        ) -> Result<usize, embedded_io::ErrorKind> {
            if self.fail_read {
                return Err(embedded_io::ErrorKind::ConnectionReset);
            }
            let n = self.chunk.min(buf.len()).min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }

        pub(crate) fn write_from(&mut self, buf: &[u8]) -> Result<usize, embedded_io::ErrorKind> {
            if self.write_zero {
                return Ok(0);
            }
            let n = buf.len().min(7);
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    impl embedded_io::ErrorType for Mock {
        type Error = embedded_io::ErrorKind;
    }

    impl Read for Mock {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            self.read_into(buf)
        }
    }

    impl Write for Mock {
        fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            self.write_from(buf)
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    pub(crate) const OK: &str = "HTTP/1.1 200 OK\r\nDate: Thu, 01 Jan 2026 11:00:00 GMT\r\nContent-Length: 141\r\n\r\n\
        {\"credentials\":{\"accessKeyId\":\"ASIAKEY1\",\"secretAccessKey\":\"sec\",\"sessionToken\":\"tok\",\"expiration\":\"2026-01-01T12:00:00Z\"},\"x\":\"padding....\"}";

    #[test]
    fn fetch_success_any_read_size() {
        let alias = RoleAlias::new("GatewayRole").unwrap();
        let req = Request::new("localhost", 8443, &alias, "iotcred/test").unwrap();
        for chunk in [1, 2, 7, 100, 4096] {
            let mut conn = Mock::new(OK.as_bytes(), chunk);
            let fetched = fetch(&mut conn, &req, UnixTime::EPOCH).unwrap();
            assert_eq!(fetched.issued.lifetime, Duration::from_secs(3600));
            assert_eq!(fetched.issued.credentials.session_token.expose(), "tok");
            assert!(fetched.keep_alive);
            assert_eq!(conn.written, req.to_bytes());
            assert_eq!(conn.pos, conn.input.len());
        }
    }

    #[test]
    fn fetch_rejection_and_io_errors() {
        let alias = RoleAlias::new("R").unwrap();
        let req = Request::new("h", 443, &alias, "ua").unwrap();
        let body = r#"{"message":"Access Denied"}"#;
        let resp = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let e = fetch(&mut Mock::new(resp.as_bytes(), 5), &req, UnixTime::EPOCH).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert_eq!(e.status(), Some(403));
        assert_eq!(
            e.exchange().and_then(ExchangeError::message),
            Some("Access Denied")
        );

        let resp = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n";
        let e = fetch(&mut Mock::new(resp.as_bytes(), 5), &req, UnixTime::EPOCH).unwrap_err();
        assert_eq!(
            (e.class(), e.retry_after()),
            (ErrorClass::Transient, Some(Duration::from_secs(3)))
        );

        let e = fetch(&mut Mock::new(b"", 5), &req, UnixTime::EPOCH).unwrap_err();
        assert!(matches!(
            e,
            FetchError::Exchange(ExchangeError::Http(HttpError::ClosedBeforeResponse))
        ));
        let e = fetch(
            &mut Mock::new(&OK.as_bytes()[..50], 5),
            &req,
            UnixTime::EPOCH,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            FetchError::Exchange(ExchangeError::Http(HttpError::Truncated))
        ));
        assert_eq!(e.class(), ErrorClass::Transient);

        let mut conn = Mock::new(OK.as_bytes(), 5);
        conn.fail_read = true;
        let e = fetch(&mut conn, &req, UnixTime::EPOCH).unwrap_err();
        assert!(matches!(
            e,
            FetchError::Io(embedded_io::ErrorKind::ConnectionReset)
        ));
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(format!("{e}").starts_with("connection error"));

        let mut conn = Mock::new(OK.as_bytes(), 5);
        conn.write_zero = true;
        let e = fetch(&mut conn, &req, UnixTime::EPOCH).unwrap_err();
        assert!(matches!(e, FetchError::WriteZero));
    }

    #[test]
    fn round_trip_close_delimited() {
        let alias = RoleAlias::new("R").unwrap();
        let req = Request::new("h", 443, &alias, "ua").unwrap();
        let mut conn = Mock::new(b"HTTP/1.0 500 Oops\r\n\r\nbody", 3);
        let r = round_trip(&mut conn, &req.prepare(), Limits::DEFAULT).unwrap();
        assert_eq!(
            (r.status, &r.body[..], r.keep_alive),
            (500, &b"body"[..], false)
        );
    }
}
