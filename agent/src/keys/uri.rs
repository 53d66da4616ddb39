//! RFC 7512 `pkcs11:` URIs, restricted to the attributes iotcred uses.
//!
//! Path attributes (separated by `;`): `token`, `object`, `id`, `slot-id`, `manufacturer`,
//! `serial`, `model`, `type`. Query attributes (after `?`, separated by `&`): `module-path`,
//! `pin-source`, `pin-value`. Values are percent-decoded. Anything else is refused, so that a
//! typo never silently selects a different key.
//!
//! The PIN (from `pin-value`) is kept in zeroize-on-drop memory and is never shown by `Debug`
//! or `Display`.

use std::fmt;
use std::path::PathBuf;

use zeroize::Zeroizing;

/// A parsed `pkcs11:` URI.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token`: the token label.
    pub token: Option<String>,
    /// `object`: the object label (`CKA_LABEL`).
    pub object: Option<String>,
    /// `id`: the object id (`CKA_ID`), raw bytes.
    pub id: Option<Vec<u8>>,
    /// `slot-id`: the slot number.
    pub slot_id: Option<u64>,
    /// `manufacturer`: the token manufacturer.
    pub manufacturer: Option<String>,
    /// `serial`: the token serial number.
    pub serial: Option<String>,
    /// `model`: the token model.
    pub model: Option<String>,
    /// `type`: the object class.
    pub object_type: Option<ObjectType>,
    /// `module-path`: the PKCS#11 module to load.
    pub module_path: Option<PathBuf>,
    /// `pin-source` or `pin-value`.
    pub pin: Option<PinSource>,
}

/// The `type` path attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectType {
    /// `type=private`
    Private,
    /// `type=public`
    Public,
    /// `type=cert`
    Cert,
    /// `type=secret-key`
    SecretKey,
    /// `type=data`
    Data,
}

impl ObjectType {
    fn as_str(self) -> &'static str {
        match self {
            ObjectType::Private => "private",
            ObjectType::Public => "public",
            ObjectType::Cert => "cert",
            ObjectType::SecretKey => "secret-key",
            ObjectType::Data => "data",
        }
    }
}

/// Where the user PIN comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `pin-source=file:/path` (or a plain path): the first line of that file.
    File(PathBuf),
    /// `pin-value=…`: the PIN itself (discouraged: configuration files are often world-readable).
    Value(Zeroizing<String>),
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::File(p) => f.debug_tuple("File").field(p).finish(),
            PinSource::Value(_) => f.write_str("Value(***)"),
        }
    }
}

/// Why a `pkcs11:` URI was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UriError(String);

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UriError {}

fn err<T>(msg: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(msg.into()))
}

const PATH_ATTRS: &str = "token, object, id, slot-id, manufacturer, serial, model, type";
const QUERY_ATTRS: &str = "module-path, pin-source, pin-value";

impl Pkcs11Uri {
    /// A copy with a new random 16-byte `id` (the rest unchanged): the place of a new key next
    /// to the current one, for rotation. Its `Display` is a full URI that parses back, except
    /// that a `pin-value` shows as `***` (keep `pin-source` URIs where they are written down).
    pub fn with_new_id(&self) -> Result<Pkcs11Uri, getrandom::Error> {
        let mut id = vec![0u8; 16];
        getrandom::fill(&mut id)?;
        Ok(Pkcs11Uri {
            id: Some(id),
            ..self.clone()
        })
    }

