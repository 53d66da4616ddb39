//! The request of SPEC §2: validated role alias, thing name and duration, and the exact bytes.
//!
//! Every value that ends up in the request line or a header is validated when it is built, so a
//! [`Request`] can always be written and can never inject a header.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Why a value cannot go into a request (role alias, thing name, duration, host). `Display`
/// says what is wrong and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidRequest {
    /// The role alias is empty or longer than 128 characters (its length is given).
    RoleAliasLength(usize),
    /// The role alias contains a character outside `[A-Za-z0-9_=,@-]`.
    RoleAliasCharacter(char),
    /// The thing name is empty or longer than 128 characters (its length is given).
    ThingNameLength(usize),
    /// The thing name contains a character outside `[A-Za-z0-9:_-]`.
    ThingNameCharacter(char),
    /// The credential duration is outside 900–43200 seconds (the value is given).
    DurationRange(u32),
    /// The endpoint host is not a DNS name, IPv4 address or IPv6 literal.
    Host,
    /// The user agent is empty, longer than 256 bytes, not printable ASCII, or has
    /// leading/trailing spaces.
    UserAgent,
}

impl fmt::Display for InvalidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidRequest::RoleAliasLength(n) => write!(
                f,
                "role alias must be 1 to 128 characters long, not {n}"
            ),
            InvalidRequest::RoleAliasCharacter(c) => write!(
                f,
                "role alias contains {c:?}; only letters, digits and _=,@- are allowed"
            ),
            InvalidRequest::ThingNameLength(n) => write!(
                f,
                "thing name must be 1 to 128 characters long, not {n}"
            ),
            InvalidRequest::ThingNameCharacter(c) => write!(
                f,
                "thing name contains {c:?}; only letters, digits and :_- are allowed"
            ),
            InvalidRequest::DurationRange(n) => write!(
                f,
                "credential duration must be 900 to 43200 seconds, not {n}"
            ),
            InvalidRequest::Host => f.write_str(
                "endpoint host must be a DNS name, an IPv4 address or an IPv6 address",
            ),
            InvalidRequest::UserAgent => f.write_str(
                "user agent must be 1 to 256 printable ASCII characters without leading or trailing spaces",
            ),
        }
    }
}

impl core::error::Error for InvalidRequest {}

/// An IoT role alias: 1–128 characters of `[A-Za-z0-9_=,@-]` (SPEC §2).
///
/// Every allowed character is a valid URL path character, so the alias goes into the request
/// path unescaped.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoleAlias(String);

impl RoleAlias {
    /// Validates `alias`.
    pub fn new(alias: &str) -> Result<RoleAlias, InvalidRequest> {
        let len = alias.chars().count();
        if !(1..=128).contains(&len) {
            return Err(InvalidRequest::RoleAliasLength(len));
        }
        if let Some(c) = alias
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || "_=,@-".contains(c)))
        {
            return Err(InvalidRequest::RoleAliasCharacter(c));
        }
        Ok(RoleAlias(alias.into()))
    }

    /// The alias.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleAlias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl core::str::FromStr for RoleAlias {
    type Err = InvalidRequest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RoleAlias::new(s)
    }
}

/// An AWS IoT thing name: 1–128 characters of `[A-Za-z0-9:_-]`.
///
/// This is the character set AWS IoT itself allows for thing names (`CreateThing`), so every
/// real thing name is accepted, and nothing that could break a header line gets through.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ThingName(String);

