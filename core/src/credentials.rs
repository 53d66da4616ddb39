//! Credential types and the provider's success body.

use alloc::string::String;
use core::fmt;

use crate::secret::Secret;
use crate::time::{Duration, UnixTime};

/// Temporary AWS credentials as issued by the credentials provider.
///
/// `Debug` shows only the last four characters of the access key id and the expiration; the
/// secret access key and session token are [`Secret`]s (zeroized on drop, printed as `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `accessKeyId`, e.g. `ASIA…`. Not a secret, but only its last four characters are
    /// ever printed by this crate.
    pub access_key_id: String,
    /// `secretAccessKey`.
    pub secret_access_key: Secret,
    /// `sessionToken`.
    pub session_token: Secret,
    /// `expiration` as stated by the provider (the provider's clock).
    pub expiration: UnixTime,
}

impl Credentials {
    /// The last four characters of the access key id (all of it when shorter), for logs and
    /// `check` output.
    pub fn access_key_id_suffix(&self) -> &str {
        let id = self.access_key_id.as_str();
        let start = id.char_indices().rev().nth(3).map(|(i, _)| i).unwrap_or(0);
        &id[start..]
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Suffix<'a>(&'a str);
        impl fmt::Debug for Suffix<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "\"…{}\"", self.0)
            }
        }
        struct Time(UnixTime);
        impl fmt::Debug for Time {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0.rfc3339())
            }
        }
        f.debug_struct("Credentials")
            .field("access_key_id", &Suffix(self.access_key_id_suffix()))
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("expiration", &Time(self.expiration))
            .finish()
    }
}

/// The result of a successful exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The credentials.
    pub credentials: Credentials,
    /// How long the credentials are valid, counted from the moment the response arrived:
    /// `expiration − Date` when the provider sent a `Date` header, else `expiration − wall_now`.
    /// Always positive. Count it on a monotonic clock, not against the wall clock.
    pub lifetime: Duration,
    /// The provider's `Date` header, when present and valid.
    pub server_date: Option<UnixTime>,
}

/// The success body of SPEC §2. Every field is optional here so a missing one is reported by
/// name; unknown fields are ignored. Secrets are deserialized straight into [`Secret`].
#[derive(serde::Deserialize)]
pub(crate) struct SuccessBody {
    pub(crate) credentials: Option<RawCredentials>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawCredentials {
    pub(crate) access_key_id: Option<String>,
    pub(crate) secret_access_key: Option<Secret>,
    pub(crate) session_token: Option<Secret>,
    pub(crate) expiration: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    fn creds(id: &str) -> Credentials {
        Credentials {
            access_key_id: id.into(),
            secret_access_key: Secret::from("SECRETSECRET"),
            session_token: Secret::from("TOKENTOKEN"),
            expiration: UnixTime::from_secs(1_767_268_800),
        }
    }

    #[test]
    fn debug_shows_only_the_key_suffix() {
        let d = format!("{:?}", creds("ASIAEXAMPLEKEY1234"));
        assert_eq!(
            d,
            "Credentials { access_key_id: \"…1234\", secret_access_key: ***, \
             session_token: ***, expiration: 2026-01-01T12:00:00Z }"
        );
        assert!(!d.contains("SECRET") && !d.contains("TOKEN") && !d.contains("ASIA"));
        let issued = Issued {
            credentials: creds("AKIDXYZ9"),
            lifetime: Duration::from_secs(3600),
            server_date: None,
        };
        let d = format!("{issued:?}");
        assert!(!d.contains("SECRET") && !d.contains("TOKEN") && !d.contains("AKID"));
    }

    #[test]
    fn suffix_of_short_and_multibyte_ids() {
        assert_eq!(creds("AB").access_key_id_suffix(), "AB");
        assert_eq!(creds("").access_key_id_suffix(), "");
        assert_eq!(creds("ABCD").access_key_id_suffix(), "ABCD");
        assert_eq!(creds("xxééé1").access_key_id_suffix(), "ééé1");
    }
}
