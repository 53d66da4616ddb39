//! AWS Signature Version 4 (`AWS4-HMAC-SHA256`) for HTTP requests, so that the credentials this
//! crate fetched can be used to call AWS APIs (STS, S3, IoT data plane, …) from any device.
//!
//! Sans-IO and without a clock: the caller describes the request exactly as it will be sent
//! (method, path and query in their on-the-wire percent-encoded form, headers, body) and passes
//! the time; [`sign`] answers with the headers to add (`X-Amz-Date`, `X-Amz-Security-Token`
//! when the credentials have a session token, `X-Amz-Content-SHA256` when asked for, and
//! `Authorization`).
//!
//! ```
//! use iotcred_core::sigv4::{self, Payload, Settings, SignableRequest, SigningCredentials, SigningParams};
//! use iotcred_core::UnixTime;
//!
//! let body = b"Action=GetCallerIdentity&Version=2011-06-15";
//! let headers = [
//!     ("Host", "sts.eu-west-1.amazonaws.com"),
//!     ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
//! ];
//! let request = SignableRequest {
//!     method: "POST",
//!     path: "/",
//!     query: "",
//!     headers: &headers,
//!     payload: Payload::Bytes(body),
//! };
//! let params = SigningParams {
//!     credentials: SigningCredentials {
//!         access_key_id: "AKIDEXAMPLE",
//!         secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
//!         session_token: None,
//!     },
//!     region: "eu-west-1",
//!     service: "sts",
//!     time: UnixTime::from_secs(1_767_268_800), // the caller's clock
//!     settings: Settings::DEFAULT,
//! };
//! let signed = sigv4::sign(&request, &params)?;
//! for (name, value) in signed.headers() {
//!     // write `name: value` into the request head, next to the headers above
//!     # let _ = (name, value);
//! }
//! assert_eq!(signed.amz_date(), "20260101T120000Z");
//! # Ok::<(), sigv4::SignError>(())
//! ```
//!
//! Canonicalisation (the same as AWS's SDKs for every service but S3, see [`Settings`]):
//! - the path has its dot segments and repeated slashes removed, and is percent-encoded once
//!   more (it is already encoded on the wire);
//! - the query's `name=value` pairs are decoded (`+` is a space) and encoded again with only
//!   `A-Z a-z 0-9 - _ . ~` left as they are, then sorted by name and value; empty pairs are
//!   dropped;
//! - header names are lowercased, values trimmed of spaces at both ends with runs of spaces
//!   made one; repeated headers are joined with `,` in the order given. Hop-by-hop headers,
//!   `User-Agent` and tracing headers ([`UNSIGNED_HEADERS`]) are sent but not signed (proxies
//!   and clients change them); a `Host` header is required.
//!
//! Secrets: the signing key and intermediate buffers holding the session token are zeroized;
//! no `Debug` output of this module prints a secret access key or session token.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write as _};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::credentials::Credentials;
use crate::time::UnixTime;

/// The algorithm name written into the string to sign and the `Authorization` header.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The payload hash of a request whose body is not signed ([`Payload::Unsigned`]).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// Headers that are sent but never signed: hop-by-hop headers, and headers that clients,
/// proxies and tracing set or change on the way (the union of what AWS's SDKs leave out).
pub const UNSIGNED_HEADERS: [&str; 14] = [
    "baggage",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "traceparent",
    "tracestate",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

/// Credentials to sign with. `Debug` prints only the access key id.
#[derive(Clone, Copy)]
pub struct SigningCredentials<'a> {
    /// `AKIA…` or `ASIA…`.
    pub access_key_id: &'a str,
    /// The secret access key.
    pub secret_access_key: &'a str,
    /// The session token of temporary credentials, sent as `X-Amz-Security-Token` (and signed).
    pub session_token: Option<&'a str>,
}

impl<'a> From<&'a Credentials> for SigningCredentials<'a> {
    fn from(c: &'a Credentials) -> Self {
        SigningCredentials {
            access_key_id: &c.access_key_id,
            secret_access_key: c.secret_access_key.expose(),
            session_token: Some(c.session_token.expose()).filter(|t| !t.is_empty()),
        }
    }
}

impl fmt::Debug for SigningCredentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .field("session_token", &self.session_token.map(|_| "***"))
            .finish()
    }
}

