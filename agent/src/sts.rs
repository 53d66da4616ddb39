//! STS `AssumeRole` for chained roles (SPEC §9): a form-encoded `POST` signed with SigV4
//! (core's [`sigv4`]) with the source role's credentials and session
//! token, over HTTPS with the agent's TLS stack and proxy handling
//! (`connect.rs`), the connection kept alive between refreshes.
//!
//! The XML answer is read with `quick-xml`: `AssumeRoleResponse/AssumeRoleResult/Credentials`
//! on success, `ErrorResponse/Error/Code|Message` otherwise. Errors are classified per §9:
//! `Throttling`, 429 and 5xx are transient (as are network, TLS, timeout and protocol errors);
//! `ExpiredToken` asks for the source role to be refreshed first; `AccessDenied` and every
//! other 4xx are permanent. The lifetime is counted from STS's `Date` header and capped at
//! 3600 s, the limit of chained sessions.
//!
//! The wall clock is needed for the signature (AWS refuses signatures more than five minutes
//! off). A gateway's clock may be wrong; when STS refuses a signature as expired or skewed, the
//! offset to its `Date` header is learned and the call is signed again once with the corrected
//! time, as AWS's SDKs do.

use std::fmt::Write as _;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use embedded_io_adapters::tokio_1::FromTokio;
use iotcred_core::exchange::ErrorClass;
use iotcred_core::sigv4::{self, Payload, Settings, SignableRequest, SigningParams};
use iotcred_core::{
    Credentials, FetchError, HttpError, Issued, Limits, Response, Secret, UnixTime,
};
use quick_xml::events::Event;
use rustls::ClientConfig;
use tokio::time::Instant;
use zeroize::{Zeroize, Zeroizing};

use crate::config::{ChainedRole, Sts};
use crate::connect::{Conn, ConnectError, Connector, Service, closed_by_peer, tls_cause};
use crate::net::HttpsUrl;
use crate::source::{BoxFuture, Obtained, Source, SourceError, SourceFailure};
use crate::state::{RoleHandle, Served};

/// The STS API version sent with every call.
pub const API_VERSION: &str = "2011-06-15";

/// The longest session a chained `AssumeRole` may have (AWS's limit for role chaining).
pub const MAX_CHAINED_SECONDS: u32 = 3600;

/// The shortest session STS issues.
pub const MIN_SECONDS: u32 = 900;

/// STS's `Message` is kept up to this many characters.
const MAX_MESSAGE_CHARS: usize = 256;

/// What one chained role asks STS for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumeRole {
    /// The name of the role whose credentials sign the call (for messages).
    pub source_role: String,
    /// `RoleArn`.
    pub role_arn: String,
    /// `RoleSessionName`.
    pub session_name: String,
    /// `ExternalId`, when the target role's trust policy requires one.
    pub external_id: Option<String>,
    /// `DurationSeconds` (capped to 900–3600).
    pub duration_seconds: u32,
}

impl AssumeRole {
    /// The call of chained role `chained`.
    pub fn new(chained: &ChainedRole) -> AssumeRole {
        AssumeRole {
            source_role: chained.source_role.clone(),
            role_arn: chained.role_arn.clone(),
            session_name: chained.session_name.clone(),
            external_id: chained.external_id.clone(),
            duration_seconds: u32::try_from(chained.duration.as_secs()).unwrap_or(u32::MAX),
        }
    }

    /// The form body of the call.
    pub fn body(&self) -> String {
        let duration = self
            .duration_seconds
            .clamp(MIN_SECONDS, MAX_CHAINED_SECONDS);
        let mut b = String::with_capacity(160 + self.role_arn.len());
        b.push_str("Action=AssumeRole&Version=");
        b.push_str(API_VERSION);
        b.push_str("&RoleArn=");
        form_encode(&mut b, &self.role_arn);
        b.push_str("&RoleSessionName=");
        form_encode(&mut b, &self.session_name);
        let _ = write!(b, "&DurationSeconds={duration}");
        if let Some(id) = &self.external_id {
            b.push_str("&ExternalId=");
            form_encode(&mut b, id);
        }
        b
    }
}

