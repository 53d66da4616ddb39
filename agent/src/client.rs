//! `iotcred get` and `iotcred credential-process` (SPEC §4.3): ask the running agent over its
//! Unix socket and print the credentials in the wanted format.
//!
//! Blocking and single-shot: one connection, `GET /v1/credentials[/{role}]` with
//! `Connection: close`, the response parsed by the core's HTTP parser.

use crate::exit::Exit;
use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iotcred_core::http::{ResponseParser, RetryAfter};
use iotcred_core::render::Format;
use iotcred_core::{Credentials, Secret, UnixTime};
use zeroize::Zeroizing;

/// Longest wait for the agent's answer (it waits at most `timeout_seconds`, ≤ 300 s, itself).
const READ_TIMEOUT: Duration = Duration::from_secs(330);

/// Why `get` failed. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GetError {
    /// The socket cannot be reached.
    #[error(
        "cannot reach the agent at {}: {source}; is `iotcred run` running, and is --socket right?",
        socket.display()
    )]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The socket exists but this user may not open it.
    #[error(
        "no permission to open the agent socket {}: {source}; run as a user in the socket's group",
        socket.display()
    )]
    SocketPermission {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The agent does not know the role.
    #[error(
        "the agent has no role {role:?}; check --role against the [[role]] names in its config"
    )]
    UnknownRole {
        /// The role asked for (`default` for the default role).
        role: String,
    },
    /// The role name cannot be put in a request path.
    #[error("invalid role name {0:?}; role names use letters, digits, '-', '_' and '.'")]
    InvalidRole(String),
    /// The agent refused this user (403) or the request (401).
    #[error("the agent refused the request ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
    },
    /// The agent has no valid credentials yet (503).
    #[error(
        "the agent has no valid credentials yet: {message}; retry in {retry_after}s, see `curl --unix-socket SOCKET http://localhost/v1/health`"
    )]
    NotReady {
        /// The agent's suggested wait, in seconds.
        retry_after: u64,
        /// The agent's message.
        message: String,
    },
    /// Reading or writing the socket failed after connecting.
    #[error("talking to the agent at {} failed: {source}", socket.display())]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The agent's answer could not be understood.
    #[error(
        "unexpected answer from the agent: {0}; are the agent and this command the same version?"
    )]
    Protocol(String),
}

impl GetError {
    /// Process exit code (SPEC §5): 2 unknown role, 5 agent unreachable, refusing or without
    /// credentials yet, 1 anything else.
    pub fn exit(&self) -> Exit {
        match self {
            GetError::UnknownRole { .. } | GetError::InvalidRole(_) => Exit::Config,
            GetError::Unreachable { .. }
            | GetError::SocketPermission { .. }
            | GetError::Refused { .. }
            | GetError::NotReady { .. } => Exit::Agent,
            GetError::Io { .. } | GetError::Protocol(_) => Exit::Other,
        }
    }
}

/// Asks the agent listening on `socket` for the credentials of `role` (the default role when
/// `None`) and renders them in `format`; for `ini`, the profile is the role name, or `default`.
pub fn get(
    socket: &Path,
    role: Option<&str>,
    format: Format,
) -> Result<Zeroizing<String>, GetError> {
    if let Some(r) = role {
        if r.is_empty()
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'='))
        {
            return Err(GetError::InvalidRole(r.to_owned()));
        }
    }
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            GetError::SocketPermission {
                socket: socket.to_owned(),
                source,
            }
        } else {
            GetError::Unreachable {
                socket: socket.to_owned(),
                source,
            }
        }
    })?;
    let io_err = |source| GetError::Io {
        socket: socket.to_owned(),
        source,
    };
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    let path = match role {
        Some(r) => format!("/v1/credentials/{r}"),
        None => "/v1/credentials".to_owned(),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        crate::USER_AGENT
    );
    stream.write_all(request.as_bytes()).map_err(io_err)?;

    let Answer {
        status,
        body,
        retry_after,
    } = read_response(&mut stream).map_err(|e| match e {
        ReadError::Io(source) => io_err(source),
        ReadError::Protocol(m) => GetError::Protocol(m),
    })?;
    match status {
        200 => {}
        404 => {
            return Err(GetError::UnknownRole {
                role: role.unwrap_or("default").to_owned(),
            });
        }
        401 | 403 => {
            return Err(GetError::Refused {
                status,
                message: error_message(&body),
            });
        }
        503 => {
            return Err(GetError::NotReady {
                retry_after: retry_after.unwrap_or(1),
                message: error_message(&body),
            });
        }
        s => {
            return Err(GetError::Protocol(format!(
                "status {s}: {}",
                error_message(&body)
            )));
        }
    }
    let creds = parse_container_json(&body)?;
    let profile = role.unwrap_or("default");
    Ok(format.render(profile, &creds, creds.expiration))
}