impl ThingName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<ThingName, InvalidRequest> {
        let len = name.chars().count();
        if !(1..=128).contains(&len) {
            return Err(InvalidRequest::ThingNameLength(len));
        }
        if let Some(c) = name
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || ":_-".contains(c)))
        {
            return Err(InvalidRequest::ThingNameCharacter(c));
        }
        Ok(ThingName(name.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ThingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl core::str::FromStr for ThingName {
    type Err = InvalidRequest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ThingName::new(s)
    }
}

/// The requested credential lifetime, 900–43200 seconds
/// (`x-amzn-iot-credential-duration-seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialDuration(u32);

impl CredentialDuration {
    /// The shortest duration the provider accepts.
    pub const MIN: CredentialDuration = CredentialDuration(900);
    /// The longest duration the provider accepts.
    pub const MAX: CredentialDuration = CredentialDuration(43_200);

    /// Validates `seconds`.
    pub fn new(seconds: u32) -> Result<CredentialDuration, InvalidRequest> {
        if (Self::MIN.0..=Self::MAX.0).contains(&seconds) {
            Ok(CredentialDuration(seconds))
        } else {
            Err(InvalidRequest::DurationRange(seconds))
        }
    }

    /// The duration in seconds.
    pub fn as_secs(self) -> u32 {
        self.0
    }
}

/// The credentials request of SPEC §2.
///
/// ```
/// # use iotcred_core::request::{Request, RoleAlias, ThingName};
/// let alias = RoleAlias::new("GatewayRole")?;
/// let thing = ThingName::new("gateway-0042")?;
/// let req = Request::new("c2example.credentials.iot.eu-west-1.amazonaws.com", 443, &alias, "iotcred/0.1.0")?
///     .with_thing_name(Some(&thing));
/// assert!(req.to_bytes().starts_with(b"GET /role-aliases/GatewayRole/credentials HTTP/1.1\r\n"));
/// # Ok::<(), iotcred_core::request::InvalidRequest>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    host: &'a str,
    port: u16,
    role_alias: &'a RoleAlias,
    thing_name: Option<&'a ThingName>,
    duration: Option<CredentialDuration>,
    user_agent: &'a str,
}

impl<'a> Request<'a> {
    /// A request for `role_alias` at `host:port`, without thing name or duration.
    ///
    /// `host` is a DNS name, an IPv4 address or an IPv6 address (bare or in brackets; it is
    /// written in brackets). `user_agent` is 1–256 printable ASCII characters without leading or
    /// trailing spaces, e.g. `iotcred/0.1.0`.
    pub fn new(
        host: &'a str,
        port: u16,
        role_alias: &'a RoleAlias,
        user_agent: &'a str,
    ) -> Result<Request<'a>, InvalidRequest> {
        validate_host(host)?;
        validate_user_agent(user_agent)?;
        Ok(Request {
            host,
            port,
            role_alias,
            thing_name: None,
            duration: None,
            user_agent,
        })
    }

    /// Sends `x-amzn-iot-thingname` when `Some`.
    pub fn with_thing_name(mut self, thing_name: Option<&'a ThingName>) -> Request<'a> {
        self.thing_name = thing_name;
        self
    }

    /// Sends `x-amzn-iot-credential-duration-seconds` when `Some`.
    pub fn with_duration(mut self, duration: Option<CredentialDuration>) -> Request<'a> {
        self.duration = duration;
        self
    }

    /// The endpoint host as given.
    pub fn host(&self) -> &'a str {
        self.host
    }

    /// The endpoint port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The role alias.
    pub fn role_alias(&self) -> &'a RoleAlias {
        self.role_alias
    }

    /// The thing name, if any.
    pub fn thing_name(&self) -> Option<&'a ThingName> {
        self.thing_name
    }

    /// The requested duration, if any.
    pub fn duration(&self) -> Option<CredentialDuration> {
        self.duration
    }

    /// The exact request bytes:
    ///
    /// ```text
    /// GET /role-aliases/{alias}/credentials HTTP/1.1\r\n
    /// Host: {host}[:{port} unless 443]\r\n
    /// User-Agent: {user_agent}\r\n
    /// [x-amzn-iot-thingname: {thing}\r\n]
    /// [x-amzn-iot-credential-duration-seconds: {n}\r\n]
    /// \r\n
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(256);
        // Writing into a String cannot fail.
        let _ = fmt::write(&mut out, format_args!("{self}"));
        out.into_bytes()
    }

    /// The request rendered once, owned: keep it (for example per configured role) and send it
    /// any number of times with [`blocking::round_trip`](crate::blocking::round_trip).
    pub fn prepare(&self) -> PreparedRequest {
        PreparedRequest {
            bytes: self.to_bytes().into_boxed_slice(),
        }
    }

    /// Writes [`Request::to_bytes`] to `w` and flushes it.
    ///
    /// # Panics
    ///
    /// Like [`embedded_io::Write::write_all`], if the writer breaks its contract by returning
    /// `Ok(0)` for a non-empty buffer.
    pub fn write_to<W: embedded_io::Write>(&self, w: &mut W) -> Result<(), W::Error> {
        w.write_all(&self.to_bytes())?;
        w.flush()
    }
}

