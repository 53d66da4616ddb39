//! An incremental HTTP/1.1 response parser with size limits.
//!
//! [`ResponseParser`] is fed bytes as they arrive, split anywhere, and yields one [`Response`].
//! It understands the status line and header block (through `httparse`), skips `1xx` interim
//! responses, and frames the body by `Transfer-Encoding: chunked` (chunk extensions and
//! trailers are read and discarded), `Content-Length`, or the end of the connection
//! (RFC 9112 §6.3). Only the `chunked` transfer coding is supported.
//!
//! Every buffer that may hold response bytes is zeroized when it is released or grown: the body
//! carries secrets.

use alloc::vec::Vec;
use core::fmt;

use zeroize::{Zeroize, Zeroizing};

use crate::time::UnixTime;

/// Size limits for one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of a header block (status line, fields, empty line), of each `1xx` interim
    /// head, and of all chunk-size lines and trailers together. Default 16 KiB.
    pub max_head: usize,
    /// Maximum size of the (decoded) body. Default 64 KiB (SPEC §2).
    pub max_body: usize,
}

impl Limits {
    /// 16 KiB of header, 64 KiB of body.
    pub const DEFAULT: Limits = Limits {
        max_head: 16 * 1024,
        max_body: 64 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A `Retry-After` header value (RFC 9110 §10.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// A delay in seconds (values over `u32::MAX` saturate).
    Seconds(u32),
    /// An HTTP date.
    Date(UnixTime),
}

/// A complete response.
///
/// `Debug` prints the body's length, never its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    /// The final (non-`1xx`) status code.
    pub status: u16,
    /// The `Date` header, when present and a valid HTTP date (an invalid one is ignored).
    pub date: Option<UnixTime>,
    /// The `Retry-After` header, when present and valid (an invalid one is ignored).
    pub retry_after: Option<RetryAfter>,
    /// Whether the connection may carry another request after this response: HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`; never after a body
    /// delimited by the end of the connection.
    pub keep_alive: bool,
    /// The decoded body; zeroized on drop.
    pub body: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("date", &self.date)
            .field("retry_after", &self.retry_after)
            .field("keep_alive", &self.keep_alive)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Why a response could not be parsed. None of these carry response bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// The status line or a header field is malformed.
    MalformedHead,
    /// More header fields than the parser has room for (64).
    TooManyHeaders,
    /// A header block, or the chunk metadata and trailers, exceed [`Limits::max_head`].
    HeadTooLarge,
    /// The body exceeds [`Limits::max_body`].
    BodyTooLarge,
    /// `Content-Length` is not a number, or several values disagree.
    InvalidContentLength,
    /// A transfer coding other than a final `chunked`.
    UnsupportedTransferEncoding,
    /// Malformed chunked framing.
    MalformedChunk,
    /// A `101 Switching Protocols`, which was never asked for.
    UnexpectedUpgrade,
    /// More than 8 `1xx` interim responses.
    TooManyInterimResponses,
    /// The connection ended before any byte of a response arrived (e.g. an idle keep-alive
    /// connection closed by the server).
    ClosedBeforeResponse,
    /// The connection ended in the middle of the response.
    Truncated,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpError::MalformedHead => "malformed HTTP status line or header",
            HttpError::TooManyHeaders => "too many HTTP header fields",
            HttpError::HeadTooLarge => "HTTP header block over the size limit",
            HttpError::BodyTooLarge => "HTTP response body over the size limit",
            HttpError::InvalidContentLength => "invalid Content-Length",
            HttpError::UnsupportedTransferEncoding => "unsupported Transfer-Encoding",
            HttpError::MalformedChunk => "malformed chunked encoding",
            HttpError::UnexpectedUpgrade => "unexpected 101 Switching Protocols",
            HttpError::TooManyInterimResponses => "too many 1xx interim responses",
            HttpError::ClosedBeforeResponse => "connection closed before a response arrived",
            HttpError::Truncated => "connection closed in the middle of the response",
        })
    }
}

impl core::error::Error for HttpError {}