/// The body, or how it is accounted for.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    /// The body bytes (empty for none): their SHA-256 is signed.
    Bytes(&'a [u8]),
    /// The body is not signed ([`UNSIGNED_PAYLOAD`]); S3 over HTTPS accepts this.
    Unsigned,
    /// A payload hash computed by the caller: 64 lowercase hex digits, or a special value such
    /// as `STREAMING-…` (visible ASCII only).
    Precomputed(&'a str),
}

impl fmt::Debug for Payload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Payload::Unsigned => f.write_str("Unsigned"),
            Payload::Precomputed(h) => write!(f, "Precomputed({h:?})"),
        }
    }
}

/// Service-dependent canonicalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// Percent-encode the (already encoded) path once more. Every service but S3.
    pub double_encode_path: bool,
    /// Remove `.` and `..` segments and repeated slashes from the path (RFC 3986 §5.2.4).
    /// Every service but S3.
    pub normalize_path: bool,
    /// Send the payload hash as a signed `X-Amz-Content-SHA256` header. S3 requires it.
    pub content_sha256_header: bool,
}

impl Settings {
    /// Every service but S3.
    pub const DEFAULT: Settings = Settings {
        double_encode_path: true,
        normalize_path: true,
        content_sha256_header: false,
    };
    /// S3: the path is signed as sent, and `X-Amz-Content-SHA256` is added.
    pub const S3: Settings = Settings {
        double_encode_path: false,
        normalize_path: false,
        content_sha256_header: true,
    };
}

impl Default for Settings {
    fn default() -> Self {
        Settings::DEFAULT
    }
}

/// A request as it will be sent.
#[derive(Clone, Copy)]
pub struct SignableRequest<'a> {
    /// `GET`, `POST`, … (sent and signed as given).
    pub method: &'a str,
    /// The path as on the wire (percent-encoded, starting with `/`; empty means `/`), without
    /// the query.
    pub path: &'a str,
    /// The query as on the wire, without the `?`; empty for none.
    pub query: &'a str,
    /// Every header that will be sent, `Host` included. Must not contain the headers the signer
    /// writes (`Authorization`, `X-Amz-Date`, `X-Amz-Security-Token`, and
    /// `X-Amz-Content-SHA256` when [`Settings::content_sha256_header`] is set).
    pub headers: &'a [(&'a str, &'a str)],
    /// The body.
    pub payload: Payload<'a>,
}

impl fmt::Debug for SignableRequest<'_> {
    /// Header values are not printed (they may carry secrets of the caller).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Names<'a>(&'a [(&'a str, &'a str)]);
        impl fmt::Debug for Names<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(|(n, _)| n))
                    .finish()
            }
        }
        f.debug_struct("SignableRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("headers", &Names(self.headers))
            .field("payload", &self.payload)
            .finish()
    }
}

/// Who signs, for which region and service, and when.
#[derive(Clone, Copy, Debug)]
pub struct SigningParams<'a> {
    /// The credentials.
    pub credentials: SigningCredentials<'a>,
    /// `eu-west-1`, …
    pub region: &'a str,
    /// The signing name of the service: `sts`, `s3`, `execute-api`, …
    pub service: &'a str,
    /// The time of signing, from the caller's wall clock (AWS refuses requests more than five
    /// minutes off).
    pub time: UnixTime,
    /// Canonicalisation rules.
    pub settings: Settings,
}

