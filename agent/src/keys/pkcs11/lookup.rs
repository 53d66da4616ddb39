//! Finding things in a PKCS#11 module: the one token and the one private key a `pkcs11:` URI
//! names, and what that key is (its kind and SubjectPublicKeyInfo). Shared by the signing key
//! and `keygen`.

use std::path::Path;

use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::KeyKind;
use super::session::ck;
use crate::der::{self, EcCurve, SpkiKey};
use crate::keys::{KeyError, Pkcs11Uri};

/// Finds the one token matching the URI: its label and slot.
pub(in crate::keys) fn find_token(
    ctx: &Pkcs11,
    uri: &Pkcs11Uri,
    module: &Path,
) -> Result<(String, Slot), KeyError> {
    let slots = ctx.get_slots_with_token().map_err(ck("C_GetSlotList"))?;
    let mut found = Vec::new();
    for slot in slots {
        if uri.slot_id.is_some_and(|id| id != slot.id()) {
            continue;
        }
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(slot = slot.id(), error = %e, "skipping slot");
                continue;
            }
        };
        let label = info.label().trim_end().to_owned();
        let matches = |want: &Option<String>, have: &str| {
            want.as_deref()
                .is_none_or(|w| w.trim_end() == have.trim_end())
        };
        if matches(&uri.token, &label)
            && matches(&uri.manufacturer, info.manufacturer_id())
            && matches(&uri.serial, info.serial_number())
            && matches(&uri.model, info.model())
        {
            tracing::debug!(slot = slot.id(), token = %label, "token matches");
            found.push((label, slot));
        }
    }
    match found.len() {
        0 => Err(KeyError::NoToken {
            selector: uri.token_selector(),
            module: module.to_owned(),
        }),
        1 => Ok(found.remove(0)),
        count => Err(KeyError::AmbiguousToken {
            selector: uri.token_selector(),
            count,
        }),
    }
}

/// Finds the one private key matching the URI.
pub(super) fn find_private_key(
    session: &Session,
    uri: &Pkcs11Uri,
    token_label: &str,
    module: &Path,
) -> Result<ObjectHandle, KeyError> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let mut keys = session
        .find_objects(&template)
        .map_err(ck("C_FindObjects"))?;
    match keys.len() {
        0 => Err(KeyError::NoKey {
            selector: uri.object_selector(),
            token: token_label.to_owned(),
            module: module.to_owned(),
        }),
        1 => Ok(keys.remove(0)),
        count => Err(KeyError::AmbiguousKey {
            selector: uri.object_selector(),
            token: token_label.to_owned(),
            count,
        }),
    }
}

/// The kind and SubjectPublicKeyInfo of a private key object (looking at its public key
/// object for EC keys).
pub(in crate::keys) fn describe_key(
    session: &Session,
    key: ObjectHandle,
    selector: &str,
    token_label: &str,
) -> Result<(KeyKind, Vec<u8>), KeyError> {
    let no_public = |detail: String| KeyError::NoPublicKey {
        selector: selector.to_owned(),
        token: token_label.to_owned(),
        detail,
    };
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::Id,
                AttributeType::Label,
            ],
        )
        .map_err(ck("C_GetAttributeValue"))?;
    let mut key_type = None;
    let mut id = Vec::new();
    let mut label = Vec::new();
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Id(v) => id = v,
            Attribute::Label(v) => label = v,
            _ => {}
        }
    }
    match key_type {
        Some(t) if t == KeyType::RSA => {
            let attrs = session
                .get_attributes(
                    key,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(ck("C_GetAttributeValue"))?;
            let (mut n, mut e) = (Vec::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::Modulus(v) => n = v,
                    Attribute::PublicExponent(v) => e = v,
                    _ => {}
                }
            }
            if n.is_empty() || e.is_empty() {
                return Err(no_public("the token does not show the RSA modulus".into()));
            }
            let spki = der::spki_rsa(&n, &e);
            let bits = match der::parse_spki(spki.as_ref()) {
                Ok(SpkiKey::Rsa { bits, .. }) => bits,
                _ => 0,
            };
            if bits < 2048 {
                return Err(KeyError::RsaTooSmall(bits));
            }
            Ok((KeyKind::Rsa(bits), spki.as_ref().to_vec()))
        }
        Some(t) if t == KeyType::EC => {
            let params = session
                .get_attributes(key, &[AttributeType::EcParams])
                .map_err(ck("C_GetAttributeValue"))?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcParams(v) => Some(v),
                    _ => None,
                })
                .unwrap_or_default();
            let (kind, curve) = match EcCurve::from_params(&params) {
                Some(EcCurve::P256) => (KeyKind::EcP256, EcCurve::P256),
                Some(EcCurve::P384) => (KeyKind::EcP384, EcCurve::P384),
                None => {
                    return Err(KeyError::UnsupportedKeyType(
                        "EC key on a curve other than P-256 or P-384".into(),
                    ));
                }
            };
            let point = ec_point(session, key, &id, &label).ok_or_else(|| {
                no_public("no public key object with the same id or label, and the private key does not show CKA_EC_POINT".into())
            })?;
            Ok((kind, curve.spki(&point).as_ref().to_vec()))
        }
        Some(t) => Err(KeyError::UnsupportedKeyType(format!(
            "PKCS#11 key type {t}"
        ))),
        None => Err(KeyError::UnsupportedKeyType(
            "the token does not tell the key type".into(),
        )),
    }
}

/// The EC point of the key: from its public key object (same id, else same label), else from
/// the private key object itself (some modules show `CKA_EC_POINT` there).
fn ec_point(session: &Session, key: ObjectHandle, id: &[u8], label: &[u8]) -> Option<Vec<u8>> {
    let point_of = |h: ObjectHandle| -> Option<Vec<u8>> {
        session
            .get_attributes(h, &[AttributeType::EcPoint])
            .ok()?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(v) => der::unwrap_ec_point(&v).map(<[u8]>::to_vec),
                _ => None,
            })
    };
    let mut templates = Vec::new();
    if !id.is_empty() {
        templates.push(vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Id(id.to_vec()),
        ]);
    }
    if !label.is_empty() {
        templates.push(vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(label.to_vec()),
        ]);
    }
    for t in templates {
        if let Ok(handles) = session.find_objects(&t) {
            if let [h] = handles.as_slice() {
                if let Some(p) = point_of(*h) {
                    return Some(p);
                }
            }
        }
    }
    point_of(key)
}
