//! An async fetch over any `embedded_io_async` stream (feature `async`).
//!
//! The same request, parser and classification as [`blocking`](crate::blocking); only the I/O
//! calls are awaited.

use embedded_io_async::{Read, Write};
use zeroize::Zeroize;

use crate::blocking::{FetchError, Fetched, READ_BUF, handle_read};
use crate::exchange::parse_response;
use crate::http::{Limits, Response, ResponseParser};
use crate::request::{PreparedRequest, Request};
use crate::time::UnixTime;

/// [`blocking::fetch`](crate::blocking::fetch) over an async stream.
pub async fn fetch<S: Read + Write>(
    stream: &mut S,
    request: &Request<'_>,
    wall_now: UnixTime,
) -> Result<Fetched, FetchError<S::Error>> {
    let response = round_trip(stream, &request.prepare(), Limits::DEFAULT).await?;
    let issued = parse_response(&response, wall_now)?;
    Ok(Fetched {
        issued,
        keep_alive: response.keep_alive,
    })
}

/// [`blocking::round_trip`](crate::blocking::round_trip) over an async stream.
pub async fn round_trip<S: Read + Write>(
    stream: &mut S,
    request: &PreparedRequest,
    limits: Limits,
) -> Result<Response, FetchError<S::Error>> {
    let mut rest = request.as_bytes();
    while !rest.is_empty() {
        match stream.write(rest).await {
            Ok(0) => return Err(FetchError::WriteZero),
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(e) => return Err(FetchError::Io(e)),
        }
    }
    stream.flush().await.map_err(FetchError::Io)?;

    let mut parser = ResponseParser::with_limits(limits);
    let mut buf = [0u8; READ_BUF];
    let result = loop {
        match stream.read(&mut buf).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocking::tests::{Mock, OK};
    use crate::exchange::ErrorClass;
    use crate::request::RoleAlias;
    use crate::time::Duration;
    use core::future::Future;
    use core::pin::pin;
    use core::task::{Context, Poll, Waker};

    impl embedded_io_async::Read for Mock {
        async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            self.read_into(buf)
        }
    }

    impl embedded_io_async::Write for Mock {
        async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            self.write_from(buf)
        }
        async fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    /// Runs a future that never waits (the mock is always ready).
    fn block_on<F: Future>(f: F) -> F::Output {
        let mut f = pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }

    #[test]
    fn async_fetch_matches_blocking() {
        let alias = RoleAlias::new("GatewayRole").unwrap();
        let req = Request::new("localhost", 8443, &alias, "iotcred/test").unwrap();
        for chunk in [1, 13, 4096] {
            let mut conn = Mock::new(OK.as_bytes(), chunk);
            let fetched = block_on(fetch(&mut conn, &req, UnixTime::EPOCH)).unwrap();
            assert_eq!(fetched.issued.lifetime, Duration::from_secs(3600));
            assert!(fetched.keep_alive);
            assert_eq!(conn.written, req.to_bytes());
        }
        let resp = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let e = block_on(fetch(&mut Mock::new(resp, 4), &req, UnixTime::EPOCH)).unwrap_err();
        assert_eq!((e.class(), e.status()), (ErrorClass::Permanent, Some(404)));
        let mut conn = Mock::new(OK.as_bytes(), 5);
        conn.write_zero = true;
        let e = block_on(fetch(&mut conn, &req, UnixTime::EPOCH)).unwrap_err();
        assert!(matches!(e, FetchError::WriteZero));
    }
}