/// Why a request cannot be signed. None of these carries a secret or a header value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignError {
    /// The method is empty or not an HTTP token.
    InvalidMethod,
    /// The path does not start with `/`, or holds a character that cannot be sent as is (space,
    /// control, non-ASCII, `?`, `#`).
    InvalidPath,
    /// The query holds a character that cannot be sent as is (space, control, non-ASCII, `#`).
    InvalidQuery,
    /// The header at this index has an empty name or one that is not an HTTP token.
    InvalidHeaderName(usize),
    /// The value of the header at this index contains CR, LF or NUL.
    InvalidHeaderValue(usize),
    /// The request already carries a header that the signer writes.
    ReservedHeader(&'static str),
    /// The request has no `Host` header.
    MissingHost,
    /// The region or service is empty or holds characters other than `A-Z a-z 0-9 - _ .`.
    InvalidScope,
    /// The access key id is empty or holds characters other than `A-Z a-z 0-9`.
    InvalidAccessKeyId,
    /// The session token is empty or holds a character that cannot be sent in a header.
    InvalidSessionToken,
    /// A precomputed payload hash is empty or not visible ASCII.
    InvalidPayloadHash,
    /// The time is outside the years 0000–9999.
    TimeOutOfRange,
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignError::InvalidMethod => f.write_str("invalid HTTP method: use e.g. GET or POST"),
            SignError::InvalidPath => f.write_str(
                "invalid request path: give it percent-encoded as sent, starting with /, without ? or #",
            ),
            SignError::InvalidQuery => f.write_str(
                "invalid query string: give it percent-encoded as sent, without ? or #",
            ),
            SignError::InvalidHeaderName(i) => {
                write!(f, "header #{i} has an invalid name: use an HTTP token")
            }
            SignError::InvalidHeaderValue(i) => {
                write!(f, "header #{i} has a value with CR, LF or NUL: remove them")
            }
            SignError::ReservedHeader(name) => write!(
                f,
                "the request already has a {name} header: leave it to the signer"
            ),
            SignError::MissingHost => {
                f.write_str("the request has no Host header: add the endpoint's host")
            }
            SignError::InvalidScope => f.write_str(
                "invalid region or service name: use e.g. eu-west-1 and the service's signing name",
            ),
            SignError::InvalidAccessKeyId => f.write_str(
                "invalid access key id: it must be non-empty letters and digits",
            ),
            SignError::InvalidSessionToken => f.write_str(
                "invalid session token: it is empty or holds characters a header cannot carry",
            ),
            SignError::InvalidPayloadHash => {
                f.write_str("invalid precomputed payload hash: use 64 lowercase hex digits")
            }
            SignError::TimeOutOfRange => {
                f.write_str("the signing time is outside the years 0000-9999: check the clock")
            }
        }
    }
}

impl core::error::Error for SignError {}

/// `YYYYMMDD'T'HHMMSS'Z'`, the form of `X-Amz-Date`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AmzDate([u8; 16]);

impl AmzDate {
    /// The timestamp of `time`, or `None` outside the years 0000–9999.
    pub fn new(time: UnixTime) -> Option<AmzDate> {
        if time < UnixTime::MIN_FORMATTABLE || time > UnixTime::MAX_FORMATTABLE {
            return None;
        }
        // "2026-01-01T12:00:00Z" → "20260101T120000Z"
        let mut rfc = ByteBuf::<20>::new();
        write!(rfc, "{}", time.rfc3339()).ok()?;
        let mut out = [0u8; 16];
        let kept = rfc.as_bytes().iter().filter(|b| !matches!(b, b'-' | b':'));
        for (o, b) in out.iter_mut().zip(kept) {
            *o = *b;
        }
        Some(AmzDate(out))
    }

    /// `20260101T120000Z`.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, `T` and `Z` are ever stored.
        core::str::from_utf8(&self.0).unwrap_or("00000000T000000Z")
    }

    /// The date part, `20260101`, used in the credential scope.
    pub fn date(&self) -> &str {
        self.as_str().get(..8).unwrap_or("00000000")
    }
}

impl fmt::Debug for AmzDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The derived key `HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service),
/// "aws4_request")`: valid for one day, region and service, so it may be cached by callers
/// that sign many requests. Zeroized on drop; `Debug` prints `***`.
#[derive(Clone)]
pub struct SigningKey([u8; 32]);

impl SigningKey {
    /// Derives the key for `date` (`YYYYMMDD`, see [`AmzDate::date`]), `region` and `service`.
    pub fn derive(secret_access_key: &str, date: &str, region: &str, service: &str) -> SigningKey {
        let mut k_secret = Zeroizing::new(Vec::with_capacity(4 + secret_access_key.len()));
        k_secret.extend_from_slice(b"AWS4");
        k_secret.extend_from_slice(secret_access_key.as_bytes());
        let mut k_date = hmac_sha256(&k_secret, date.as_bytes());
        let mut k_region = hmac_sha256(&k_date, region.as_bytes());
        let mut k_service = hmac_sha256(&k_region, service.as_bytes());
        let key = hmac_sha256(&k_service, b"aws4_request");
        k_date.zeroize();
        k_region.zeroize();
        k_service.zeroize();
        SigningKey(key)
    }