/// How an identity job asked of the agent ended.
#[derive(Debug)]
pub enum JobAnswer {
    /// No agent answers on the socket: do the work in this process.
    NoAgent,
    /// The agent ran the job: its exit code and its lines.
    Done(Exit, String),
    /// The agent refused or could not run it.
    Refused(Exit, String),
}

/// Asks the agent on `socket` to run an identity job (`POST /v1/identity/provision` or
/// `/v1/identity/rotate[?force=true]`) and waits for its result.
pub fn identity_job(socket: &Path, path_and_query: &str) -> JobAnswer {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        // No socket, or nobody listening on it: no agent.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return JobAnswer::NoAgent;
        }
        Err(e) => {
            return JobAnswer::Refused(
                Exit::Agent,
                format!(
                    "cannot reach the agent at {}: {e}; run as root or the agent's user",
                    socket.display()
                ),
            );
        }
    };
    let io_fail = |e: io::Error| {
        JobAnswer::Refused(
            Exit::Agent,
            format!("talking to the agent at {} failed: {e}", socket.display()),
        )
    };
    // A provisioning waits for several MQTT replies, each bounded by [provision] timeout_seconds.
    if let Err(e) = stream
        .set_read_timeout(Some(READ_TIMEOUT * 4))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
    {
        return io_fail(e);
    }
    let request = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        crate::USER_AGENT
    );
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return io_fail(e);
    }
    let answer = match read_response(&mut stream) {
        Ok(a) => a,
        Err(ReadError::Io(e)) => return io_fail(e),
        Err(ReadError::Protocol(m)) => return JobAnswer::Refused(Exit::Other, m),
    };
    #[derive(serde::Deserialize)]
    struct Body {
        exit: u8,
        message: String,
    }
    match answer.status {
        200 => match serde_json::from_slice::<Body>(&answer.body) {
            Ok(b) => {
                let exit = match b.exit {
                    0 => Exit::Ok,
                    2 => Exit::Config,
                    3 => Exit::Permanent,
                    4 => Exit::Transient,
                    5 => Exit::Agent,
                    _ => Exit::Other,
                };
                JobAnswer::Done(exit, b.message)
            }
            Err(_) => JobAnswer::Refused(Exit::Other, "unexpected answer from the agent".into()),
        },
        s => JobAnswer::Refused(
            Exit::Agent,
            format!(
                "the agent refused the request ({s}): {}",
                error_message(&answer.body)
            ),
        ),
    }
}

/// Status, body (zeroized on drop) and `Retry-After` seconds of the agent's answer.
struct Answer {
    status: u16,
    body: Zeroizing<Vec<u8>>,
    retry_after: Option<u64>,
}

enum ReadError {
    Io(io::Error),
    Protocol(String),
}

/// Reads the whole response: status, body (zeroized on drop) and `Retry-After` seconds.
fn read_response(stream: &mut UnixStream) -> Result<Answer, ReadError> {
    let mut parser = ResponseParser::new();
    let mut buf = Zeroizing::new([0u8; 4096]);
    loop {
        let n = match stream.read(&mut buf[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if n == 0 {
            parser
                .finish()
                .map_err(|e| ReadError::Protocol(e.to_string()))?;
        } else {
            let mut data = &buf[..n];
            while !data.is_empty() {
                let used = parser
                    .feed(data)
                    .map_err(|e| ReadError::Protocol(e.to_string()))?;
                if used == 0 {
                    break;
                }
                data = &data[used..];
            }
        }
        if let Some(resp) = parser.take_response() {
            let retry = resp.retry_after.map(|r| match r {
                RetryAfter::Seconds(s) => u64::from(s),
                RetryAfter::Date(t) => t.saturating_duration_since(UnixTime::now()).as_secs(),
            });
            return Ok(Answer {
                status: resp.status,
                body: resp.body,
                retry_after: retry,
            });
        }
        if n == 0 {
            return Err(ReadError::Protocol(
                "the connection closed before a complete response".into(),
            ));
        }
    }
}

/// `message` of an error body `{"code":…,"message":…}` (never a secret), or a placeholder.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        message: Option<String>,
    }
    serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.message)
        .map(|m| m.chars().filter(|c| !c.is_control()).take(300).collect())
        .unwrap_or_else(|| "no details".to_owned())
}

/// Parses the SPEC §4.1 body `{"AccessKeyId","SecretAccessKey","Token","Expiration"}`.
fn parse_container_json(body: &[u8]) -> Result<Credentials, GetError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Body {
        access_key_id: String,
        secret_access_key: Secret,
        token: Secret,
        expiration: String,
    }
    // serde_json's error may quote a piece of the input: keep only its category.
    let b: Body = serde_json::from_slice(body).map_err(|e| {
        GetError::Protocol(format!(
            "credentials body is not the expected JSON ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let expiration = UnixTime::parse_rfc3339(&b.expiration)
        .map_err(|e| GetError::Protocol(format!("Expiration: {e}")))?;
    Ok(Credentials {
        access_key_id: b.access_key_id,
        secret_access_key: b.secret_access_key,
        session_token: b.token,
        expiration,
    })
}