/// A [`Request`] rendered into its exact bytes ([`Request::prepare`]). It can only be made from a
/// `Request`, so it carries the same guarantees: every value in it was validated.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PreparedRequest {
    bytes: alloc::boxed::Box<[u8]>,
}

impl PreparedRequest {
    /// The bytes to write.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The request text (nothing secret is in it).
impl fmt::Debug for PreparedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PreparedRequest")
            .field(&String::from_utf8_lossy(&self.bytes))
            .finish()
    }
}

/// The request bytes (nothing secret is in them).
impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GET /role-aliases/{}/credentials HTTP/1.1\r\nHost: ",
            self.role_alias
        )?;
        let bare = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(self.host);
        if bare.contains(':') {
            write!(f, "[{bare}]")?;
        } else {
            f.write_str(bare)?;
        }
        if self.port != 443 {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "\r\nUser-Agent: {}\r\n", self.user_agent)?;
        if let Some(thing) = self.thing_name {
            write!(f, "x-amzn-iot-thingname: {thing}\r\n")?;
        }
        if let Some(d) = self.duration {
            write!(f, "x-amzn-iot-credential-duration-seconds: {}\r\n", d.0)?;
        }
        f.write_str("\r\n")
    }
}

/// A DNS name / IPv4 address (`[A-Za-z0-9._-]`, ≤ 253 bytes, not starting with `-` or `.`), or
/// an IPv6 literal (hex digits, `:` and `.`), optionally in brackets.
///
/// Every [`Request::new`] checks this; callers can check a configured host up front with it.
pub fn validate_host(host: &str) -> Result<(), InvalidRequest> {
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let ok = match bracketed {
        Some(v6) => is_ipv6_text(v6),
        None if host.contains(':') => is_ipv6_text(host),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && !host.starts_with(['-', '.'])
                && host
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(InvalidRequest::Host)
    }
}

fn is_ipv6_text(s: &str) -> bool {
    (2..=45).contains(&s.len())
        && s.contains(':')
        && s.bytes()
            .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
}