    /// Parses a `pkcs11:` URI.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let Some(rest) = strip_prefix_ci(s.trim(), "pkcs11:") else {
            return err("a PKCS#11 URI starts with \"pkcs11:\"");
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut uri = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let Some((name, value)) = attr.split_once('=') else {
                return err(format!(
                    "path attribute \"{attr}\" has no value (expected name=value)"
                ));
            };
            uri.set_path_attr(name, value)?;
        }
        if let Some(query) = query {
            let mut pin_seen = false;
            for attr in query.split('&').filter(|a| !a.is_empty()) {
                let Some((name, value)) = attr.split_once('=') else {
                    return err(format!(
                        "query attribute \"{}\" has no value (expected name=value)",
                        redact_name(attr)
                    ));
                };
                if name == "pin-source" || name == "pin-value" {
                    if pin_seen {
                        return err("give the PIN once: pin-source or pin-value, not both");
                    }
                    pin_seen = true;
                }
                uri.set_query_attr(name, value)?;
            }
        }
        Ok(uri)
    }

    fn set_path_attr(&mut self, name: &str, value: &str) -> Result<(), UriError> {
        fn once<T>(slot: &mut Option<T>, name: &str, v: T) -> Result<(), UriError> {
            if slot.is_some() {
                return err(format!("attribute \"{name}\" is given twice"));
            }
            *slot = Some(v);
            Ok(())
        }
        match name {
            "token" => once(&mut self.token, name, decode_str(name, value)?),
            "object" => once(&mut self.object, name, decode_str(name, value)?),
            "manufacturer" => once(&mut self.manufacturer, name, decode_str(name, value)?),
            "serial" => once(&mut self.serial, name, decode_str(name, value)?),
            "model" => once(&mut self.model, name, decode_str(name, value)?),
            "id" => {
                let id = percent_decode(name, value)?;
                if id.is_empty() {
                    return err("attribute \"id\" is empty");
                }
                once(&mut self.id, name, id)
            }
            "slot-id" => {
                let v = decode_str(name, value)?;
                let n = v.parse::<u64>().map_err(|_| {
                    UriError(format!("slot-id must be a decimal number, not \"{v}\""))
                })?;
                once(&mut self.slot_id, name, n)
            }
            "type" => {
                let v = decode_str(name, value)?;
                let t = match v.as_str() {
                    "private" => ObjectType::Private,
                    "public" => ObjectType::Public,
                    "cert" => ObjectType::Cert,
                    "secret-key" => ObjectType::SecretKey,
                    "data" => ObjectType::Data,
                    _ => {
                        return err(format!(
                            "type must be private, public, cert, secret-key or data, not \"{v}\""
                        ));
                    }
                };
                once(&mut self.object_type, name, t)
            }
            _ => err(format!(
                "unsupported path attribute \"{name}\" (supported: {PATH_ATTRS})"
            )),
        }
    }

    fn set_query_attr(&mut self, name: &str, value: &str) -> Result<(), UriError> {
        match name {
            "module-path" => {
                if self.module_path.is_some() {
                    return err("attribute \"module-path\" is given twice");
                }
                let p = decode_str(name, value)?;
                if p.is_empty() {
                    return err("module-path is empty");
                }
                self.module_path = Some(PathBuf::from(p));
                Ok(())
            }
            "pin-source" => {
                let v = decode_str(name, value)?;
                let path = if let Some(p) = v.strip_prefix("file://") {
                    p.to_owned()
                } else if let Some(p) = v.strip_prefix("file:") {
                    p.to_owned()
                } else {
                    v
                };
                if path.is_empty() {
                    return err("pin-source is empty (expected file:/path/to/pin)");
                }
                self.pin = Some(PinSource::File(PathBuf::from(path)));
                Ok(())
            }
            "pin-value" => {
                let bytes = Zeroizing::new(percent_decode(name, value)?);
                let s = std::str::from_utf8(&bytes)
                    .map_err(|_| UriError("pin-value is not valid UTF-8".into()))?;
                self.pin = Some(PinSource::Value(Zeroizing::new(s.to_owned())));
                Ok(())
            }
            _ => err(format!(
                "unsupported query attribute \"{}\" (supported: {QUERY_ATTRS})",
                redact_name(name)
            )),
        }
    }

    /// A short description of the token selection (for error messages and logs).
    pub fn token_selector(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("token={t}"));
        }
        if let Some(s) = self.slot_id {
            parts.push(format!("slot-id={s}"));
        }
        if let Some(m) = &self.manufacturer {
            parts.push(format!("manufacturer={m}"));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial={s}"));
        }
        if let Some(m) = &self.model {
            parts.push(format!("model={m}"));
        }
        if parts.is_empty() {
            "any token".to_owned()
        } else {
            parts.join(";")
        }
    }

    /// A short description of the object selection (for error messages and logs).
    pub fn object_selector(&self) -> String {
        let mut parts = Vec::new();
        if let Some(o) = &self.object {
            parts.push(format!("object={o}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", percent_encode(id, true)));
        }
        if parts.is_empty() {
            "any private key".to_owned()
        } else {
            parts.join(";")
        }
    }
}

/// Query attribute names are echoed in errors; a garbled `pin-value…` must not leak its value.
fn redact_name(name: &str) -> &str {
    if name.starts_with("pin") {
        "pin-…"
    } else {
        name
    }
}