/// Percent-encodes everything but `A-Z a-z 0-9 - _ . ~`.
fn form_encode(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Why an `AssumeRole` call failed. `Display` is one or two lines saying what is wrong and
/// what to do; it never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum StsError {
    /// STS answered with an error.
    #[error("{message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// `ErrorResponse/Error/Code`, when there was one.
        code: Option<String>,
        /// What is wrong and what to do (STS's sanitized `Message` included).
        message: String,
        /// Permanent or transient.
        class: ErrorClass,
        /// From `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// STS says the source role's session token has expired: refresh the source, then retry.
    #[error(
        "STS refused the credentials of source role {source_role} as expired (ExpiredToken): the source role is refreshed first, then the call is retried"
    )]
    ExpiredToken {
        /// The source role.
        source_role: String,
    },
    /// The answer is not a usable `AssumeRoleResponse`.
    #[error("protocol error: {0}; will retry")]
    Protocol(#[from] ProtocolError),
    /// The request could not be signed.
    #[error(
        "cannot sign the AssumeRole request: {0}; check the source role's credentials and [sts] region"
    )]
    Sign(#[from] sigv4::SignError),
    /// The connection could not be set up, or broke at the TLS layer.
    #[error(transparent)]
    Connection(#[from] ConnectError),
    /// The connection failed mid-call.
    #[error("connection to STS at {target} failed: {source}")]
    Io {
        /// host:port.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// No answer in time.
    #[error(
        "no answer from STS at {target} within {secs} s (timeout_seconds); check the network path to [sts] endpoint"
    )]
    Timeout {
        /// host:port.
        target: String,
        /// Timeout.
        secs: u64,
    },
}

impl StsError {
    /// Permanent (fix the configuration or IAM) or transient (retry with backoff).
    pub fn class(&self) -> ErrorClass {
        match self {
            StsError::Rejected { class, .. } => *class,
            StsError::Sign(_) => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        }
    }

    /// STS's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            StsError::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when STS answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            StsError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// STS's error code, when it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            StsError::Rejected { code, .. } => code.as_deref(),
            StsError::ExpiredToken { .. } => Some("ExpiredToken"),
            _ => None,
        }
    }

    /// Whether the connection should be dropped before the next attempt.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            StsError::Connection(_)
                | StsError::Io { .. }
                | StsError::Timeout { .. }
                | StsError::Protocol(ProtocolError::Http(_))
        )
    }
}

/// Why a response is not a usable `AssumeRoleResponse`. Carries no response bytes.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The HTTP framing is wrong.
    #[error("{0}")]
    Http(HttpError),
    /// The body is not well-formed XML.
    #[error("the STS answer is not well-formed XML (byte {0})")]
    Xml(u64),
    /// A field of the credentials is missing or empty.
    #[error("the STS answer lacks AssumeRoleResult/Credentials/{0}")]
    MissingField(&'static str),
    /// `Expiration` is not an RFC 3339 UTC time.
    #[error("the STS answer's Expiration is not an RFC 3339 UTC time ({0})")]
    InvalidExpiration(iotcred_core::TimeError),
    /// The credentials had expired when they arrived.
    #[error("STS issued credentials already expired (expiration {expiration}, STS time {date})")]
    Expired {
        /// `Expiration`.
        expiration: String,
        /// The reference time.
        date: String,
    },
}

/// The STS client of one agent: endpoint, TLS, proxy, one kept-alive connection, and the
/// clock offset learned from STS.
pub struct StsClient {
    endpoint: HttpsUrl,
    region: String,
    host_header: String,
    conn: Connector,
    timeout: Duration,
    /// STS's clock minus the wall clock, in seconds, once a skewed signature was refused.
    skew: AtomicI64,
}

impl std::fmt::Debug for StsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsClient")
            .field("endpoint", &self.endpoint.to_string())
            .field("region", &self.region)
            .field("conn", &self.conn)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why the STS client cannot be set up (a configuration error).