    /// The signature of `string_to_sign`, as 64 lowercase hex digits.
    pub fn sign(&self, string_to_sign: &str) -> [u8; 64] {
        hex32(&hmac_sha256(&self.0, string_to_sign.as_bytes()))
    }
}

impl Drop for SigningKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The outcome of [`sign`]: the headers to add to the request.
#[derive(Clone)]
pub struct Signed<'a> {
    amz_date: AmzDate,
    payload_hash: String,
    signature: [u8; 64],
    authorization: String,
    session_token: Option<&'a str>,
    content_sha256_header: bool,
}

impl<'a> Signed<'a> {
    /// The headers to add, in this order: `x-amz-date`, `x-amz-security-token` (when the
    /// credentials have a session token), `x-amz-content-sha256` (when
    /// [`Settings::content_sha256_header`] is set), `authorization`.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            Some(("x-amz-date", self.amz_date.as_str())),
            self.session_token.map(|t| ("x-amz-security-token", t)),
            self.content_sha256_header
                .then_some(("x-amz-content-sha256", self.payload_hash.as_str())),
            Some(("authorization", self.authorization.as_str())),
        ]
        .into_iter()
        .flatten()
    }

    /// The value of `X-Amz-Date`.
    pub fn amz_date(&self) -> &str {
        self.amz_date.as_str()
    }

    /// The value of `Authorization`.
    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    /// The signature (64 lowercase hex digits).
    pub fn signature(&self) -> &str {
        core::str::from_utf8(&self.signature).unwrap_or("")
    }

    /// The payload hash that was signed.
    pub fn payload_hash(&self) -> &str {
        &self.payload_hash
    }

    /// The value of `X-Amz-Security-Token`, when there is one.
    pub fn session_token(&self) -> Option<&'a str> {
        self.session_token
    }
}

impl fmt::Debug for Signed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("amz_date", &self.amz_date)
            .field("payload_hash", &self.payload_hash)
            .field("signature", &self.signature())
            .field("session_token", &self.session_token.map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// Signs `request`: builds the canonical request and the string to sign, derives the signing
/// key and returns the headers to add.
pub fn sign<'a>(
    request: &SignableRequest<'_>,
    params: &SigningParams<'a>,
) -> Result<Signed<'a>, SignError> {
    let amz_date = AmzDate::new(params.time).ok_or(SignError::TimeOutOfRange)?;
    let canonical = Canonical::new(request, params, amz_date)?;
    let scope = Scope {
        date: amz_date.date(),
        region: params.region,
        service: params.service,
    };
    let sts = string_to_sign(amz_date, &scope, &canonical.text);
    let key = SigningKey::derive(
        params.credentials.secret_access_key,
        scope.date,
        scope.region,
        scope.service,
    );
    let signature = key.sign(&sts);
    let mut authorization = String::with_capacity(
        ALGORITHM.len()
            + 40
            + params.credentials.access_key_id.len()
            + canonical.signed_headers.len()
            + 120,
    );
    // Writing into a String cannot fail.
    let _ = write!(
        authorization,
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={}, Signature={}",
        params.credentials.access_key_id,
        canonical.signed_headers,
        core::str::from_utf8(&signature).unwrap_or(""),
    );
    Ok(Signed {
        amz_date,
        payload_hash: canonical.payload_hash,
        signature,
        authorization,
        session_token: params.credentials.session_token,
        content_sha256_header: params.settings.content_sha256_header,
    })
}

/// The canonical request of SigV4 for `request` signed at `params.time`, with the signer's own
/// headers included. It contains the session token: it is zeroized on drop.
pub fn canonical_request(
    request: &SignableRequest<'_>,
    params: &SigningParams<'_>,
) -> Result<Zeroizing<String>, SignError> {
    let amz_date = AmzDate::new(params.time).ok_or(SignError::TimeOutOfRange)?;
    Canonical::new(request, params, amz_date).map(|c| c.text)
}

/// `AWS4-HMAC-SHA256 \n date \n scope \n hex(sha256(canonical request))`.
fn string_to_sign(amz_date: AmzDate, scope: &Scope<'_>, canonical: &str) -> String {
    let hash = hex32(&Sha256::digest(canonical.as_bytes()).into());
    let mut s = String::with_capacity(ALGORITHM.len() + 16 + 64 + 64 + 4);
    let _ = write!(
        s,
        "{ALGORITHM}\n{}\n{scope}\n{}",
        amz_date.as_str(),
        core::str::from_utf8(&hash).unwrap_or("")
    );
    s
}

