//! Renderers shared by every consumer path.
//!
//! Each format is written twice: once to count its exact length, once into a `String` of that
//! capacity, so the secrets are never copied by a reallocation; the result is zeroized on drop.

use alloc::string::String;
use core::fmt::{self, Write};
use core::str::FromStr;

use zeroize::Zeroizing;

use crate::credentials::Credentials;
use crate::time::UnixTime;

/// An output format for credentials (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `json`: the container-credentials body,
    /// `{"AccessKeyId":"…","SecretAccessKey":"…","Token":"…","Expiration":"…Z"}`.
    ContainerJson,
    /// `credential-process`: `{"Version":1,"AccessKeyId":"…","SecretAccessKey":"…",
    /// "SessionToken":"…","Expiration":"…Z"}`.
    CredentialProcess,
    /// `ini`: a shared-credentials-file profile:
    ///
    /// ```text
    /// [profile]
    /// aws_access_key_id = …
    /// aws_secret_access_key = …
    /// aws_session_token = …
    /// x_expiration = 2026-01-01T12:00:00Z
    /// ```
    ///
    /// `x_expiration` is for humans and scripts; AWS SDKs ignore unknown keys. INI has no
    /// escaping: control characters are dropped from values and the profile name, and `[`/`]`
    /// from the profile name (real credentials never contain either).
    Ini,
    /// `env`: `export NAME=value` lines for `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN` and `AWS_CREDENTIAL_EXPIRATION`. A value is written bare when it only
    /// holds `[A-Za-z0-9_@%+=:,./-]` (as real credentials do) and single-quoted otherwise
    /// (`'` as `'\''`); NUL bytes, which no shell variable can hold, are dropped.
    Env,
}

/// The text was not a known format name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownFormat;

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown format; use json, credential-process, ini or env")
    }
}

impl core::error::Error for UnknownFormat {}

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Format::ContainerJson),
            "credential-process" => Ok(Format::CredentialProcess),
            "ini" => Ok(Format::Ini),
            "env" => Ok(Format::Env),
            _ => Err(UnknownFormat),
        }
    }
}

impl Format {
    /// The name [`Format::from_str`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Format::ContainerJson => "json",
            Format::CredentialProcess => "credential-process",
            Format::Ini => "ini",
            Format::Env => "env",
        }
    }

    /// Renders `creds` with `expiration` as the expiration to show (the agent passes the
    /// skew-corrected one, SPEC §3). `profile` names the INI profile; other formats ignore it.
    ///
    /// JSON formats end without a newline; `ini` and `env` end with one.
    pub fn render(
        self,
        profile: &str,
        creds: &Credentials,
        expiration: UnixTime,
    ) -> Zeroizing<String> {
        let mut counter = Counter(0);
        // Neither sink can fail.
        let _ = self.write(&mut counter, profile, creds, expiration);
        let mut out = Zeroizing::new(String::with_capacity(counter.0));
        let _ = self.write(&mut *out, profile, creds, expiration);
        out
    }

    fn write<W: Write>(
        self,
        w: &mut W,
        profile: &str,
        creds: &Credentials,
        expiration: UnixTime,
    ) -> fmt::Result {
        let key = creds.access_key_id.as_str();
        let secret = creds.secret_access_key.expose();
        let token = creds.session_token.expose();
        let expiration = expiration.rfc3339();
        match self {
            Format::ContainerJson => {
                w.write_str("{\"AccessKeyId\":")?;
                json_string(w, key)?;
                w.write_str(",\"SecretAccessKey\":")?;
                json_string(w, secret)?;
                w.write_str(",\"Token\":")?;
                json_string(w, token)?;
                write!(w, ",\"Expiration\":\"{expiration}\"}}")
            }
            Format::CredentialProcess => {
                w.write_str("{\"Version\":1,\"AccessKeyId\":")?;
                json_string(w, key)?;
                w.write_str(",\"SecretAccessKey\":")?;
                json_string(w, secret)?;
                w.write_str(",\"SessionToken\":")?;
                json_string(w, token)?;
                write!(w, ",\"Expiration\":\"{expiration}\"}}")
            }
            Format::Ini => {
                w.write_char('[')?;
                for c in profile
                    .chars()
                    .filter(|&c| !c.is_control() && c != '[' && c != ']')
                {
                    w.write_char(c)?;
                }
                w.write_str("]\naws_access_key_id = ")?;
                ini_value(w, key)?;
                w.write_str("\naws_secret_access_key = ")?;
                ini_value(w, secret)?;
                w.write_str("\naws_session_token = ")?;
                ini_value(w, token)?;
                write!(w, "\nx_expiration = {expiration}\n")
            }
            Format::Env => {
                w.write_str("export AWS_ACCESS_KEY_ID=")?;
                shell_word(w, key)?;
                w.write_str("\nexport AWS_SECRET_ACCESS_KEY=")?;
                shell_word(w, secret)?;
                w.write_str("\nexport AWS_SESSION_TOKEN=")?;
                shell_word(w, token)?;
                write!(w, "\nexport AWS_CREDENTIAL_EXPIRATION={expiration}\n")
            }
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counts the bytes that would be written.
struct Counter(usize);

impl Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// A JSON string literal (RFC 8259): `"` and `\` escaped, control characters as `\n`, `\t`, …
/// or `\u00XX`.
fn json_string<W: Write>(w: &mut W, s: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut plain_from = 0;
    for (i, c) in s.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            '\u{8}' => "\\b",
            '\u{c}' => "\\f",
            c if c < ' ' => "",
            _ => continue,
        };
        w.write_str(&s[plain_from..i])?;
        if escape.is_empty() {
            write!(w, "\\u{:04x}", c as u32)?;
        } else {
            w.write_str(escape)?;
        }
        plain_from = i + c.len_utf8();
    }
    w.write_str(&s[plain_from..])?;
    w.write_char('"')
}