/// Incremental parser for one HTTP/1.1 response.
///
/// ```
/// # use iotcred_core::http::ResponseParser;
/// let mut parser = ResponseParser::new();
/// let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
/// for b in bytes.chunks(3) {
///     parser.feed(b)?;
/// }
/// let response = parser.take_response().unwrap();
/// assert_eq!((response.status, &response.body[..]), (200, &b"{}"[..]));
/// # Ok::<(), iotcred_core::http::HttpError>(())
/// ```
pub struct ResponseParser {
    limits: Limits,
    state: State,
    /// The header block being collected.
    head: SecureBuf,
    /// The body being collected.
    body: SecureBuf,
    interim: u8,
    /// Bytes of chunk-size lines and trailers so far.
    chunk_meta: usize,
    received_any: bool,
    status: u16,
    date: Option<UnixTime>,
    retry_after: Option<RetryAfter>,
    keep_alive: bool,
    failed: Option<HttpError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Length { remaining: usize },
    Chunk(Chunk),
    UntilClose,
    Done,
    Taken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: extensions or whitespace up to the line end.
    Ext {
        size: u64,
    },
    /// Saw CR at the end of the size line.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    /// After the data: CR or LF.
    DataEnd,
    /// Saw CR after the data.
    DataLf,
    /// In the trailer section; `at_line_start` when nothing of the current line was read.
    Trailer {
        at_line_start: bool,
    },
    /// Saw CR in the trailer section; `empty_line` when it ends an empty line.
    TrailerLf {
        empty_line: bool,
    },
}

const MAX_HEADERS: usize = 64;
const MAX_INTERIM: u8 = 8;

