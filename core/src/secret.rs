//! Secret strings: zeroized on drop, never printed by `Debug` or `Display`.

use alloc::string::String;
use core::fmt;

use zeroize::Zeroize;

/// A secret string (secret access key, session token, …).
///
/// The bytes are overwritten with zeros when the value is dropped. `Debug` prints `***`; there is
/// deliberately no `Display`. Read the value with [`Secret::expose`], only where it must be
/// written out.
///
/// Equality is not constant-time: do not compare a secret against attacker-controlled input
/// with `==`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`; it is zeroized when the `Secret` is dropped.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret value.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Zeroize for Secret {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(String::from(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Deserializes from a JSON string straight into the `Secret`: a borrowed string is copied once
/// into the secret's own allocation, an owned one is moved in.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::from(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn debug_hides_the_value() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(s.len(), 7);
        assert!(!s.is_empty());
    }

    #[test]
    fn clone_and_eq() {
        let s = Secret::from("abc");
        assert_eq!(s.clone(), s);
        assert_ne!(Secret::from("abd"), s);
    }

    #[test]
    fn zeroize_clears() {
        let mut s = Secret::from("abc");
        s.zeroize();
        assert!(s.is_empty());
    }

    #[test]
    fn deserializes_from_json_string() {
        let s: Secret = serde_json::from_str(r#""a\/b""#).unwrap();
        assert_eq!(s.expose(), "a/b");
        let s: Secret = serde_json::from_str(r#""plain""#).unwrap();
        assert_eq!(s.expose(), "plain");
        assert!(serde_json::from_str::<Secret>("12").is_err());
    }
}