fn ini_value<W: Write>(w: &mut W, s: &str) -> fmt::Result {
    for c in s.chars().filter(|c| !c.is_control()) {
        w.write_char(c)?;
    }
    Ok(())
}

fn shell_word<W: Write>(w: &mut W, s: &str) -> fmt::Result {
    let bare = !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&c));
    if bare {
        return w.write_str(s);
    }
    w.write_char('\'')?;
    for c in s.chars() {
        match c {
            '\'' => w.write_str("'\\''")?,
            '\0' => {}
            c => w.write_char(c)?,
        }
    }
    w.write_char('\'')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn creds(key: &str, secret: &str, token: &str) -> Credentials {
        Credentials {
            access_key_id: key.into(),
            secret_access_key: Secret::from(secret),
            session_token: Secret::from(token),
            expiration: UnixTime::from_secs(0),
        }
    }

    const EXP: UnixTime = UnixTime::from_secs(1_767_268_800);

    fn real() -> Credentials {
        creds("ASIAEXAMPLE", "wJalr/K7+MDENG=", "IQoJ//b3J+pZ2==")
    }

    fn render(f: Format, c: &Credentials) -> String {
        let out = f.render("default", c, EXP);
        assert_eq!(
            out.capacity(),
            out.len(),
            "exactly sized, never reallocated"
        );
        out.as_str().into()
    }

    #[test]
    fn container_json_exact() {
        assert_eq!(
            render(Format::ContainerJson, &real()),
            r#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"wJalr/K7+MDENG=","Token":"IQoJ//b3J+pZ2==","Expiration":"2026-01-01T12:00:00Z"}"#
        );
    }

    #[test]
    fn credential_process_exact() {
        assert_eq!(
            render(Format::CredentialProcess, &real()),
            r#"{"Version":1,"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"wJalr/K7+MDENG=","SessionToken":"IQoJ//b3J+pZ2==","Expiration":"2026-01-01T12:00:00Z"}"#
        );
    }

    #[test]
    fn ini_exact() {
        assert_eq!(
            render(Format::Ini, &real()),
            "[default]\naws_access_key_id = ASIAEXAMPLE\naws_secret_access_key = wJalr/K7+MDENG=\n\
             aws_session_token = IQoJ//b3J+pZ2==\nx_expiration = 2026-01-01T12:00:00Z\n"
        );
        let odd = Format::Ini.render("we]ird\n[x", &creds("a\nb", "s\r\n[x]", "t"), EXP);
        assert_eq!(
            odd.as_str(),
            "[weirdx]\naws_access_key_id = ab\naws_secret_access_key = s[x]\n\
             aws_session_token = t\nx_expiration = 2026-01-01T12:00:00Z\n"
        );
    }

    #[test]
    fn env_exact_and_quoted() {
        assert_eq!(
            render(Format::Env, &real()),
            "export AWS_ACCESS_KEY_ID=ASIAEXAMPLE\nexport AWS_SECRET_ACCESS_KEY=wJalr/K7+MDENG=\n\
             export AWS_SESSION_TOKEN=IQoJ//b3J+pZ2==\nexport AWS_CREDENTIAL_EXPIRATION=2026-01-01T12:00:00Z\n"
        );
        assert_eq!(
            render(Format::Env, &creds("", "it's $(rm -rf /)\n`x`", "a\0b")),
            "export AWS_ACCESS_KEY_ID=''\nexport AWS_SECRET_ACCESS_KEY='it'\\''s $(rm -rf /)\n`x`'\n\
             export AWS_SESSION_TOKEN='ab'\nexport AWS_CREDENTIAL_EXPIRATION=2026-01-01T12:00:00Z\n"
        );
    }

    #[test]
    fn json_escaping_for_any_string() {
        let nasty = "q\"b\\s/n\nr\rt\tb\u{8}f\u{c}\u{1}\u{1f}\u{7f}é€😀";
        let out = render(Format::ContainerJson, &creds(nasty, nasty, nasty));
        assert!(out.contains(r#""q\"b\\s/n\nr\rt\tb\bf\f\u0001\u001f"#));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        for k in ["AccessKeyId", "SecretAccessKey", "Token"] {
            assert_eq!(v[k], nasty);
        }
        let out = render(Format::CredentialProcess, &creds(nasty, nasty, nasty));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["SessionToken"], nasty);
        assert_eq!(v["Version"], 1);
    }

    #[test]
    fn format_names() {
        for f in [
            Format::ContainerJson,
            Format::CredentialProcess,
            Format::Ini,
            Format::Env,
        ] {
            assert_eq!(f.name().parse::<Format>(), Ok(f));
            assert_eq!(alloc::format!("{f}"), f.name());
        }
        assert_eq!("JSON".parse::<Format>(), Err(UnknownFormat));
        assert_eq!("yaml".parse::<Format>(), Err(UnknownFormat));
    }

    proptest::proptest! {
        #![proptest_config(crate::time::tests::deterministic(256))]

        #[test]
        fn json_round_trips(key in ".*", secret in ".*", token in ".*") {
            let c = creds(&key, &secret, &token);
            let out = render(Format::ContainerJson, &c);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            proptest::prop_assert_eq!(v["AccessKeyId"].as_str(), Some(key.as_str()));
            proptest::prop_assert_eq!(v["SecretAccessKey"].as_str(), Some(secret.as_str()));
            proptest::prop_assert_eq!(v["Token"].as_str(), Some(token.as_str()));
        }
    }
}