#[derive(Debug, thiserror::Error)]
pub enum StsSetupError {
    /// The trust anchors cannot be loaded.
    #[error("[sts] {0}")]
    Ca(#[from] crate::tls::IdentityError),
}

/// One outcome of a single signed call.
enum Attempt {
    /// A reused connection was closed by STS before any answer: retry on a new one.
    Stale,
    /// STS refused the signature's time and sent its own: sign again with that offset.
    Skewed(i64),
    Done(Result<Obtained, StsError>),
}

impl StsClient {
    /// A client for `[sts]` (endpoint, signing region, trust anchors — default: the built-in
    /// Amazon roots — and proxy, as parsed at load time); `timeout` bounds each call.
    pub fn new(sts: &Sts, timeout: Duration) -> Result<StsClient, StsSetupError> {
        let roots = crate::tls::root_store(sts.ca.as_deref())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| StsSetupError::Ca(e.into()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.enable_sni = true;
        let server = sts.endpoint.server();
        let addr = server.addr();
        let host = if addr.host().contains(':') {
            format!("[{}]", addr.host())
        } else {
            addr.host().to_string()
        };
        let host_header = if addr.port() == 443 {
            host
        } else {
            format!("{host}:{}", addr.port())
        };
        Ok(StsClient {
            endpoint: sts.endpoint.clone(),
            region: sts.region.clone(),
            host_header,
            conn: Connector::new(
                Service::Sts,
                server.clone(),
                Arc::new(cfg),
                sts.proxy.clone(),
            ),
            timeout,
            skew: AtomicI64::new(0),
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &HttpsUrl {
        &self.endpoint
    }

    /// Drops the kept-alive connection.
    pub fn reset(&self) {
        self.conn.reset();
    }

    /// One `AssumeRole` call signed with `source` (the source role's current credentials).
    /// Reuses the kept-alive connection when there is one; on a refused skewed signature, signs
    /// again once with STS's time.
    pub async fn assume_role(
        &self,
        source: &Credentials,
        role: &AssumeRole,
    ) -> Result<Obtained, StsError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let body = role.body();
        let mut skew_retry = true;
        loop {
            let outcome = match self.conn.take_idle() {
                Some(conn) => match self.call(conn, source, role, &body, deadline, true).await {
                    Attempt::Stale => self.call_fresh(source, role, &body, deadline).await,
                    other => other,
                },
                None => self.call_fresh(source, role, &body, deadline).await,
            };
            match outcome {
                Attempt::Done(result) => {
                    return result.map(|mut f| {
                        f.latency = f.arrived.saturating_duration_since(start);
                        f
                    });
                }
                Attempt::Skewed(skew) if skew_retry => {
                    skew_retry = false;
                    tracing::warn!(
                        skew_s = skew,
                        "STS refused the request time: the system clock is {} s off STS's; signing again with STS's time (set the clock: NTP/RTC)",
                        -skew
                    );
                    self.skew.store(skew, Ordering::Relaxed);
                }
                Attempt::Skewed(_) | Attempt::Stale => {
                    return Err(StsError::Rejected {
                        status: 403,
                        code: Some("SignatureDoesNotMatch".into()),
                        message: "STS refused the request time even after correcting for its clock: set the system clock (NTP/RTC)".into(),
                        class: ErrorClass::Transient,
                        retry_after: None,
                    });
                }
            }
        }
    }

    async fn call_fresh(
        &self,
        source: &Credentials,
        role: &AssumeRole,
        body: &str,
        deadline: Instant,
    ) -> Attempt {
        let conn = match tokio::time::timeout_at(deadline, self.conn.connect()).await {
            Err(_) => return Attempt::Done(Err(self.timeout_error())),
            Ok(Err(e)) => return Attempt::Done(Err(e.into())),
            Ok(Ok(c)) => c,
        };
        self.call(conn, source, role, body, deadline, false).await
    }

    fn timeout_error(&self) -> StsError {
        StsError::Timeout {
            target: self.conn.target(),
            secs: self.timeout.as_secs(),
        }
    }

    /// The request bytes (they hold the session token: zeroized on drop).
    fn request(
        &self,
        source: &Credentials,
        body: &str,
        wall: UnixTime,
    ) -> Result<Zeroizing<Vec<u8>>, StsError> {
        const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
        let headers = [
            ("Host", self.host_header.as_str()),
            ("Content-Type", CONTENT_TYPE),
        ];
        let signable = SignableRequest {
            method: "POST",
            path: self.endpoint.path(),
            query: "",
            headers: &headers,
            payload: Payload::Bytes(body.as_bytes()),
        };
        let time = UnixTime::from_secs(
            wall.as_secs()
                .saturating_add(self.skew.load(Ordering::Relaxed)),
        );
        let params = SigningParams {
            credentials: source.into(),
            region: &self.region,
            service: "sts",
            time,
            settings: Settings::DEFAULT,
        };
        let signed = sigv4::sign(&signable, &params)?;
        let mut head = Zeroizing::new(String::with_capacity(1024 + body.len()));
        let _ = write!(
            head,
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nAccept: text/xml\r\n",
            self.endpoint.path(),
            self.host_header,
            crate::USER_AGENT,
            body.len()
        );
        for (name, value) in signed.headers() {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        head.push_str(body);
        let mut bytes = Zeroizing::new(Vec::new());
        bytes.extend_from_slice(head.as_bytes());
        Ok(bytes)
    }

    async fn call(
        &self,
        conn: Conn,
        source: &Credentials,
        role: &AssumeRole,
        body: &str,
        deadline: Instant,
        reused: bool,
    ) -> Attempt {
        let wall_now = UnixTime::now();
        let request = match self.request(source, body, wall_now) {
            Ok(r) => r,
            Err(e) => return Attempt::Done(Err(e)),
        };
        let mut stream = FromTokio::new(conn);
        let result = tokio::time::timeout_at(
            deadline,
            iotcred_core::asynch::round_trip_bytes(&mut stream, &request, Limits::DEFAULT),
        )
        .await;
        let arrived = Instant::now();
        let arrived_wall = UnixTime::now();
        let target = self.conn.target();
        let response = match result {
            Err(_) => return Attempt::Done(Err(self.timeout_error())),
            Ok(Ok(r)) => r,
            Ok(Err(FetchError::Exchange(iotcred_core::ExchangeError::Http(
                HttpError::ClosedBeforeResponse,
            )))) if reused => return Attempt::Stale,
            Ok(Err(FetchError::Exchange(iotcred_core::ExchangeError::Http(e)))) => {
                return Attempt::Done(Err(ProtocolError::Http(e).into()));
            }
            Ok(Err(FetchError::Io(e))) => {
                if reused && closed_by_peer(&e) {
                    return Attempt::Stale;
                }
                if tls_cause(&e).is_some() {
                    let failure = ConnectError::from(self.conn.tls_failure(e));
                    return Attempt::Done(Err(failure.into()));
                }
                return Attempt::Done(Err(StsError::Io { target, source: e }));
            }
            Ok(Err(_)) => {
                let source = io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the connection stopped accepting data",
                );
                return Attempt::Done(Err(StsError::Io { target, source }));
            }
        };
        if response.keep_alive {
            self.conn.keep_idle(stream.into_inner());
        }
        match interpret(&response, arrived_wall, source, role, &self.region) {
            Interpreted::Issued(issued) => Attempt::Done(Ok(Obtained {
                credentials: issued.credentials,
                lifetime: issued.lifetime,
                arrived,
                latency: Duration::ZERO,
            })),
            Interpreted::Skewed(s) => Attempt::Skewed(s),
            Interpreted::Error(e) => Attempt::Done(Err(e)),
        }
    }
}

enum Interpreted {
    Issued(Issued),
    /// STS refused the signature's time; its clock minus ours.
    Skewed(i64),
    Error(StsError),
}

/// Turns a complete STS response into credentials or a classified error.
fn interpret(
    response: &Response,
    wall_now: UnixTime,
    source: &Credentials,
    role: &AssumeRole,
    region: &str,
) -> Interpreted {
    let doc = match parse_answer(&response.body) {
        Ok(doc) => doc,
        Err(e) if response.status == 200 => return Interpreted::Error(e.into()),
        Err(_) => Answer::default(),
    };
    if response.status != 200 {
        let code = doc.error_code.clone();
        let message = doc
            .error_message
            .as_deref()
            .map(|m| sanitize_message(m, source))
            .unwrap_or_default();
        let skew = response
            .date
            .map(|d| d.as_secs().saturating_sub(wall_now.as_secs()));
        let time_refused = matches!(
            code.as_deref(),
            Some("RequestExpired" | "RequestTimeTooSkewed" | "InvalidSignatureException")
        ) || (code.as_deref() == Some("SignatureDoesNotMatch")
            && message.contains("Signature expired"));
        if let Some(skew) = skew.filter(|s| time_refused && s.abs() > 60) {
            return Interpreted::Skewed(skew);
        }
        if code.as_deref() == Some("ExpiredToken") {
            return Interpreted::Error(StsError::ExpiredToken {
                source_role: role.source_role.clone(),
            });
        }
        let retry_after = response.retry_after.map(|ra| match ra {
            iotcred_core::RetryAfter::Seconds(s) => Duration::from_secs(u64::from(s)),
            iotcred_core::RetryAfter::Date(d) => Duration::from_secs(
                u64::try_from(
                    d.as_secs()
                        .saturating_sub(response.date.unwrap_or(wall_now).as_secs()),
                )
                .unwrap_or(0),
            ),
        });
        let status = response.status;
        let class = match (status, code.as_deref()) {
            (_, Some("Throttling" | "ThrottlingException" | "RequestThrottled")) => {
                ErrorClass::Transient
            }
            (429, _) | (500..=599, _) => ErrorClass::Transient,
            (400..=499, _) => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        };
        let message = explain(status, code.as_deref(), &message, role, region);
        return Interpreted::Error(StsError::Rejected {
            status,
            code,
            message,
            class,
            retry_after,
        });
    }
    match doc.into_credentials(response.date.unwrap_or(wall_now)) {
        Ok(issued) => Interpreted::Issued(Issued {
            server_date: response.date,
            ..issued
        }),
        Err(e) => Interpreted::Error(e.into()),
    }
}

/// One or two lines for an STS error, naming the fix where the code tells it.
fn explain(
    status: u16,
    code: Option<&str>,
    message: &str,
    role: &AssumeRole,
    region: &str,
) -> String {
    let arn = &role.role_arn;
    let src = &role.source_role;
    let said = if message.is_empty() {
        String::new()
    } else {
        format!(": {message:?}")
    };
    let code_s = code.unwrap_or("no error code");
    match code {
        Some("AccessDenied") => format!(
            "STS denied AssumeRole on {arn} (AccessDenied{said}): the trust policy of {arn} must allow sts:AssumeRole by the IAM role behind source role {src} (with sts:ExternalId when external_id is set), and that role's permissions must allow sts:AssumeRole on {arn}"
        ),
        Some("InvalidClientTokenId" | "UnrecognizedClientException") => format!(
            "STS does not recognise the credentials of source role {src} ({code_s}{said}): check that [sts] endpoint is in the same AWS partition as the IoT endpoint and that STS is activated in region {region}"
        ),
        Some("SignatureDoesNotMatch" | "IncompleteSignature") => format!(
            "STS refused the request signature ({code_s}{said}): check that [sts] region ({region}) is the region of [sts] endpoint, and the system clock"
        ),
        Some("RegionDisabledException") => format!(
            "STS is not activated in region {region} ({code_s}{said}): activate it in the account's IAM settings, or set [sts] endpoint to an activated region"
        ),
        Some("ValidationError" | "InvalidParameterValue" | "MalformedInput" | "InvalidAction") => {
            format!(
                "STS refused the AssumeRole parameters ({code_s}{said}): check assume_role_arn ({arn}), session_name (2-64 characters of A-Z a-z 0-9 + = , . @ -), external_id (2-1224 characters) and duration_seconds (900-3600)"
            )
        }
        Some("Throttling" | "ThrottlingException" | "RequestThrottled") => {
            format!("STS is throttling ({code_s}{said}): will retry with backoff")
        }
        _ if status == 429 => format!("STS is throttling (429{said}): will retry with backoff"),
        _ if status >= 500 => {
            format!("STS failed (HTTP {status}, {code_s}{said}): will retry with backoff")
        }
        _ if (400..500).contains(&status) => format!(
            "STS refused AssumeRole on {arn} (HTTP {status}, {code_s}{said}): check the chained role's assume_role_arn, session_name and external_id, and the IAM policies"
        ),
        _ => format!("STS answered HTTP {status} ({code_s}{said}): will retry with backoff"),
    }
}

/// STS's message without control characters, at most [`MAX_MESSAGE_CHARS`] characters, cut
/// before any echo of the canonical request, and dropped entirely if it contains a secret of
/// the source credentials.
fn sanitize_message(m: &str, source: &Credentials) -> String {
    let m = ["The Canonical String", "The String-to-Sign", "\n"]
        .iter()
        .fold(m, |m, cut| m.split(cut).next().unwrap_or(m));
    let secret = source.secret_access_key.expose();
    let token = source.session_token.expose();
    if (!secret.is_empty() && m.contains(secret)) || (!token.is_empty() && m.contains(token)) {
        return "(message withheld: it contained a secret)".into();
    }
    m.chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect::<String>()
        .trim()
        .to_string()
}

/// What an STS answer body says: the fields of `AssumeRoleResponse/AssumeRoleResult/Credentials`
/// and of `ErrorResponse/Error` (any of them may be missing). `Debug` prints no secret.
#[derive(Debug, Default)]
pub struct Answer {
    /// `Credentials/AccessKeyId`.
    pub access_key_id: Option<String>,
    /// `Credentials/SecretAccessKey`.
    pub secret_access_key: Option<Secret>,
    /// `Credentials/SessionToken`.
    pub session_token: Option<Secret>,
    /// `Credentials/Expiration`, as written.
    pub expiration: Option<String>,
    /// `Error/Code`.
    pub error_code: Option<String>,
    /// `Error/Message` (unsanitized: it may quote the request).
    pub error_message: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    AccessKeyId,
    SecretAccessKey,
    SessionToken,
    Expiration,
    ErrorCode,
    ErrorMessage,
}

impl Field {
    /// The field an element at `path` (local names from the root) holds, if any.
    fn at(path: &[Vec<u8>]) -> Option<Field> {
        let names: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
        match names.as_slice() {
            [
                b"AssumeRoleResponse",
                b"AssumeRoleResult",
                b"Credentials",
                leaf,
            ] => match *leaf {
                b"AccessKeyId" => Some(Field::AccessKeyId),
                b"SecretAccessKey" => Some(Field::SecretAccessKey),
                b"SessionToken" => Some(Field::SessionToken),
                b"Expiration" => Some(Field::Expiration),
                _ => None,
            },
            [.., b"Error", b"Code"] => Some(Field::ErrorCode),
            [.., b"Error", b"Message"] => Some(Field::ErrorMessage),
            _ => None,
        }
    }
}

/// Reads an STS answer body (well-formed XML; namespaces are ignored, local names only). Text is
/// accumulated in a buffer that is wiped after each field: the secret fields go straight into
/// [`Secret`]s.
pub fn parse_answer(body: &[u8]) -> Result<Answer, ProtocolError> {
    const MAX_DEPTH: usize = 32;
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut doc = Answer::default();
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<Field> = None;
    // Sized for the whole body, so it never reallocates (and leaves no copy behind).
    let mut text = Zeroizing::new(String::with_capacity(body.len()));
    let err = |reader: &quick_xml::Reader<&[u8]>| ProtocolError::Xml(reader.error_position());
    loop {
        match reader.read_event().map_err(|_| err(&reader))? {
            Event::Start(e) => {
                if path.len() >= MAX_DEPTH {
                    return Err(err(&reader));
                }
                path.push(e.local_name().as_ref().to_vec());
                current = Field::at(&path);
                text.zeroize();
            }
            Event::End(_) => {
                if let Some(field) = current.take() {
                    let value = text.trim();
                    match field {
                        Field::AccessKeyId => doc.access_key_id = Some(value.to_string()),
                        Field::SecretAccessKey => doc.secret_access_key = Some(value.into()),
                        Field::SessionToken => doc.session_token = Some(value.into()),
                        Field::Expiration => doc.expiration = Some(value.to_string()),
                        Field::ErrorCode => doc.error_code = Some(value.to_string()),
                        Field::ErrorMessage => doc.error_message = Some(value.to_string()),
                    }
                    text.zeroize();
                }
                path.pop();
            }
            Event::Text(t) if current.is_some() => {
                let s = t.decode().map_err(|_| err(&reader))?;
                text.push_str(&s);
            }
            Event::CData(t) if current.is_some() => {
                let s = t.decode().map_err(|_| err(&reader))?;
                text.push_str(&s);
            }
            Event::GeneralRef(r) if current.is_some() => {
                let c = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => {
                        let name = r.decode().map_err(|_| err(&reader))?;
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| err(&reader))?
                            .to_string()
                    }
                    Err(_) => return Err(err(&reader)),
                };
                text.push_str(&c);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !path.is_empty() {
        return Err(err(&reader));
    }
    Ok(doc)
}

impl Answer {
    /// The credentials of a success answer, with their lifetime counted from `reference` (STS's
    /// `Date`, else the wall clock) and capped at 3600 s.
    pub fn into_credentials(self, reference: UnixTime) -> Result<Issued, ProtocolError> {
        let access_key_id = self
            .access_key_id
            .filter(|s| !s.is_empty())
            .ok_or(ProtocolError::MissingField("AccessKeyId"))?;
        let secret_access_key = self
            .secret_access_key
            .filter(|s| !s.is_empty())
            .ok_or(ProtocolError::MissingField("SecretAccessKey"))?;
        let session_token = self
            .session_token
            .filter(|s| !s.is_empty())
            .ok_or(ProtocolError::MissingField("SessionToken"))?;
        let expiration_text = self
            .expiration
            .ok_or(ProtocolError::MissingField("Expiration"))?;
        let expiration =
            UnixTime::parse_rfc3339(&expiration_text).map_err(ProtocolError::InvalidExpiration)?;
        let lifetime = expiration
            .checked_duration_since(reference)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| ProtocolError::Expired {
                expiration: expiration.rfc3339().to_string(),
                date: reference.rfc3339().to_string(),
            })?;
        Ok(Issued {
            credentials: Credentials {
                access_key_id,
                secret_access_key,
                session_token,
                expiration,
            },
            lifetime: lifetime.min(Duration::from_secs(u64::from(MAX_CHAINED_SECONDS))),
            server_date: None,
        })
    }
}

/// Why a chained role could not obtain credentials.
#[derive(Debug, thiserror::Error)]
pub enum ChainedError {
    /// The STS call failed.
    #[error(transparent)]
    Sts(#[from] StsError),
    /// The source role holds no credentials that may be used now.
    #[error("source role {source_role} has no valid credentials{}; will retry once it has", reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    SourceUnavailable {
        /// The source role.
        source_role: String,
        /// The source role's last error, if it has one.
        reason: Option<Arc<str>>,
    },
    /// STS refused the source role's credentials as expired, and again after they were
    /// refreshed.
    #[error(
        "STS refused the credentials of source role {0} as expired (ExpiredToken), also after refreshing them: check the system clock and [sts] endpoint; will retry"
    )]
    StillExpired(String),
}

impl ChainedError {
    /// Permanent or transient.
    pub fn class(&self) -> ErrorClass {
        match self {
            ChainedError::Sts(e) => e.class(),
            ChainedError::SourceUnavailable { .. } | ChainedError::StillExpired(_) => {
                ErrorClass::Transient
            }
        }
    }