/// `s` without an ASCII `prefix`, compared ignoring ASCII case.
pub(crate) fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    // Compared as bytes: `s` may have a multi-byte character across `prefix.len()`. A match
    // ends on a character boundary, since `prefix` is ASCII.
    let head = s.as_bytes().get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix.as_bytes()) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

fn decode_str(name: &str, value: &str) -> Result<String, UriError> {
    String::from_utf8(percent_decode(name, value)?)
        .map_err(|_| UriError(format!("attribute \"{name}\" is not valid UTF-8")))
}

fn percent_decode(name: &str, value: &str) -> Result<Vec<u8>, UriError> {
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Exactly two hex digits (RFC 3986 pct-encoded); `from_str_radix` alone would also
            // take a sign, as in `%+f`.
            let hex = b.get(i + 1..i + 3).and_then(|h| {
                let h = std::str::from_utf8(h).ok()?;
                if !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                u8::from_str_radix(h, 16).ok()
            });
            let Some(v) = hex else {
                return err(format!(
                    "attribute \"{}\" has a bad percent escape (expected %XX with two hex digits)",
                    redact_name(name)
                ));
            };
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Percent-encodes `bytes`; with `all`, every byte is encoded (the usual form of `id`).
fn percent_encode(bytes: &[u8], all: bool) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for &c in bytes {
        let unreserved = c.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,=/".contains(&c);
        if !all && unreserved {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02x}"));
        }
    }
    s
}