struct Scope<'a> {
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

impl fmt::Display for Scope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

struct Canonical {
    text: Zeroizing<String>,
    signed_headers: String,
    payload_hash: String,
}

impl Canonical {
    fn new(
        request: &SignableRequest<'_>,
        params: &SigningParams<'_>,
        amz_date: AmzDate,
    ) -> Result<Canonical, SignError> {
        let settings = params.settings;
        if request.method.is_empty() || !request.method.bytes().all(is_tchar) {
            return Err(SignError::InvalidMethod);
        }
        let scope_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if !scope_ok(params.region) || !scope_ok(params.service) {
            return Err(SignError::InvalidScope);
        }
        let akid = params.credentials.access_key_id;
        if akid.is_empty() || !akid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(SignError::InvalidAccessKeyId);
        }
        if let Some(t) = params.credentials.session_token {
            if t.is_empty() || !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(SignError::InvalidSessionToken);
            }
        }
        let payload_hash = match request.payload {
            Payload::Bytes(body) => {
                let h = hex32(&Sha256::digest(body).into());
                String::from(core::str::from_utf8(&h).unwrap_or(""))
            }
            Payload::Unsigned => String::from(UNSIGNED_PAYLOAD),
            Payload::Precomputed(h) => {
                if h.is_empty() || !h.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                    return Err(SignError::InvalidPayloadHash);
                }
                String::from(h)
            }
        };

        // Headers: (lowercase name, trimmed value), the signer's own added, sorted by name.
        let mut headers: Vec<(String, Zeroizing<String>)> =
            Vec::with_capacity(request.headers.len() + 3);
        let mut has_host = false;
        for (i, (name, value)) in request.headers.iter().enumerate() {
            if name.is_empty() || !name.bytes().all(is_tchar) {
                return Err(SignError::InvalidHeaderName(i));
            }
            if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(SignError::InvalidHeaderValue(i));
            }
            let lower = name.to_ascii_lowercase();
            for reserved in ["authorization", "x-amz-date", "x-amz-security-token"] {
                if lower == reserved {
                    return Err(SignError::ReservedHeader(reserved));
                }
            }
            if settings.content_sha256_header && lower == "x-amz-content-sha256" {
                return Err(SignError::ReservedHeader("x-amz-content-sha256"));
            }
            if UNSIGNED_HEADERS.contains(&lower.as_str()) {
                continue;
            }
            has_host |= lower == "host";
            headers.push((lower, Zeroizing::new(trim_all(value))));
        }
        if !has_host {
            return Err(SignError::MissingHost);
        }
        headers.push((
            String::from("x-amz-date"),
            Zeroizing::new(String::from(amz_date.as_str())),
        ));
        if let Some(token) = params.credentials.session_token {
            headers.push((
                String::from("x-amz-security-token"),
                Zeroizing::new(String::from(token)),
            ));
        }
        if settings.content_sha256_header {
            headers.push((
                String::from("x-amz-content-sha256"),
                Zeroizing::new(payload_hash.clone()),
            ));
        }
        // Stable: repeated headers keep the order they were given in.
        headers.sort_by(|a, b| a.0.cmp(&b.0));

        let mut text = Zeroizing::new(String::with_capacity(
            256 + request.path.len()
                + request.query.len()
                + headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 2)
                    .sum::<usize>(),
        ));
        text.push_str(request.method);
        text.push('\n');
        canonical_path(&mut text, request.path, settings)?;
        text.push('\n');
        canonical_query(&mut text, request.query)?;
        text.push('\n');
        let mut signed_headers = String::with_capacity(headers.len() * 16);
        let mut iter = headers.iter().peekable();
        while let Some((name, value)) = iter.next() {
            text.push_str(name);
            text.push(':');
            text.push_str(value);
            // Repeated header: its values joined with commas.
            while let Some((_, v)) = iter.next_if(|(n, _)| n == name) {
                text.push(',');
                text.push_str(v);
            }
            text.push('\n');
            if !signed_headers.is_empty() {
                signed_headers.push(';');
            }
            signed_headers.push_str(name);
        }
        text.push('\n');
        text.push_str(&signed_headers);
        text.push('\n');
        text.push_str(&payload_hash);
        Ok(Canonical {
            text,
            signed_headers,
            payload_hash,
        })
    }
}