    /// STS's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ChainedError::Sts(e) => e.retry_after(),
            _ => None,
        }
    }
}

impl SourceFailure for ChainedError {
    fn class(&self) -> ErrorClass {
        ChainedError::class(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        ChainedError::retry_after(self)
    }
}

/// A chained role (SPEC §9): `AssumeRole` signed with the current credentials of another role,
/// read from that role's published state. When STS answers `ExpiredToken`, the source role is
/// asked to refresh now, and the call is retried once with its new credentials.
#[derive(Debug)]
pub struct ChainedSource {
    client: Arc<StsClient>,
    request: AssumeRole,
    source: RoleHandle,
    wait: Duration,
}

impl ChainedSource {
    /// `request` through `client`, signed with the credentials of `source`; waits at most
    /// `wait` for the source role's credentials (`timeout_seconds`).
    pub fn new(
        client: Arc<StsClient>,
        request: AssumeRole,
        source: RoleHandle,
        wait: Duration,
    ) -> ChainedSource {
        ChainedSource {
            client,
            request,
            source,
            wait,
        }
    }

    async fn obtain(&self) -> Result<Obtained, ChainedError> {
        let served = self
            .source
            .credentials(self.wait)
            .await
            .map_err(|_| self.unavailable())?;
        match self
            .client
            .assume_role(&served.credentials, &self.request)
            .await
        {
            Err(StsError::ExpiredToken { .. }) => {
                tracing::info!(
                    role = %self.source.name,
                    "STS answered ExpiredToken: refreshing source role {} before retrying once",
                    self.source.name
                );
                self.source.refresh_now();
                let fresh = self.replaced(&served.credentials.access_key_id).await?;
                match self
                    .client
                    .assume_role(&fresh.credentials, &self.request)
                    .await
                {
                    Err(StsError::ExpiredToken { .. }) => {
                        Err(ChainedError::StillExpired(self.source.name.to_string()))
                    }
                    other => Ok(other?),
                }
            }
            other => Ok(other?),
        }
    }