fn validate_user_agent(ua: &str) -> Result<(), InvalidRequest> {
    let ok = !ua.is_empty()
        && ua.len() <= 256
        && !ua.starts_with(' ')
        && !ua.ends_with(' ')
        && ua.bytes().all(|c| (0x20..0x7f).contains(&c));
    if ok {
        Ok(())
    } else {
        Err(InvalidRequest::UserAgent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn role_alias_rules() {
        assert!(RoleAlias::new("GatewayRole").is_ok());
        assert!(RoleAlias::new("a_b=c,d@e-f09").is_ok());
        assert!(RoleAlias::new(&"a".repeat(128)).is_ok());
        assert_eq!(
            RoleAlias::new(&"a".repeat(129)),
            Err(InvalidRequest::RoleAliasLength(129))
        );
        assert_eq!(RoleAlias::new(""), Err(InvalidRequest::RoleAliasLength(0)));
        assert_eq!(
            RoleAlias::new("a/b"),
            Err(InvalidRequest::RoleAliasCharacter('/'))
        );
        assert_eq!(
            RoleAlias::new("a b"),
            Err(InvalidRequest::RoleAliasCharacter(' '))
        );
        assert_eq!(
            RoleAlias::new("é"),
            Err(InvalidRequest::RoleAliasCharacter('é'))
        );
        assert!(RoleAlias::new("a\r\nX: y").is_err());
        assert_eq!("Role".parse::<RoleAlias>().unwrap().as_str(), "Role");
    }

    #[test]
    fn thing_name_rules() {
        assert!(ThingName::new("gateway-0042").is_ok());
        assert!(ThingName::new("a:b_c-D9").is_ok());
        assert!(ThingName::new(&"t".repeat(128)).is_ok());
        assert_eq!(
            ThingName::new(&"t".repeat(129)),
            Err(InvalidRequest::ThingNameLength(129))
        );
        assert_eq!(ThingName::new(""), Err(InvalidRequest::ThingNameLength(0)));
        for bad in ["a b", " a", "a\r\n", "a\0", "a/b", "ä"] {
            assert!(ThingName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn duration_range() {
        assert_eq!(CredentialDuration::new(900).unwrap().as_secs(), 900);
        assert_eq!(CredentialDuration::new(43_200).unwrap().as_secs(), 43_200);
        assert_eq!(
            CredentialDuration::new(899),
            Err(InvalidRequest::DurationRange(899))
        );
        assert_eq!(
            CredentialDuration::new(43_201),
            Err(InvalidRequest::DurationRange(43_201))
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            InvalidRequest::RoleAliasCharacter('/').to_string(),
            "role alias contains '/'; only letters, digits and _=,@- are allowed"
        );
        assert!(
            InvalidRequest::DurationRange(5)
                .to_string()
                .contains("900 to 43200")
        );
    }

    #[test]
    fn exact_bytes_minimal() {
        let alias = RoleAlias::new("GatewayRole").unwrap();
        let req = Request::new(
            "c2.credentials.iot.eu-west-1.amazonaws.com",
            443,
            &alias,
            "iotcred/0.1.0",
        )
        .unwrap();
        assert_eq!(
            req.to_bytes(),
            b"GET /role-aliases/GatewayRole/credentials HTTP/1.1\r\n\
              Host: c2.credentials.iot.eu-west-1.amazonaws.com\r\n\
              User-Agent: iotcred/0.1.0\r\n\r\n"
        );
    }

    #[test]
    fn exact_bytes_full() {
        let alias = RoleAlias::new("GatewayRole").unwrap();
        let thing = ThingName::new("gateway-0042").unwrap();
        let req = Request::new("localhost", 8443, &alias, "iotcred/0.1.0")
            .unwrap()
            .with_thing_name(Some(&thing))
            .with_duration(Some(CredentialDuration::new(3600).unwrap()));
        let want: &[u8] = b"GET /role-aliases/GatewayRole/credentials HTTP/1.1\r\n\
              Host: localhost:8443\r\n\
              User-Agent: iotcred/0.1.0\r\n\
              x-amzn-iot-thingname: gateway-0042\r\n\
              x-amzn-iot-credential-duration-seconds: 3600\r\n\r\n";
        assert_eq!(req.to_bytes(), want);
        let mut out = Vec::new();
        req.write_to(&mut out).unwrap();
        assert_eq!(out, want);
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let alias = RoleAlias::new("R").unwrap();
        for host in ["::1", "[::1]"] {
            let req = Request::new(host, 8443, &alias, "ua").unwrap();
            assert!(
                req.to_string().contains("\r\nHost: [::1]:8443\r\n"),
                "{host}"
            );
        }
        let req = Request::new("2001:db8::1", 443, &alias, "ua").unwrap();
        assert!(req.to_string().contains("\r\nHost: [2001:db8::1]\r\n"));
        let req = Request::new("127.0.0.1", 80, &alias, "ua").unwrap();
        assert!(req.to_string().contains("\r\nHost: 127.0.0.1:80\r\n"));
    }

    #[test]
    fn bad_hosts_and_user_agents() {
        let alias = RoleAlias::new("R").unwrap();
        for host in [
            "",
            "a b",
            "a\r\nX: y",
            "[]",
            "[::1",
            "-a",
            "host/x",
            "::1%eth0",
            "ä.com",
        ] {
            assert_eq!(
                Request::new(host, 443, &alias, "ua").err(),
                Some(InvalidRequest::Host),
                "{host:?}"
            );
        }
        for ua in ["", " ua", "ua ", "u\na", "ü"] {
            assert_eq!(
                Request::new("h", 443, &alias, ua).err(),
                Some(InvalidRequest::UserAgent),
                "{ua:?}"
            );
        }
        assert!(Request::new("h", 443, &alias, &"u".repeat(257)).is_err());
    }
}
