//! Turning a response into credentials or a classified error.

/// How a failed exchange should be retried (SPEC §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 400, 401, 403, 404: configuration or identity is wrong. Retry slowly; tell the user what to fix.
    Permanent,
    /// 429, 5xx, connection, TLS, timeout and protocol errors. Retry with backoff.
    Transient,
}

use alloc::string::String;
use core::fmt;

use crate::credentials::{Credentials, Issued, SuccessBody};
use crate::http::{HttpError, Limits, Response, RetryAfter};
use crate::time::{Duration, TimeError, UnixTime};

/// The provider's `{"message"}` is kept up to this many characters.
pub const MAX_MESSAGE_CHARS: usize = 256;

/// Why an exchange did not yield credentials.
///
/// `Display` says what is wrong and what to do, and never includes a secret (JSON errors carry
/// only a position, never the offending text).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The provider answered with a status other than 200.
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The provider's `{"message": "…"}`, at most [`MAX_MESSAGE_CHARS`] characters, control
        /// characters removed.
        message: Option<String>,
        /// From `Retry-After`: the delay in seconds, or its date minus the provider's `Date`
        /// (or the wall clock without one), never negative.
        retry_after: Option<Duration>,
    },
    /// The response could not be parsed as HTTP.
    Http(HttpError),
    /// The 200 body is not the expected JSON (position of the error in the body).
    MalformedJson {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
    /// The 200 body lacks a field (or it is `null` or empty).
    MissingField(&'static str),
    /// `expiration` is not an RFC 3339 UTC time.
    InvalidExpiration(TimeError),
    /// The credentials had no lifetime left when they arrived.
    Expired {
        /// The credentials' expiration.
        expiration: UnixTime,
        /// The provider's `Date`, or the wall clock when there was none.
        reference: UnixTime,
    },
}

impl ExchangeError {
    /// Permanent for 400, 401, 403 and 404; transient for everything else (SPEC §2).
    pub fn class(&self) -> ErrorClass {
        match self {
            ExchangeError::Rejected {
                status: 400 | 401 | 403 | 404,
                ..
            } => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        }
    }

    /// The HTTP status of a rejection.
    pub fn status(&self) -> Option<u16> {
        match self {
            ExchangeError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The provider's message of a rejection (sanitized).
    pub fn message(&self) -> Option<&str> {
        match self {
            ExchangeError::Rejected { message, .. } => message.as_deref(),
            _ => None,
        }
    }

    /// The provider's `Retry-After`, as a delay.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ExchangeError::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// An [`ExchangeError`] told with what the device asked for: the thing name and role alias
/// fill in the hint for a rejection. From [`ExchangeError::explain`]; `Display` only.
#[derive(Clone, Copy, Debug)]
pub struct Explained<'a> {
    error: &'a ExchangeError,
    thing: Option<&'a str>,
    alias: Option<&'a str>,
}

impl ExchangeError {
    /// This error told with the request's thing name and role alias, so the hint for a
    /// rejection names them ([`Display`](fmt::Display) of the error alone names neither).
    pub fn explain<'a>(
        &'a self,
        thing: Option<&'a crate::ThingName>,
        alias: &'a crate::RoleAlias,
    ) -> Explained<'a> {
        Explained {
            error: self,
            thing: thing.map(crate::ThingName::as_str),
            alias: Some(alias.as_str()),
        }
    }
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Explained {
            error: self,
            thing: None,
            alias: None,
        }
        .fmt(f)
    }
}

/// The one table of what each rejection status means and what to do about it (SPEC §2):
/// `message` is the provider's own, shown quoted after the status.
fn explain_status(
    f: &mut fmt::Formatter<'_>,
    status: u16,
    message: Option<&str>,
    thing: Option<&str>,
    alias: Option<&str>,
) -> fmt::Result {
    let alias = alias.unwrap_or("(the configured role_alias)");
    let said = Said(message);
    match status {
        400 => write!(
            f,
            "the credentials provider refused the request (400){said}: check thing_name and duration_seconds (900-43200, at most the role alias's credentialDurationSeconds)"
        ),
        401 => write!(
            f,
            "the credentials provider refused the device certificate (401){said}: check that the certificate is registered and ACTIVE in AWS IoT"
        ),
        403 => write!(
            f,
            "the credentials provider denied access (403){said}: the certificate is not attached to thing {}, or the IoT policy denies iot:AssumeRoleWithCertificate for role alias {alias}",
            thing.unwrap_or("(none configured)")
        ),
        404 => write!(
            f,
            "role alias {alias} not found (404){said}: create it (aws iot create-role-alias) or fix role_alias, and check that endpoint is the iot:CredentialProvider endpoint of the right account and region"
        ),
        429 => write!(
            f,
            "the credentials provider is throttling (429){said}: will retry with backoff"
        ),
        500..=599 => write!(
            f,
            "the credentials provider failed ({status}){said}: will retry with backoff"
        ),
        _ => write!(
            f,
            "the credentials provider answered HTTP {status}{said}: unexpected status; will retry with backoff"
        ),
    }
}