impl fmt::Display for Pkcs11Uri {
    /// The URI in RFC 7512 form, with any `pin-value` shown as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path = Vec::new();
        if let Some(v) = &self.token {
            path.push(format!("token={}", percent_encode(v.as_bytes(), false)));
        }
        if let Some(v) = &self.manufacturer {
            path.push(format!(
                "manufacturer={}",
                percent_encode(v.as_bytes(), false)
            ));
        }
        if let Some(v) = &self.serial {
            path.push(format!("serial={}", percent_encode(v.as_bytes(), false)));
        }
        if let Some(v) = &self.model {
            path.push(format!("model={}", percent_encode(v.as_bytes(), false)));
        }
        if let Some(v) = self.slot_id {
            path.push(format!("slot-id={v}"));
        }
        if let Some(v) = &self.object {
            path.push(format!("object={}", percent_encode(v.as_bytes(), false)));
        }
        if let Some(v) = &self.id {
            path.push(format!("id={}", percent_encode(v, true)));
        }
        if let Some(v) = self.object_type {
            path.push(format!("type={}", v.as_str()));
        }
        write!(f, "pkcs11:{}", path.join(";"))?;
        let mut query = Vec::new();
        if let Some(p) = &self.module_path {
            let p = p.to_string_lossy();
            query.push(format!(
                "module-path={}",
                percent_encode(p.as_bytes(), false)
            ));
        }
        match &self.pin {
            Some(PinSource::File(p)) => {
                let p = p.to_string_lossy();
                // `file:` unless the path starts with `//`, which `file:` would turn into the
                // `file://` prefix when parsed again.
                let scheme = if p.starts_with("//") {
                    "file://"
                } else {
                    "file:"
                };
                query.push(format!(
                    "pin-source={scheme}{}",
                    percent_encode(p.as_bytes(), false)
                ));
            }
            Some(PinSource::Value(_)) => query.push("pin-value=***".to_owned()),
            None => {}
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Uri({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_query() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=iot%20cred;object=device;id=%01%02;slot-id=7;manufacturer=SoftHSM%20project;serial=abc;model=SoftHSM%20v2;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/iotcred/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("iot cred"));
        assert_eq!(u.object.as_deref(), Some("device"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(u.slot_id, Some(7));
        assert_eq!(u.manufacturer.as_deref(), Some("SoftHSM project"));
        assert_eq!(u.serial.as_deref(), Some("abc"));
        assert_eq!(u.model.as_deref(), Some("SoftHSM v2"));
        assert_eq!(u.object_type, Some(ObjectType::Private));
        assert_eq!(
            u.module_path.as_deref(),
            Some(std::path::Path::new("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(
            u.pin,
            Some(PinSource::File(PathBuf::from("/etc/iotcred/pin")))
        );
        // Round trip through Display.
        assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn pin_source_forms() {
        for s in [
            "pkcs11:token=a?pin-source=/p/pin",
            "pkcs11:token=a?pin-source=file:/p/pin",
            "pkcs11:token=a?pin-source=file:///p/pin",
        ] {
            let u = Pkcs11Uri::parse(s).unwrap();
            assert_eq!(u.pin, Some(PinSource::File(PathBuf::from("/p/pin"))), "{s}");
        }
    }

    #[test]
    fn pin_value_never_shown() {
        let u = Pkcs11Uri::parse("pkcs11:token=a;object=k?pin-value=s3cr%65t-PIN").unwrap();
        assert_eq!(
            u.pin,
            Some(PinSource::Value(Zeroizing::new("s3cret-PIN".to_owned())))
        );
        let shown = format!("{u} {u:?} {:?} {:#?}", u.pin, u);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("pin-value=***"), "{shown}");
    }

    #[test]
    fn refuses_unknown_and_malformed() {
        let cases = [
            (
                "pkcs11:token=a;lable=x",
                "unsupported path attribute \"lable\"",
            ),
            (
                "pkcs11:token=a?module-name=softhsm2",
                "unsupported query attribute",
            ),
            ("pkcs11:token=a;token=b", "given twice"),
            ("pkcs11:id=%zz", "bad percent escape"),
            ("pkcs11:id=%0", "bad percent escape"),
            ("pkcs11:slot-id=x", "slot-id must be a decimal"),
            ("pkcs11:type=secret", "type must be"),
            ("pkcs11:token", "has no value"),
            (
                "pkcs11:?pin-value=1&pin-source=/x",
                "pin-source or pin-value",
            ),
            ("/etc/key.pem", "starts with \"pkcs11:\""),
        ];
        for (s, want) in cases {
            let e = Pkcs11Uri::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn malformed_pin_value_not_echoed() {
        let e = Pkcs11Uri::parse("pkcs11:token=a?pin-value=12%zz34")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("12") && !e.contains("34"), "{e}");
        let e = Pkcs11Uri::parse("pkcs11:token=a?pin-valu3=9876")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("9876"), "{e}");
    }

    #[test]
    fn multi_byte_characters_and_signed_escapes() {
        // A character across the end of the `pkcs11:` prefix is not a panic.
        assert!(Pkcs11Uri::parse("pkcs11é:token=a").is_err());
        assert!(Pkcs11Uri::parse("pkcs1é").is_err());
        // `%+f` is not a percent escape.
        assert!(Pkcs11Uri::parse("pkcs11:object=%+f").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:object=%-0").is_err());
        assert_eq!(
            Pkcs11Uri::parse("pkcs11:id=%2B%fF").unwrap().id,
            Some(vec![0x2b, 0xff])
        );
    }

    #[test]
    fn with_new_id_round_trips() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=iotcred;object=device;id=%01;type=private?module-path=/m.so&pin-source=file:/p",
        )
        .unwrap();
        let a = u.with_new_id().unwrap();
        let b = u.with_new_id().unwrap();
        assert_eq!(a.id.as_ref().map(Vec::len), Some(16));
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, u.id);
        assert_eq!(
            Pkcs11Uri {
                id: u.id.clone(),
                ..a.clone()
            },
            u
        );
        let shown = a.to_string();
        assert!(
            shown.starts_with("pkcs11:token=iotcred;object=device;id=%"),
            "{shown}"
        );
        assert!(
            shown.ends_with("?module-path=/m.so&pin-source=file:/p"),
            "{shown}"
        );
        assert_eq!(Pkcs11Uri::parse(&shown).unwrap(), a);
    }

    #[test]
    fn display_parses_back() {
        for s in [
            "pkcs11:token=a%3bb;object=x=y;id=%00%ff;slot-id=3;type=private?module-path=/m%26.so&pin-source=file:/p",
            "pkcs11:?pin-source=file:////server/pin",
            "pkcs11:?pin-source=relative/pin",
            "pkcs11:manufacturer=%3f;serial=1;model=m%20x",
        ] {
            let u = Pkcs11Uri::parse(s).unwrap();
            assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u, "{s} -> {u}");
        }
    }

    #[test]
    fn selectors() {
        let u = Pkcs11Uri::parse("pkcs11:token=t;object=o;id=%01").unwrap();
        assert_eq!(u.token_selector(), "token=t");
        assert_eq!(u.object_selector(), "object=o;id=%01");
        let u = Pkcs11Uri::parse("pkcs11:").unwrap();
        assert_eq!(u.token_selector(), "any token");
    }
}