impl Default for ResponseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ResponseParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseParser")
            .field("limits", &self.limits)
            .field("state", &self.state)
            .field("head_len", &self.head.len())
            .field("body_len", &self.body.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl ResponseParser {
    /// A parser with [`Limits::DEFAULT`].
    pub fn new() -> Self {
        Self::with_limits(Limits::DEFAULT)
    }

    /// A parser with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        ResponseParser {
            limits,
            state: State::Head,
            head: SecureBuf::new(),
            body: SecureBuf::new(),
            interim: 0,
            chunk_meta: 0,
            received_any: false,
            status: 0,
            date: None,
            retry_after: None,
            keep_alive: false,
            failed: None,
        }
    }

    /// Feeds bytes received from the connection.
    ///
    /// Consumes bytes up to the end of the response and returns how many; fewer than
    /// `data.len()` only once the response is complete (the rest is not part of it). After an
    /// error every call returns the same error.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.feed_inner(data) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Tells the parser the connection has ended. Completes a body delimited by the end of the
    /// connection; anywhere else, the response is incomplete and this is an error.
    pub fn finish(&mut self) -> Result<(), HttpError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.state {
            State::Done | State::Taken => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            State::Head if !self.received_any => Err(self.fail(HttpError::ClosedBeforeResponse)),
            _ => Err(self.fail(HttpError::Truncated)),
        }
    }

    /// Whether a complete response is ready (or was taken).
    pub fn is_complete(&self) -> bool {
        matches!(self.state, State::Done | State::Taken)
    }

    /// The response, once complete; `None` before, and after it was taken.
    pub fn take_response(&mut self) -> Option<Response> {
        if self.state != State::Done {
            return None;
        }
        self.state = State::Taken;
        Some(Response {
            status: self.status,
            date: self.date,
            retry_after: self.retry_after,
            keep_alive: self.keep_alive,
            body: self.body.take(),
        })
    }

    fn fail(&mut self, e: HttpError) -> HttpError {
        self.failed = Some(e);
        self.head.clear();
        self.body.clear();
        e
    }

    fn feed_inner(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        if !data.is_empty() {
            self.received_any = true;
        }
        let mut rest = data;
        while !rest.is_empty() {
            let used = match self.state {
                State::Done | State::Taken => break,
                State::Head => self.feed_head(rest)?,
                State::Length { remaining } => {
                    let n = remaining.min(rest.len());
                    self.push_body(&rest[..n])?;
                    let remaining = remaining - n;
                    self.state = if remaining == 0 {
                        State::Done
                    } else {
                        State::Length { remaining }
                    };
                    n
                }
                State::UntilClose => {
                    self.push_body(rest)?;
                    rest.len()
                }
                State::Chunk(chunk) => self.feed_chunked(chunk, rest)?,
            };
            rest = &rest[used..];
        }
        Ok(data.len() - rest.len())
    }

    fn push_body(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        if self.body.len() + bytes.len() > self.limits.max_body {
            return Err(HttpError::BodyTooLarge);
        }
        self.body.extend(bytes, self.limits.max_body);
        Ok(())
    }

    /// Collects the header block; returns the bytes used.
    fn feed_head(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        let old = self.head.len();
        let room = self.limits.max_head.saturating_sub(old);
        let take = data.len().min(room);
        self.head.extend(&data[..take], self.limits.max_head);
        let Some(end) = find_head_end(self.head.as_slice(), old.saturating_sub(2)) else {
            if take < data.len() || self.head.len() >= self.limits.max_head {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(take);
        };
        self.head.truncate(end);
        self.handle_head()?;
        Ok(end - old)
    }

    /// Parses the collected header block and chooses how the body is framed.
    fn handle_head(&mut self) -> Result<(), HttpError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        match parsed.parse(self.head.as_slice()) {
            Ok(httparse::Status::Complete(n)) if n == self.head.len() => {}
            Ok(_) => return Err(HttpError::MalformedHead),
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
            Err(_) => return Err(HttpError::MalformedHead),
        }
        let (Some(version), Some(status)) = (parsed.version, parsed.code) else {
            return Err(HttpError::MalformedHead);
        };
        if !(100..=999).contains(&status) {
            return Err(HttpError::MalformedHead);
        }
        if status < 200 {
            if status == 101 {
                return Err(HttpError::UnexpectedUpgrade);
            }
            self.interim += 1;
            if self.interim > MAX_INTERIM {
                return Err(HttpError::TooManyInterimResponses);
            }
            self.head.clear();
            return Ok(());
        }
        let framing = Framing::from_headers(parsed.headers)?;
        let mut keep_alive = if framing.close {
            false
        } else {
            version >= 1 || framing.keep_alive
        };
        let state = if status == 204 || status == 304 {
            State::Done
        } else if framing.chunked {
            if framing.content_length.is_some() {
                // RFC 9112 §6.3: Transfer-Encoding overrides; the connection must not be reused.
                keep_alive = false;
            }
            State::Chunk(Chunk::Size { size: 0, digits: 0 })
        } else if let Some(len) = framing.content_length {
            if len > self.limits.max_body as u64 {
                return Err(HttpError::BodyTooLarge);
            }
            let len = len as usize;
            self.body.reserve_exact(len);
            if len == 0 {
                State::Done
            } else {
                State::Length { remaining: len }
            }
        } else {
            keep_alive = false;
            State::UntilClose
        };
        self.status = status;
        self.date = framing.date;
        self.retry_after = framing.retry_after;
        self.keep_alive = keep_alive;
        self.state = state;
        self.head.clear();
        Ok(())
    }

    /// One step of chunked decoding; returns the bytes used (at least one).
    fn feed_chunked(&mut self, chunk: Chunk, data: &[u8]) -> Result<usize, HttpError> {
        if let Chunk::Data { remaining } = chunk {
            let n = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.push_body(&data[..n])?;
            let remaining = remaining - n as u64;
            self.state = State::Chunk(if remaining == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data { remaining }
            });
            return Ok(n);
        }
        let Some(&c) = data.first() else {
            return Ok(0);
        };
        self.chunk_meta += 1;
        if self.chunk_meta > self.limits.max_head {
            return Err(HttpError::HeadTooLarge);
        }
        let next = match chunk {
            Chunk::Size { size, digits } => match c {
                _ if c.is_ascii_hexdigit() => {
                    let digit = u64::from(hex_value(c));
                    let size = size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .ok_or(HttpError::BodyTooLarge)?;
                    Chunk::Size {
                        size,
                        digits: digits.saturating_add(1),
                    }
                }
                _ if digits == 0 => return Err(HttpError::MalformedChunk),
                b';' | b' ' | b'\t' => Chunk::Ext { size },
                b'\r' => Chunk::SizeLf { size },
                b'\n' => self.size_line_done(size)?,
                _ => return Err(HttpError::MalformedChunk),
            },
            Chunk::Ext { size } => match c {
                b'\r' => Chunk::SizeLf { size },
                b'\n' => self.size_line_done(size)?,
                b'\t' => Chunk::Ext { size },
                _ if c < 0x20 || c == 0x7f => return Err(HttpError::MalformedChunk),
                _ => Chunk::Ext { size },
            },
            Chunk::SizeLf { size } => match c {
                b'\n' => self.size_line_done(size)?,
                _ => return Err(HttpError::MalformedChunk),
            },
            Chunk::DataEnd => match c {
                b'\r' => Chunk::DataLf,
                b'\n' => Chunk::Size { size: 0, digits: 0 },
                _ => return Err(HttpError::MalformedChunk),
            },
            Chunk::DataLf => match c {
                b'\n' => Chunk::Size { size: 0, digits: 0 },
                _ => return Err(HttpError::MalformedChunk),
            },
            Chunk::Trailer { at_line_start } => match c {
                b'\r' => Chunk::TrailerLf {
                    empty_line: at_line_start,
                },
                b'\n' if at_line_start => {
                    self.state = State::Done;
                    return Ok(1);
                }
                b'\n' => Chunk::Trailer {
                    at_line_start: true,
                },
                b'\t' => Chunk::Trailer {
                    at_line_start: false,
                },
                _ if c < 0x20 || c == 0x7f => return Err(HttpError::MalformedChunk),
                _ => Chunk::Trailer {
                    at_line_start: false,
                },
            },
            Chunk::TrailerLf { empty_line } => match c {
                b'\n' if empty_line => {
                    self.state = State::Done;
                    return Ok(1);
                }
                b'\n' => Chunk::Trailer {
                    at_line_start: true,
                },
                _ => return Err(HttpError::MalformedChunk),
            },
            Chunk::Data { .. } => return Err(HttpError::MalformedChunk),
        };
        self.state = State::Chunk(next);
        Ok(1)
    }

    /// The end of a chunk-size line: the last chunk starts the trailer section.
    fn size_line_done(&mut self, size: u64) -> Result<Chunk, HttpError> {
        if size == 0 {
            return Ok(Chunk::Trailer {
                at_line_start: true,
            });
        }
        let total = (self.body.len() as u64).saturating_add(size);
        if total > self.limits.max_body as u64 {
            return Err(HttpError::BodyTooLarge);
        }
        Ok(Chunk::Data { remaining: size })
    }
}