/// The provider's message, quoted after a status: ` ("…")`, or nothing.
struct Said<'a>(Option<&'a str>);

impl fmt::Display for Said<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(m) => write!(f, " ({m:?})"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Explained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error {
            ExchangeError::Rejected {
                status, message, ..
            } => explain_status(f, *status, message.as_deref(), self.thing, self.alias),
            other if self.alias.is_some() => write!(
                f,
                "the credentials provider's answer is unusable: {}",
                Explained {
                    error: other,
                    thing: None,
                    alias: None,
                }
            ),
            ExchangeError::Http(e) => write!(f, "protocol error: {e}; will retry"),
            ExchangeError::MalformedJson { line, column } => write!(
                f,
                "protocol error: the credentials response is not the expected JSON (line {line}, column {column}); will retry"
            ),
            ExchangeError::MissingField(name) => write!(
                f,
                "protocol error: the credentials response lacks \"{name}\"; will retry"
            ),
            ExchangeError::InvalidExpiration(e) => write!(
                f,
                "protocol error: the credentials' expiration is not an RFC 3339 UTC time ({e}); will retry"
            ),
            ExchangeError::Expired {
                expiration,
                reference,
            } => write!(
                f,
                "the provider issued credentials already expired (expiration {}, provider time {}); will retry",
                expiration.rfc3339(),
                reference.rfc3339()
            ),
        }
    }
}

impl core::error::Error for ExchangeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            ExchangeError::Http(e) => Some(e),
            ExchangeError::InvalidExpiration(e) => Some(e),
            _ => None,
        }
    }
}

impl From<HttpError> for ExchangeError {
    fn from(e: HttpError) -> Self {
        ExchangeError::Http(e)
    }
}

/// Turns a complete response into credentials or a classified error.
///
/// `wall_now` is the device's wall clock when the response arrived; it is only used when the
/// response has no `Date` header.
pub fn parse_response(response: &Response, wall_now: UnixTime) -> Result<Issued, ExchangeError> {
    let result = parse_credentials(response.status, response.date, &response.body, wall_now);
    match (result, response.retry_after) {
        (
            Err(ExchangeError::Rejected {
                status, message, ..
            }),
            Some(ra),
        ) => Err(ExchangeError::Rejected {
            status,
            message,
            retry_after: Some(retry_after_delay(ra, response.date, wall_now)),
        }),
        (result, _) => result,
    }
}

/// Turns a status, `Date` header and body into credentials or a classified error (without
/// `Retry-After`; see [`parse_response`]).
///
/// A 200 body must be SPEC §2's `{"credentials":{…}}` (unknown fields ignored), at most
/// [`Limits::DEFAULT`]`.max_body` bytes. The lifetime is `expiration − date`, or
/// `expiration − wall_now` without a date; it must be positive.
pub fn parse_credentials(
    status: u16,
    date: Option<UnixTime>,
    body: &[u8],
    wall_now: UnixTime,
) -> Result<Issued, ExchangeError> {
    if body.len() > Limits::DEFAULT.max_body {
        return Err(ExchangeError::Http(HttpError::BodyTooLarge));
    }
    if status != 200 {
        return Err(ExchangeError::Rejected {
            status,
            message: error_message(body),
            retry_after: None,
        });
    }
    let parsed: SuccessBody =
        serde_json::from_slice(body).map_err(|e| ExchangeError::MalformedJson {
            line: e.line(),
            column: e.column(),
        })?;
    let raw = parsed
        .credentials
        .ok_or(ExchangeError::MissingField("credentials"))?;
    let access_key_id = raw
        .access_key_id
        .filter(|s| !s.is_empty())
        .ok_or(ExchangeError::MissingField("accessKeyId"))?;
    let secret_access_key = raw
        .secret_access_key
        .filter(|s| !s.is_empty())
        .ok_or(ExchangeError::MissingField("secretAccessKey"))?;
    let session_token = raw
        .session_token
        .filter(|s| !s.is_empty())
        .ok_or(ExchangeError::MissingField("sessionToken"))?;
    let expiration = raw
        .expiration
        .ok_or(ExchangeError::MissingField("expiration"))?;
    let expiration =
        UnixTime::parse_rfc3339(&expiration).map_err(ExchangeError::InvalidExpiration)?;
    let reference = date.unwrap_or(wall_now);
    let lifetime = expiration
        .checked_duration_since(reference)
        .filter(|d| !d.is_zero())
        .ok_or(ExchangeError::Expired {
            expiration,
            reference,
        })?;
    Ok(Issued {
        credentials: Credentials {
            access_key_id,
            secret_access_key,
            session_token,
            expiration,
        },
        lifetime,
        server_date: date,
    })
}