    /// Waits (at most `wait`) for the source role to hold servable credentials other than those
    /// with `old_key`; gives up early when its refresh fails.
    async fn replaced(&self, old_key: &str) -> Result<Served, ChainedError> {
        let deadline = Instant::now() + self.wait;
        let mut rx = self.source.watch();
        let failure_before = rx.borrow().last_failure;
        loop {
            {
                let state = rx.borrow_and_update();
                let now = self.source.now();
                if let Some(served) = state
                    .servable(now, UnixTime::now())
                    .filter(|s| s.credentials.access_key_id != old_key)
                {
                    return Ok(served);
                }
                if state.last_failure.is_some() && state.last_failure != failure_before {
                    return Err(ChainedError::SourceUnavailable {
                        source_role: self.source.name.to_string(),
                        reason: state.last_error.clone(),
                    });
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(self.unavailable()),
            }
        }
    }

    fn unavailable(&self) -> ChainedError {
        ChainedError::SourceUnavailable {
            source_role: self.source.name.to_string(),
            reason: self.source.state().last_error,
        }
    }
}

impl Source for ChainedSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Obtained, SourceError>> {
        Box::pin(async move { Ok(self.obtain().await?) })
    }
}

/// The source of a chained role whose source role or `[sts]` is missing: never the case for a
/// configuration that loaded (it checks both), so this only keeps the wiring total. Every fetch
/// fails, saying so.
#[derive(Debug)]
pub struct MissingSource {
    source_role: String,
}

impl MissingSource {
    /// For a chained role whose source is `source_role`.
    pub fn new(source_role: &str) -> MissingSource {
        MissingSource {
            source_role: source_role.to_string(),
        }
    }
}

impl Source for MissingSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Obtained, SourceError>> {
        Box::pin(async move {
            Err(ChainedError::SourceUnavailable {
                source_role: self.source_role.clone(),
                reason: Some("the role or [sts] is not configured".into()),
            }
            .into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role() -> AssumeRole {
        AssumeRole {
            source_role: "default".into(),
            role_arn: "arn:aws:iam::210987654321:role/GatewayAnalytics".into(),
            session_name: "gateway-0042".into(),
            external_id: Some("ext id/1".into()),
            duration_seconds: 7200,
        }
    }

    fn source() -> Credentials {
        Credentials {
            access_key_id: "ASIASOURCE".into(),
            secret_access_key: Secret::from("SOURCESECRETKEY"),
            session_token: Secret::from("SOURCETOKEN"),
            expiration: UnixTime::from_secs(2_000_000_000),
        }
    }

    fn response(status: u16, date: Option<i64>, body: &str) -> Response {
        Response {
            status,
            date: date.map(UnixTime::from_secs),
            retry_after: None,
            keep_alive: true,
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    const OK: &str = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <SourceIdentity>dev</SourceIdentity>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::210987654321:assumed-role/GatewayAnalytics/gateway-0042</Arn>
      <AssumedRoleId>AROA3XFRBF535PLBIFPI4:gateway-0042</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>IQoJb3JpZ2luX2Vj&#x2B;TOKEN/x==</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2026-01-01T13:00:00Z</Expiration>
      <AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <PackedPolicySize>6</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#;

    fn error_body(code: &str, message: &str) -> String {
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>r</RequestId></ErrorResponse>"
        )
    }

    fn interp(r: &Response) -> Interpreted {
        interpret(
            r,
            UnixTime::from_secs(1_767_268_800),
            &source(),
            &role(),
            "eu-west-1",
        )
    }

    fn error(r: &Response) -> StsError {
        match interp(r) {
            Interpreted::Error(e) => e,
            Interpreted::Issued(_) => panic!("issued"),
            Interpreted::Skewed(_) => panic!("skewed"),
        }
    }

    #[test]
    fn body_is_form_encoded_and_capped() {
        assert_eq!(
            role().body(),
            "Action=AssumeRole&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A210987654321%3Arole%2FGatewayAnalytics&RoleSessionName=gateway-0042&DurationSeconds=3600&ExternalId=ext%20id%2F1"
        );
        let mut r = role();
        r.external_id = None;
        r.duration_seconds = 60;
        assert!(r.body().ends_with("&DurationSeconds=900"));
    }

    #[test]
    fn success_lifetime_from_date_and_capped() {
        // Date 12:10 → 50 minutes.
        let r = response(200, Some(1_767_269_400), OK);
        let Interpreted::Issued(i) = interp(&r) else {
            panic!("not issued")
        };
        assert_eq!(i.credentials.access_key_id, "ASIAIOSFODNN7EXAMPLE");
        assert_eq!(
            i.credentials.session_token.expose(),
            "IQoJb3JpZ2luX2Vj+TOKEN/x=="
        );
        assert_eq!(
            i.credentials.secret_access_key.expose(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
        );
        assert_eq!(i.lifetime, Duration::from_secs(3000));
        assert_eq!(i.server_date, Some(UnixTime::from_secs(1_767_269_400)));
        // Without Date, the wall clock (12:00) → 1 h; an expiration further out is capped.
        let far = OK.replace("2026-01-01T13:00:00Z", "2026-01-01T20:00:00Z");
        let Interpreted::Issued(i) = interp(&response(200, None, &far)) else {
            panic!("not issued")
        };
        assert_eq!(i.lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn malformed_success_is_a_transient_protocol_error() {
        for (body, want) in [
            ("<AssumeRoleResponse><AssumeRoleResult>", "not well-formed"),
            (
                &*OK.replace("<AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>", ""),
                "AccessKeyId",
            ),
            (&*OK.replace("2026-01-01T13:00:00Z", "tomorrow"), "RFC 3339"),
            (
                &*OK.replace("2026-01-01T13:00:00Z", "2025-01-01T13:00:00Z"),
                "expired",
            ),
            ("", "SecretAccessKey"),
        ] {
            let e = error(&response(200, None, body));
            assert_eq!(e.class(), ErrorClass::Transient);
            let m = e.to_string();
            assert!(
                m.contains(want) || (want == "SecretAccessKey" && m.contains("lacks")),
                "{m}"
            );
        }
    }

    #[test]
    fn classification() {
        let cases = [
            (403, "AccessDenied", ErrorClass::Permanent, "trust policy"),
            (400, "Throttling", ErrorClass::Transient, "throttling"),
            (500, "InternalFailure", ErrorClass::Transient, "retry"),
            (503, "ServiceUnavailable", ErrorClass::Transient, "retry"),
            (
                400,
                "ValidationError",
                ErrorClass::Permanent,
                "session_name",
            ),
            (
                403,
                "InvalidClientTokenId",
                ErrorClass::Permanent,
                "partition",
            ),
            (
                403,
                "RegionDisabledException",
                ErrorClass::Permanent,
                "activate",
            ),
            (404, "Whatever", ErrorClass::Permanent, "check"),
        ];
        for (status, code, class, hint) in cases {
            let e = error(&response(status, None, &error_body(code, "m")));
            assert_eq!((e.class(), e.code()), (class, Some(code)), "{code}");
            assert!(e.to_string().contains(hint), "{e}");
        }
        // A 5xx without XML is still transient; a 4xx without XML permanent.
        assert_eq!(
            error(&response(502, None, "bad gateway")).class(),
            ErrorClass::Transient
        );
        assert_eq!(
            error(&response(400, None, "")).class(),
            ErrorClass::Permanent
        );
        let e = error(&response(400, None, &error_body("ExpiredToken", "expired")));
        assert!(matches!(e, StsError::ExpiredToken { .. }), "{e}");
        assert!(e.to_string().contains("source role default"));
    }

    #[test]
    fn skewed_signatures_are_learned() {
        let body = error_body(
            "SignatureDoesNotMatch",
            "Signature expired: 20260101T120000Z is now earlier than 20260101T121000Z",
        );
        // STS is 10 minutes ahead.
        match interp(&response(403, Some(1_767_269_400), &body)) {
            Interpreted::Skewed(s) => assert_eq!(s, 600),
            _ => panic!("not skewed"),
        }
        // Without a Date, or with a close one, it is an ordinary permanent rejection.
        assert_eq!(
            error(&response(403, None, &body)).class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            error(&response(403, Some(1_767_268_830), &body)).class(),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn messages_never_carry_secrets() {
        let body = error_body(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match. The Canonical String for this request should have been 'POST / x-amz-security-token:SOURCETOKEN'",
        );
        let e = error(&response(403, None, &body)).to_string();
        assert!(
            !e.contains("SOURCETOKEN") && !e.contains("Canonical"),
            "{e}"
        );
        let body = error_body("AccessDenied", "leaked SOURCESECRETKEY here");
        let e = error(&response(403, None, &body)).to_string();
        assert!(
            !e.contains("SOURCESECRETKEY") && e.contains("withheld"),
            "{e}"
        );
        let long = "x".repeat(1000);
        let e = error(&response(403, None, &error_body("AccessDenied", &long))).to_string();
        assert!(e.len() < 700, "{}", e.len());
    }
}