/// Trims spaces at both ends and turns runs of spaces into one.
fn trim_all(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (n, word) in value.split(' ').filter(|w| !w.is_empty()).enumerate() {
        if n > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Characters allowed in a path or query as sent: visible ASCII.
fn is_wire_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b'#'
}

fn canonical_path(out: &mut String, path: &str, settings: Settings) -> Result<(), SignError> {
    if path.is_empty() {
        out.push('/');
        return Ok(());
    }
    if !path.starts_with('/') || !path.bytes().all(|b| is_wire_char(b) && b != b'?') {
        return Err(SignError::InvalidPath);
    }
    let normalized;
    let path = if settings.normalize_path && (path.contains("/.") || path.contains("//")) {
        normalized = remove_dot_segments(path);
        normalized.as_str()
    } else {
        path
    };
    if settings.double_encode_path {
        percent_encode(out, path.as_bytes(), true);
    } else {
        out.push_str(path);
    }
    Ok(())
}

/// RFC 3986 §5.2.4 for an absolute path, also dropping empty segments (repeated slashes).
/// A path that ends in `/`, `/.` or `/..` keeps a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

fn canonical_query(out: &mut String, query: &str) -> Result<(), SignError> {
    if !query.bytes().all(is_wire_char) {
        return Err(SignError::InvalidQuery);
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let mut ek = String::with_capacity(k.len());
        percent_encode(&mut ek, &form_decode(k), false);
        let mut ev = String::with_capacity(v.len());
        percent_encode(&mut ev, &form_decode(v), false);
        pairs.push((ek, ev));
    }
    pairs.sort();
    for (n, (k, v)) in pairs.iter().enumerate() {
        if n > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    Ok(())
}

/// `application/x-www-form-urlencoded` decoding of one name or value: `+` is a space, `%XX` a
/// byte; a `%` not followed by two hex digits stays as it is.
fn form_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => match (
                b.get(i + 1).and_then(|&h| hex_value(h)),
                b.get(i + 2).and_then(|&l| hex_value(l)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodes everything but `A-Z a-z 0-9 - _ . ~` (and `/` when `keep_slash`), with
/// uppercase hex digits.
fn percent_encode(out: &mut String, bytes: &[u8], keep_slash: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().into()
        }
        Err(_) => [0u8; 32],
    }
}

/// Lowercase hex of 32 bytes.
fn hex32(bytes: &[u8; 32]) -> [u8; 64] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    out
}

/// A fixed-size `fmt::Write` target.
struct ByteBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> ByteBuf<N> {
    fn new() -> Self {
        ByteBuf {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl<const N: usize> fmt::Write for ByteBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn params(time: UnixTime, token: Option<&'static str>) -> SigningParams<'static> {
        SigningParams {
            credentials: SigningCredentials {
                access_key_id: AKID,
                secret_access_key: SECRET,
                session_token: token,
            },
            region: "us-east-1",
            service: "iam",
            time,
            settings: Settings::DEFAULT,
        }
    }

    /// 2015-08-30T12:36:00Z, the date of AWS's published IAM ListUsers example.
    const T: UnixTime = UnixTime::from_secs(1_440_938_160);

    #[test]
    fn amz_date() {
        assert_eq!(AmzDate::new(T).unwrap().as_str(), "20150830T123600Z");
        assert_eq!(AmzDate::new(T).unwrap().date(), "20150830");
        assert_eq!(
            AmzDate::new(UnixTime::EPOCH).unwrap().as_str(),
            "19700101T000000Z"
        );
        assert!(AmzDate::new(UnixTime::from_secs(i64::MAX)).is_none());
        assert!(AmzDate::new(UnixTime::from_secs(i64::MIN)).is_none());
    }

    /// AWS's published example: GET https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08
    /// with a form content type, signed in us-east-1 for iam.
    #[test]
    fn known_answer_iam_list_users() {
        let headers = [
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("Host", "iam.amazonaws.com"),
        ];
        let req = SignableRequest {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &headers,
            payload: Payload::Bytes(b""),
        };
        let p = params(T, None);
        let canonical = canonical_request(&req, &p).unwrap();
        assert_eq!(
            canonical.as_str(),
            "GET\n/\nAction=ListUsers&Version=2010-05-08\n\
             content-type:application/x-www-form-urlencoded; charset=utf-8\n\
             host:iam.amazonaws.com\nx-amz-date:20150830T123600Z\n\n\
             content-type;host;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let signed = sign(&req, &p).unwrap();
        assert_eq!(
            signed.signature(),
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
        assert_eq!(
            signed.authorization(),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
        let names: Vec<_> = signed.headers().map(|(n, _)| n).collect();
        assert_eq!(names, ["x-amz-date", "authorization"]);
    }

    #[test]
    fn signing_key_known_answer() {
        // The derived key of AWS's documented example (20150830, us-east-1, iam).
        let key = SigningKey::derive(SECRET, "20150830", "us-east-1", "iam");
        assert_eq!(
            core::str::from_utf8(&hex32(&key.0)).unwrap(),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
        assert_eq!(format!("{key:?}"), "***");
    }

    #[test]
    fn session_token_is_signed_and_sent() {
        let headers = [("host", "sts.amazonaws.com")];
        let req = SignableRequest {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            payload: Payload::Bytes(b"Action=GetCallerIdentity&Version=2011-06-15"),
        };
        let p = params(T, Some("FQoGZXIvYXdzEXAMPLETOKEN"));
        let c = canonical_request(&req, &p).unwrap();
        assert!(c.contains("\nx-amz-security-token:FQoGZXIvYXdzEXAMPLETOKEN\n"));
        assert!(c.contains("\nhost;x-amz-date;x-amz-security-token\n"));
        let signed = sign(&req, &p).unwrap();
        let h: Vec<_> = signed.headers().collect();
        assert_eq!(h[1], ("x-amz-security-token", "FQoGZXIvYXdzEXAMPLETOKEN"));
        let d = format!("{signed:?} {:?}", p.credentials);
        assert!(
            !d.contains("EXAMPLETOKEN") && !d.contains("EXAMPLEKEY"),
            "{d}"
        );
        // Without the token the signature differs.
        assert_ne!(
            sign(&req, &params(T, None)).unwrap().signature(),
            signed.signature()
        );
    }

    #[test]
    fn headers_are_normalized() {
        let headers = [
            ("Host", "example.amazonaws.com"),
            ("My-Header1", "  value1  with   spaces "),
            ("my-header1", "second"),
            ("User-Agent", "not signed"),
            ("X-Amzn-Trace-Id", "not signed"),
            ("A", ""),
        ];
        let req = SignableRequest {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            payload: Payload::Unsigned,
        };
        let c = canonical_request(&req, &params(T, None)).unwrap();
        assert_eq!(
            c.as_str(),
            "GET\n/\n\na:\nhost:example.amazonaws.com\n\
             my-header1:value1 with spaces,second\nx-amz-date:20150830T123600Z\n\n\
             a;host;my-header1;x-amz-date\nUNSIGNED-PAYLOAD"
        );
    }

    #[test]
    fn paths_are_normalized_and_encoded_again() {
        let cases = [
            ("", "/"),
            ("/", "/"),
            ("/a//b/./c/../d", "/a/b/d"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/../x", "/x"),
            ("/a/b/", "/a/b/"),
            ("/my%20file/%C3%BC", "/my%2520file/%25C3%25BC"),
            ("/a+b/$x/(1)/~u", "/a%2Bb/%24x/%281%29/~u"),
        ];
        for (path, want) in cases {
            let mut out = String::new();
            canonical_path(&mut out, path, Settings::DEFAULT).unwrap();
            assert_eq!(out, want, "{path}");
        }
        let mut out = String::new();
        canonical_path(&mut out, "/a//b/./%20", Settings::S3).unwrap();
        assert_eq!(out, "/a//b/./%20");
        for bad in ["a/b", "/a b", "/a?b", "/a#", "/ü"] {
            assert_eq!(
                canonical_path(&mut String::new(), bad, Settings::DEFAULT),
                Err(SignError::InvalidPath),
                "{bad}"
            );
        }
    }

    #[test]
    fn query_is_decoded_encoded_and_sorted() {
        let cases = [
            ("", ""),
            ("b=2&a=1", "a=1&b=2"),
            ("a=2&a=1&A=3", "A=3&a=1&a=2"),
            ("flag&x=", "flag=&x="),
            ("a=b+c&k%20x=v%2fy&&e=%7e", "a=b%20c&e=~&k%20x=v%2Fy"),
            ("p=%zz&q=%", "p=%25zz&q=%25"),
            ("list=a,b;c", "list=a%2Cb%3Bc"),
        ];
        for (q, want) in cases {
            let mut out = String::new();
            canonical_query(&mut out, q).unwrap();
            assert_eq!(out, want, "{q}");
        }
        assert_eq!(
            canonical_query(&mut String::new(), "a=b c"),
            Err(SignError::InvalidQuery)
        );
    }

    #[test]
    fn s3_adds_the_content_hash_header() {
        let headers = [("host", "bucket.s3.amazonaws.com")];
        let req = SignableRequest {
            method: "PUT",
            path: "/key",
            query: "",
            headers: &headers,
            payload: Payload::Bytes(b"hello"),
        };
        let mut p = params(T, None);
        p.service = "s3";
        p.settings = Settings::S3;
        let s = sign(&req, &p).unwrap();
        let h: Vec<_> = s.headers().collect();
        assert_eq!(
            h[1],
            (
                "x-amz-content-sha256",
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            )
        );
        assert!(
            s.authorization()
                .contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date,")
        );
    }

    #[test]
    fn refuses_what_cannot_be_signed() {
        let ok_headers = [("host", "h")];
        let req = |method, headers| SignableRequest {
            method,
            path: "/",
            query: "",
            headers,
            payload: Payload::Bytes(b""),
        };
        let p = params(T, None);
        let e = |r: SignableRequest<'_>, p: &SigningParams<'_>| sign(&r, p).unwrap_err();
        assert_eq!(e(req("", &ok_headers), &p), SignError::InvalidMethod);
        assert_eq!(e(req("G T", &ok_headers), &p), SignError::InvalidMethod);
        assert_eq!(e(req("GET", &[]), &p), SignError::MissingHost);
        assert_eq!(
            e(req("GET", &[("host", "h"), ("x", "a\r\nb")]), &p),
            SignError::InvalidHeaderValue(1)
        );
        assert_eq!(
            e(req("GET", &[("bad name", "v")]), &p),
            SignError::InvalidHeaderName(0)
        );
        assert_eq!(
            e(req("GET", &[("host", "h"), ("Authorization", "x")]), &p),
            SignError::ReservedHeader("authorization")
        );
        assert_eq!(
            e(req("GET", &[("host", "h"), ("X-Amz-Date", "x")]), &p),
            SignError::ReservedHeader("x-amz-date")
        );
        let mut bad = p;
        bad.region = "eu/west";
        assert_eq!(e(req("GET", &ok_headers), &bad), SignError::InvalidScope);
        let mut bad = p;
        bad.credentials.access_key_id = "AKID/x";
        assert_eq!(
            e(req("GET", &ok_headers), &bad),
            SignError::InvalidAccessKeyId
        );
        let mut bad = p;
        bad.credentials.session_token = Some("tok\nen");
        assert_eq!(
            e(req("GET", &ok_headers), &bad),
            SignError::InvalidSessionToken
        );
        let mut bad = p;
        bad.time = UnixTime::from_secs(i64::MAX);
        assert_eq!(e(req("GET", &ok_headers), &bad), SignError::TimeOutOfRange);
        let r = SignableRequest {
            payload: Payload::Precomputed(""),
            ..req("GET", &ok_headers)
        };
        assert_eq!(e(r, &p), SignError::InvalidPayloadHash);
        // Every error says what to do, without a header value.
        let msg = format!("{}", SignError::InvalidHeaderValue(1));
        assert!(msg.contains("#1"), "{msg}");
    }

    #[test]
    fn from_core_credentials() {
        let c = Credentials {
            access_key_id: "ASIAX".into(),
            secret_access_key: crate::Secret::from("s"),
            session_token: crate::Secret::from("t"),
            expiration: UnixTime::EPOCH,
        };
        let sc = SigningCredentials::from(&c);
        assert_eq!(
            (sc.access_key_id, sc.secret_access_key, sc.session_token),
            ("ASIAX", "s", Some("t"))
        );
    }
}