/// A `Retry-After` value as a delay: seconds as given, or the date minus the provider's `Date`
/// (or `wall_now` without one), zero when in the past.
pub fn retry_after_delay(
    retry_after: RetryAfter,
    date: Option<UnixTime>,
    wall_now: UnixTime,
) -> Duration {
    match retry_after {
        RetryAfter::Seconds(s) => Duration::from_secs(u64::from(s)),
        RetryAfter::Date(at) => at.saturating_duration_since(date.unwrap_or(wall_now)),
    }
}

/// The `message` (or `Message`) of an error body, sanitized; `None` when the body is not such
/// JSON.
fn error_message(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        #[serde(alias = "Message")]
        message: Option<String>,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let message: String = parsed
        .message?
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect();
    let trimmed = message.trim();
    if trimmed.is_empty() {
        None
    } else {
        Some(trimmed.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;
    use alloc::vec::Vec;
    use zeroize::Zeroizing;

    const SPEC_BODY: &str = r#"{"credentials":{"accessKeyId":"ASIAEXAMPLEKEY1234","secretAccessKey":"wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET","sessionToken":"IQoJb3JpZ2luX2VjEOr//////////TOKEN==","expiration":"2026-01-01T12:00:00Z"}}"#;
    const EXPIRATION: UnixTime = UnixTime::from_secs(1_767_268_800);
    const HOUR_BEFORE: UnixTime = UnixTime::from_secs(1_767_265_200);

    fn response(
        status: u16,
        date: Option<UnixTime>,
        retry_after: Option<RetryAfter>,
        body: &str,
    ) -> Response {
        Response {
            status,
            date,
            retry_after,
            keep_alive: true,
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn spec_success_body_with_date() {
        // The wall clock is a day off; the Date header wins.
        let wall = UnixTime::from_secs(1_767_000_000);
        let issued =
            parse_response(&response(200, Some(HOUR_BEFORE), None, SPEC_BODY), wall).unwrap();
        assert_eq!(issued.lifetime, Duration::from_secs(3600));
        assert_eq!(issued.server_date, Some(HOUR_BEFORE));
        let c = &issued.credentials;
        assert_eq!(c.access_key_id, "ASIAEXAMPLEKEY1234");
        assert_eq!(
            c.secret_access_key.expose(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET"
        );
        assert_eq!(
            c.session_token.expose(),
            "IQoJb3JpZ2luX2VjEOr//////////TOKEN=="
        );
        assert_eq!(c.expiration, EXPIRATION);
    }

    #[test]
    fn success_without_date_uses_wall_clock() {
        let wall = UnixTime::from_secs(EXPIRATION.as_secs() - 900);
        let issued = parse_credentials(200, None, SPEC_BODY.as_bytes(), wall).unwrap();
        assert_eq!(issued.lifetime, Duration::from_secs(900));
        assert_eq!(issued.server_date, None);
    }

    #[test]
    fn unknown_fields_and_escapes() {
        let body = r#" {"extra":[1,{"a":null}],"credentials":{"expiration":"2026-01-01T12:00:00.5Z",
            "accessKeyId":"A","secretAccessKey":"s\/e\u0063","sessionToken":"t","more":{"x":true}},"z":1.5} "#;
        let issued =
            parse_credentials(200, Some(HOUR_BEFORE), body.as_bytes(), HOUR_BEFORE).unwrap();
        assert_eq!(issued.credentials.secret_access_key.expose(), "s/ec");
        assert_eq!(issued.credentials.expiration, EXPIRATION);
    }

    #[test]
    fn missing_fields() {
        let cases = [
            (r#"{}"#, "credentials"),
            (r#"{"credentials":null}"#, "credentials"),
            (
                r#"{"credentials":{"secretAccessKey":"s","sessionToken":"t","expiration":"2026-01-01T12:00:00Z"}}"#,
                "accessKeyId",
            ),
            (
                r#"{"credentials":{"accessKeyId":"","secretAccessKey":"s","sessionToken":"t","expiration":"2026-01-01T12:00:00Z"}}"#,
                "accessKeyId",
            ),
            (
                r#"{"credentials":{"accessKeyId":"a","sessionToken":"t","expiration":"2026-01-01T12:00:00Z"}}"#,
                "secretAccessKey",
            ),
            (
                r#"{"credentials":{"accessKeyId":"a","secretAccessKey":null,"sessionToken":"t","expiration":"2026-01-01T12:00:00Z"}}"#,
                "secretAccessKey",
            ),
            (
                r#"{"credentials":{"accessKeyId":"a","secretAccessKey":"s","expiration":"2026-01-01T12:00:00Z"}}"#,
                "sessionToken",
            ),
            (
                r#"{"credentials":{"accessKeyId":"a","secretAccessKey":"s","sessionToken":""}}"#,
                "sessionToken",
            ),
            (
                r#"{"credentials":{"accessKeyId":"a","secretAccessKey":"s","sessionToken":"t"}}"#,
                "expiration",
            ),
        ];
        for (body, field) in cases {
            let e = parse_credentials(200, Some(HOUR_BEFORE), body.as_bytes(), HOUR_BEFORE)
                .unwrap_err();
            assert_eq!(e, ExchangeError::MissingField(field), "{body}");
            assert_eq!(e.class(), ErrorClass::Transient);
        }
    }

    #[test]
    fn malformed_json_never_echoes_content() {
        for body in [
            "",
            "{",
            "[]",
            "not json",
            r#"{"credentials":{"accessKeyId":"a","secretAccessKey":"SECRETVALUE","sessionToken":5}}"#,
            r#"{"credentials":{"accessKeyId":"a","secretAccessKey":"SECRETVALUE","sessionToken":"t","expiration":"2026-01-01T12:00:00Z"}} trailing"#,
            r#"{"credentials":{"accessKeyId":"a","accessKeyId":"b"}}"#,
        ] {
            let e = parse_credentials(200, None, body.as_bytes(), HOUR_BEFORE).unwrap_err();
            assert!(
                matches!(e, ExchangeError::MalformedJson { .. }),
                "{body}: {e:?}"
            );
            assert_eq!(e.class(), ErrorClass::Transient);
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("SECRET"), "{shown}");
        }
    }

    #[test]
    fn bad_expiration() {
        let body = |exp: &str| {
            format!(
                r#"{{"credentials":{{"accessKeyId":"a","secretAccessKey":"s","sessionToken":"t","expiration":"{exp}"}}}}"#
            )
        };
        let parse = |exp: &str| {
            parse_credentials(200, Some(HOUR_BEFORE), body(exp).as_bytes(), HOUR_BEFORE)
        };
        assert_eq!(
            parse("2026-01-01T13:00:00+01:00").unwrap_err(),
            ExchangeError::InvalidExpiration(TimeError::NotUtc)
        );
        assert_eq!(
            parse("tomorrow").unwrap_err(),
            ExchangeError::InvalidExpiration(TimeError::Syntax)
        );
        assert_eq!(
            parse("2026-02-30T00:00:00Z").unwrap_err(),
            ExchangeError::InvalidExpiration(TimeError::Range)
        );
        let expired = ExchangeError::Expired {
            expiration: HOUR_BEFORE,
            reference: HOUR_BEFORE,
        };
        assert_eq!(parse("2026-01-01T11:00:00Z").unwrap_err(), expired);
        assert!(matches!(
            parse("2025-01-01T11:00:00Z"),
            Err(ExchangeError::Expired { .. })
        ));
        assert_eq!(expired.class(), ErrorClass::Transient);
        assert_eq!(
            parse("2026-01-01T11:00:01Z").unwrap().lifetime,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn permanent_rejections() {
        for (status, message) in [
            (400, "Invalid thing name"),
            (401, "Access Denied"),
            (403, "Access Denied"),
            (404, "Role alias does not exist"),
        ] {
            let body = format!(r#"{{"message":"{message}"}}"#);
            let e = parse_response(&response(status, None, None, &body), HOUR_BEFORE).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Permanent);
            assert_eq!(e.status(), Some(status));
            assert_eq!(e.message(), Some(message));
            assert_eq!(e.retry_after(), None);
            let shown = e.to_string();
            assert!(
                shown.contains(&format!("({status})")) && shown.contains(message),
                "{shown}"
            );
        }
        let e = parse_credentials(403, None, b"", HOUR_BEFORE).unwrap_err();
        assert_eq!((e.class(), e.message()), (ErrorClass::Permanent, None));
        assert!(e.to_string().contains("iot:AssumeRoleWithCertificate"));
    }

    #[test]
    fn transient_rejections_and_retry_after() {
        let e = parse_response(
            &response(
                429,
                None,
                Some(RetryAfter::Seconds(7)),
                r#"{"message":"Rate exceeded"}"#,
            ),
            HOUR_BEFORE,
        )
        .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Transient);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(e.message(), Some("Rate exceeded"));

        // A date: counted from the provider's Date, not the (wrong) wall clock.
        let at = RetryAfter::Date(UnixTime::from_secs(HOUR_BEFORE.as_secs() + 30));
        let e = parse_response(
            &response(503, Some(HOUR_BEFORE), Some(at), ""),
            UnixTime::EPOCH,
        )
        .unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
        // Without Date: from the wall clock; a date in the past is zero.
        let e = parse_response(&response(503, None, Some(at), ""), HOUR_BEFORE).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
        let e = parse_response(&response(503, None, Some(at), ""), EXPIRATION).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::ZERO));

        for status in [500, 502, 503, 504, 302, 201, 204, 418] {
            let e = parse_credentials(status, None, b"<html>oops</html>", HOUR_BEFORE).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Transient, "{status}");
            assert_eq!(e.status(), Some(status));
            assert_eq!(e.message(), None);
        }
    }

    #[test]
    fn messages_are_sanitized_and_bounded() {
        let e = parse_credentials(
            400,
            None,
            br#"{"message":"bad\r\nX-Injected: 1\u0007 thing"}"#,
            HOUR_BEFORE,
        )
        .unwrap_err();
        assert_eq!(e.message(), Some("badX-Injected: 1 thing"));
        let long = "é".repeat(1000);
        let e = parse_credentials(
            400,
            None,
            format!(r#"{{"Message":"{long}"}}"#).as_bytes(),
            HOUR_BEFORE,
        )
        .unwrap_err();
        assert_eq!(e.message().unwrap().chars().count(), MAX_MESSAGE_CHARS);
        let e = parse_credentials(404, None, br#"{"message":"  "}"#, HOUR_BEFORE).unwrap_err();
        assert_eq!(e.message(), None);
        let e = parse_credentials(404, None, br#"{"message":12}"#, HOUR_BEFORE).unwrap_err();
        assert_eq!(e.message(), None);
    }

    #[test]
    fn oversized_body_is_a_protocol_error() {
        let body: Vec<u8> = b" ".repeat(64 * 1024 + 1);
        let e = parse_credentials(200, None, &body, HOUR_BEFORE).unwrap_err();
        assert_eq!(e, ExchangeError::Http(HttpError::BodyTooLarge));
        assert_eq!(e.class(), ErrorClass::Transient);
    }

    #[test]
    fn displays_never_contain_secrets() {
        let errors = [
            ExchangeError::Http(HttpError::Truncated),
            ExchangeError::MalformedJson { line: 1, column: 2 },
            ExchangeError::MissingField("sessionToken"),
            ExchangeError::InvalidExpiration(TimeError::NotUtc),
            ExchangeError::Expired {
                expiration: HOUR_BEFORE,
                reference: EXPIRATION,
            },
            parse_credentials(500, None, b"", HOUR_BEFORE).unwrap_err(),
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.is_empty() && !s.contains('\n'), "{s}");
        }
        assert_eq!(
            ExchangeError::MissingField("sessionToken").to_string(),
            "protocol error: the credentials response lacks \"sessionToken\"; will retry"
        );
    }

    #[test]
    fn explained_rejections_name_the_thing_and_the_alias() {
        let thing = crate::ThingName::new("gateway-0042").unwrap();
        let alias = crate::RoleAlias::new("GatewayRole").unwrap();
        let rejected = |status| ExchangeError::Rejected {
            status,
            message: Some("Forbidden".into()),
            retry_after: None,
        };
        let e403 = rejected(403);
        let shown = e403.explain(Some(&thing), &alias).to_string();
        assert!(shown.contains("(403) (\"Forbidden\")"), "{shown}");
        assert!(shown.contains("thing gateway-0042"), "{shown}");
        assert!(shown.contains("role alias GatewayRole"), "{shown}");
        let e404 = rejected(404);
        let shown = e404.explain(None, &alias).to_string();
        assert!(
            shown.starts_with("role alias GatewayRole not found (404)"),
            "{shown}"
        );
        // Without context the same table is used, with placeholders.
        assert!(e403.to_string().contains("thing (none configured)"));
    }
}