/// What the header fields say about the body and the connection.
#[derive(Default)]
struct Framing {
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    date: Option<UnixTime>,
    retry_after: Option<RetryAfter>,
}

impl Framing {
    fn from_headers(fields: &[httparse::Header<'_>]) -> Result<Framing, HttpError> {
        let mut f = Framing::default();
        let mut date_seen = false;
        let mut retry_seen = false;
        for field in fields {
            let name = field.name;
            let value = field.value;
            if name.eq_ignore_ascii_case("content-length") {
                for item in value.split(|&c| c == b',') {
                    let len =
                        parse_decimal(trim_ows(item)).ok_or(HttpError::InvalidContentLength)?;
                    if f.content_length.is_some_and(|l| l != len) {
                        return Err(HttpError::InvalidContentLength);
                    }
                    f.content_length = Some(len);
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                for coding in value.split(|&c| c == b',').map(trim_ows) {
                    if coding.is_empty() {
                        continue;
                    }
                    // Only a single `chunked` can be decoded here.
                    if f.chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(HttpError::UnsupportedTransferEncoding);
                    }
                    f.chunked = true;
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for option in value.split(|&c| c == b',').map(trim_ows) {
                    if option.eq_ignore_ascii_case(b"close") {
                        f.close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        f.keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("date") {
                if !date_seen {
                    date_seen = true;
                    f.date = core::str::from_utf8(trim_ows(value))
                        .ok()
                        .and_then(|s| UnixTime::parse_http_date(s).ok());
                }
            } else if name.eq_ignore_ascii_case("retry-after") && !retry_seen {
                retry_seen = true;
                f.retry_after = parse_retry_after(trim_ows(value));
            }
        }
        Ok(f)
    }
}

fn parse_retry_after(value: &[u8]) -> Option<RetryAfter> {
    if !value.is_empty() && value.iter().all(u8::is_ascii_digit) {
        let secs = value.iter().fold(0u64, |acc, &c| {
            acc.saturating_mul(10).saturating_add(u64::from(c - b'0'))
        });
        return Some(RetryAfter::Seconds(u32::try_from(secs).unwrap_or(u32::MAX)));
    }
    let s = core::str::from_utf8(value).ok()?;
    UnixTime::parse_http_date(s).ok().map(RetryAfter::Date)
}

/// 1–19 ASCII digits (fits a `u64`).
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        s.iter()
            .fold(0u64, |acc, &c| acc * 10 + u64::from(c - b'0')),
    )
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |i| i + 1);
    &s[start..end]
}

fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

/// The end (exclusive) of the first empty line in `buf` at or after a line end at `from`:
/// `\n\n` or `\n\r\n`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1..) {
                Some([b'\n', ..]) => return Some(i + 2),
                Some([b'\r', b'\n', ..]) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// A byte buffer that never leaves an unzeroized copy behind: it grows by copying into a new
/// allocation and zeroizing the old one, and zeroizes whatever it drops.
struct SecureBuf(Zeroizing<Vec<u8>>);

impl SecureBuf {
    fn new() -> Self {
        SecureBuf(Zeroizing::new(Vec::new()))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// Appends `bytes`, growing to at most `cap_hint` capacity unless more is needed.
    fn extend(&mut self, bytes: &[u8], cap_hint: usize) {
        let needed = self.0.len() + bytes.len();
        if needed > self.0.capacity() {
            let new_cap = needed
                .max(self.0.capacity() * 2)
                .max(256)
                .min(cap_hint.max(needed));
            let mut grown = Zeroizing::new(Vec::with_capacity(new_cap));
            grown.extend_from_slice(&self.0);
            // The old allocation is zeroized when dropped here.
            self.0 = grown;
        }
        self.0.extend_from_slice(bytes);
    }

    /// Makes room for exactly `n` more bytes when nothing is stored yet (`Content-Length`).
    fn reserve_exact(&mut self, n: usize) {
        if self.0.is_empty() && self.0.capacity() < n {
            self.0 = Zeroizing::new(Vec::with_capacity(n));
        }
    }

    /// Drops the bytes after `len`, zeroizing them.
    fn truncate(&mut self, len: usize) {
        if let Some(tail) = self.0.get_mut(len..) {
            tail.zeroize();
        }
        self.0.truncate(len);
    }

    /// Zeroizes and empties the buffer (keeping the allocation).
    fn clear(&mut self) {
        self.0.zeroize();
    }

    fn take(&mut self) -> Zeroizing<Vec<u8>> {
        core::mem::replace(&mut self.0, Zeroizing::new(Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::String;
    use proptest::prelude::*;

    /// Feeds `chunks` in order, then EOF unless complete.
    fn run(chunks: &[&[u8]], limits: Limits) -> Result<Response, HttpError> {
        let mut p = ResponseParser::with_limits(limits);
        for c in chunks {
            let n = p.feed(c)?;
            assert!(n <= c.len());
            if n < c.len() {
                assert!(p.is_complete(), "bytes left over before completion");
            }
            assert!(p.head.len() <= limits.max_head);
            assert!(p.body.len() <= limits.max_body);
        }
        if !p.is_complete() {
            p.finish()?;
        }
        let r = p.take_response();
        assert!(p.take_response().is_none());
        Ok(r.expect("complete after finish"))
    }

    /// Parses `bytes` whole, at every 2-way split and one byte at a time; all must agree.
    fn parse_all_splits_with(bytes: &[u8], limits: Limits) -> Result<Response, HttpError> {
        let whole = run(&[bytes], limits);
        for i in 0..=bytes.len() {
            assert_eq!(
                run(&[&bytes[..i], &bytes[i..]], limits),
                whole,
                "split at {i}"
            );
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(&singles, limits), whole, "one byte at a time");
        whole
    }

    fn parse_all_splits(bytes: &[u8]) -> Result<Response, HttpError> {
        parse_all_splits_with(bytes, Limits::DEFAULT)
    }

    const BODY: &str = r#"{"credentials":{"accessKeyId":"ASIAEXAMPLE","secretAccessKey":"wJalr/K7MDENG+bPxRfiCY","sessionToken":"IQoJb3JpZ2luX2Vj//token==","expiration":"2026-01-01T12:00:00Z"}}"#;

    #[test]
    fn content_length() {
        let bytes = format!(
            "HTTP/1.1 200 OK\r\nDate: Thu, 01 Jan 2026 11:00:00 GMT\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        let r = parse_all_splits(bytes.as_bytes()).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.date, Some(UnixTime::from_secs(1_767_265_200)));
        assert_eq!(r.retry_after, None);
        assert!(r.keep_alive);
        assert_eq!(&r.body[..], BODY.as_bytes());
    }

    #[test]
    fn bytes_after_the_response_are_not_consumed() {
        let mut p = ResponseParser::new();
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1";
        assert_eq!(p.feed(bytes), Ok(bytes.len() - 8));
        assert_eq!(p.feed(b"more"), Ok(0));
        assert_eq!(&p.take_response().unwrap().body[..], b"ok");
        assert_eq!(p.finish(), Ok(()));
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;name=val\r\nhello\r\n6 ; q=\"a;b\"\r\n world\r\n\
            B\r\n and more\r\n\r\n0;last\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n";
        let r = parse_all_splits(bytes).unwrap();
        assert_eq!(&r.body[..], b"hello world and more\r\n");
        assert!(r.keep_alive);
    }

    #[test]
    fn chunked_without_trailers_and_bare_lf() {
        let r = parse_all_splits(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(&r.body[..], b"ok");
        let r = parse_all_splits(b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n")
            .unwrap();
        assert_eq!(&r.body[..], b"ok");
    }

    #[test]
    fn chunked_overrides_content_length_and_closes() {
        let r = parse_all_splits(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(&r.body[..], b"ok");
        assert!(!r.keep_alive);
    }

    #[test]
    fn close_delimited() {
        let r = parse_all_splits(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"a\":1}").unwrap();
        assert_eq!(&r.body[..], b"{\"a\":1}");
        assert!(!r.keep_alive);
        let r = parse_all_splits(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(r.body.is_empty());
        assert!(!r.keep_alive);
    }

    #[test]
    fn interim_responses_are_skipped() {
        let r = parse_all_splits(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        .unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
        let many = "HTTP/1.1 100 Continue\r\n\r\n".repeat(9);
        assert_eq!(
            parse_all_splits(many.as_bytes()),
            Err(HttpError::TooManyInterimResponses)
        );
        assert_eq!(
            parse_all_splits(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
            Err(HttpError::UnexpectedUpgrade)
        );
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |s: &[u8]| parse_all_splits(s).unwrap().keep_alive;
        assert!(ka(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!ka(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!ka(
            b"HTTP/1.1 200 OK\r\nConnection: upgrade, close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!ka(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(ka(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        ));
    }

    #[test]
    fn no_body_statuses() {
        for status in [204, 304] {
            let r = parse_all_splits(
                format!("HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n").as_bytes(),
            )
            .unwrap();
            assert_eq!(r.status, status);
            assert!(r.body.is_empty());
        }
    }

    #[test]
    fn error_responses_with_retry_after() {
        let r = parse_all_splits(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 22\r\n\r\n{\"message\":\"Slow down\"}",
        );
        // 23 bytes of body, only 22 announced: the last byte is left over.
        let r = r.unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.retry_after, Some(RetryAfter::Seconds(7)));
        let r = parse_all_splits(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: Thu, 01 Jan 2026 12:00:30 GMT\r\n\
              Date: Thu, 01 Jan 2026 12:00:00 GMT\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            r.retry_after,
            Some(RetryAfter::Date(UnixTime::from_secs(1_767_268_830)))
        );
        let r = parse_all_splits(
            b"HTTP/1.1 503 X\r\nRetry-After: 99999999999\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.retry_after, Some(RetryAfter::Seconds(u32::MAX)));
        let r = parse_all_splits(
            b"HTTP/1.1 503 X\r\nRetry-After: soon\r\nDate: yesterday\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.retry_after, r.date), (None, None));
    }

    #[test]
    fn content_length_variants() {
        let r = parse_all_splits(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 2\r\n\r\nok",
        )
        .unwrap();
        assert_eq!(&r.body[..], b"ok");
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert_eq!(parse_all_splits(bad), Err(HttpError::InvalidContentLength));
        }
    }

    #[test]
    fn unsupported_transfer_encodings() {
        for te in [
            "gzip",
            "gzip, chunked",
            "chunked, gzip",
            "chunked, chunked",
            "identity",
        ] {
            let bytes = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n");
            assert_eq!(
                parse_all_splits(bytes.as_bytes()),
                Err(HttpError::UnsupportedTransferEncoding),
                "{te}"
            );
        }
    }

    #[test]
    fn malformed_chunks() {
        for body in [
            &b"zz\r\n"[..],
            b";ext\r\n",
            b"\r\n",
            b"2\r\nokX\r\n0\r\n\r\n",
            b"2\r\nok\rX",
            b"2\x01\r\nok\r\n0\r\n\r\n",
            b"2;a\x00\r\nok\r\n0\r\n\r\n",
            b"2\rX",
            b"0\r\nX-T: a\x01\r\n\r\n",
            b"0\r\n\rX",
        ] {
            let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            bytes.extend_from_slice(body);
            assert_eq!(
                parse_all_splits(&bytes),
                Err(HttpError::MalformedChunk),
                "{body:?}"
            );
        }
    }

    #[test]
    fn malformed_heads() {
        for bad in [
            &b"FOO/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
            b"\r\n\r\n",
            b"\n\n",
        ] {
            assert_eq!(
                parse_all_splits(bad),
                Err(HttpError::MalformedHead),
                "{bad:?}"
            );
        }
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..65 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            parse_all_splits(many.as_bytes()),
            Err(HttpError::TooManyHeaders)
        );
    }

    #[test]
    fn oversized_head() {
        let mut bytes = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        bytes.resize(17 * 1024, b'a');
        bytes.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            run(&[&bytes], Limits::DEFAULT),
            Err(HttpError::HeadTooLarge)
        );
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(&singles, Limits::DEFAULT), Err(HttpError::HeadTooLarge));
        // Exactly at the limit is fine.
        let limits = Limits {
            max_head: 38,
            max_body: 10,
        };
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(head.len() - 2, 38);
        assert!(parse_all_splits_with(head, limits).is_ok());
        let limits = Limits {
            max_head: 37,
            max_body: 10,
        };
        assert_eq!(
            parse_all_splits_with(head, limits),
            Err(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn oversized_body() {
        let big = 64 * 1024 + 1;
        let bytes = format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n");
        assert_eq!(
            run(&[bytes.as_bytes()], Limits::DEFAULT),
            Err(HttpError::BodyTooLarge)
        );
        let limits = Limits {
            max_head: 1024,
            max_body: 4,
        };
        let cases: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nhello",
        ];
        for bytes in cases {
            assert_eq!(
                parse_all_splits_with(bytes, limits),
                Err(HttpError::BodyTooLarge)
            );
        }
        let ok: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhell\r\n0\r\n\r\n";
        assert_eq!(
            &parse_all_splits_with(ok, limits).unwrap().body[..],
            b"hell"
        );
        // A chunk size that overflows u64.
        let huge: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1FFFFFFFFFFFFFFFFF\r\n";
        assert_eq!(parse_all_splits(huge), Err(HttpError::BodyTooLarge));
    }

    #[test]
    fn oversized_chunk_metadata() {
        let limits = Limits {
            max_head: 64,
            max_body: 1024,
        };
        let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        bytes.resize(bytes.len() + 100, b'x');
        assert_eq!(run(&[&bytes], limits), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn truncated() {
        assert_eq!(parse_all_splits(b""), Err(HttpError::ClosedBeforeResponse));
        for bytes in [
            &b"HTTP/1.1 200 OK\r\nContent-Le"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            assert_eq!(
                run(&[bytes], Limits::DEFAULT),
                Err(HttpError::Truncated),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn errors_are_sticky_and_clear_buffers() {
        let mut p = ResponseParser::new();
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsecr")
            .unwrap();
        assert_eq!(p.finish(), Err(HttpError::Truncated));
        assert_eq!(p.body.len(), 0);
        assert_eq!(p.feed(b"et"), Err(HttpError::Truncated));
        assert_eq!(p.finish(), Err(HttpError::Truncated));
        assert!(p.take_response().is_none());
    }

    #[test]
    fn debug_does_not_print_the_body() {
        let r = parse_all_splits(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECRET").unwrap();
        let d = format!("{r:?}");
        assert!(!d.contains("SECRET") && d.contains("body_len: 6"), "{d}");
        let mut p = ResponseParser::new();
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nSECRET")
            .unwrap();
        assert!(!format!("{p:?}").contains("SECRET"));
    }

    #[test]
    fn secure_buf_grows_without_losing_bytes() {
        let mut b = SecureBuf::new();
        let mut want = Vec::new();
        for i in 0..2000u32 {
            let piece = [(i % 251) as u8; 3];
            b.extend(&piece, 10_000);
            want.extend_from_slice(&piece);
        }
        assert_eq!(b.as_slice(), &want[..]);
        b.truncate(5);
        assert_eq!(b.as_slice(), &want[..5]);
        b.clear();
        assert_eq!(b.len(), 0);
    }

    /// Encodes `body` chunked with the given chunk sizes (cycled).
    fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    proptest! {
        #![proptest_config(crate::time::tests::deterministic(512))]

        #[test]
        fn never_panics_and_respects_limits(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(1usize..64, 1..20),
            max_head in 16usize..256,
            max_body in 0usize..128,
        ) {
            let limits = Limits { max_head, max_body };
            let mut p = ResponseParser::with_limits(limits);
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                i += 1;
                match p.feed(&rest[..n]) {
                    Ok(used) => prop_assert!(used <= n),
                    Err(_) => break,
                }
                prop_assert!(p.head.len() <= max_head);
                prop_assert!(p.body.len() <= max_body);
                rest = &rest[n..];
            }
            let _ = p.finish();
            if let Some(r) = p.take_response() {
                prop_assert!(r.body.len() <= max_body);
            }
        }

        #[test]
        fn http_shaped_noise_never_panics(
            head in "HTTP/1\\.[01] [0-9]{3} [a-zA-Z ]{0,8}\r\n([a-zA-Z-]{1,12}: [ -~]{0,12}\r\n){0,6}\r\n",
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&body);
            let _ = run(&[&bytes], Limits { max_head: 512, max_body: 32 });
        }

        #[test]
        fn chunked_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            sizes in proptest::collection::vec(1usize..40, 1..8),
            cut in 1usize..50,
        ) {
            let bytes = chunked(&body, &sizes);
            let pieces: Vec<&[u8]> = bytes.chunks(cut).collect();
            let r = run(&pieces, Limits::DEFAULT).unwrap();
            prop_assert_eq!(&r.body[..], &body[..]);
        }
    }

    #[test]
    fn empty_feed_is_harmless() {
        let mut p = ResponseParser::new();
        assert_eq!(p.feed(&[]), Ok(0));
        assert_eq!(p.finish(), Err(HttpError::ClosedBeforeResponse));
    }
}
