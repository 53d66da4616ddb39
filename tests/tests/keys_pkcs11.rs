//! Device keys in real PKCS#11 modules (SoftHSM2, and a software TPM through tpm2-pkcs11),
//! plus key generation.
//!
//! A PKCS#11 module reads its configuration (`SOFTHSM2_CONF`, `TPM2_PKCS11_STORE`, …) once per
//! process, so each test builds its fixture here and re-runs this test binary as a child
//! process, with the fixture's environment, to run the half named `child_*` that loads the
//! module. The `child_*` tests do nothing when run on their own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use iotcred_agent::keys::pkcs11::{KeyKind, Pkcs11Key};
use iotcred_agent::keys::{self, Algorithm, KeyError, KeySource};
use iotcred_tests::softhsm::{PKCS11_SPY_MODULE, SOFTHSM_MODULE, SoftHsm};
use iotcred_tests::tpm::Tpm;
use rustls::SignatureScheme;
use rustls::sign::SigningKey;

const CHILD: &str = "IOTCRED_KEYS_CHILD";
const TOKEN: &str = "iotcred";
const PIN: &str = "1234";
const SO_PIN: &str = "5678";

// ---- plumbing ----

/// Runs `child_<name>` of this binary in a child process with `env`; fails with its output.
fn run_child(name: &str, env: &[(String, OsString)]) {
    let exe = std::env::current_exe().unwrap();
    let test = format!("child_{name}");
    let out = Command::new(exe)
        .args([
            &test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &test)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {test} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// True in the child process started for `test`.
fn in_child(test: &str) -> bool {
    std::env::var(CHILD).is_ok_and(|v| v == test)
}

fn param(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not passed to the child"))
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
        .collect()
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rsa_pem(bits: u32) -> String {
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        &format!("rsa_keygen_bits:{bits}"),
    ])
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The DER SubjectPublicKeyInfo of a PEM private key, by openssl.
fn spki_of_pem(dir: &Path, pem: &str) -> Vec<u8> {
    let k = dir.join("spki-src.pem");
    std::fs::write(&k, pem).unwrap();
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&k)
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Verifies `sig` over `msg` with the public key `spki` using rustls' (ring) verifiers.
fn verify(spki: &[u8], scheme: SignatureScheme, msg: &[u8], sig: &[u8]) {
    use x509_parser::prelude::FromDer;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    let public_key = info.subject_public_key.data.as_ref();
    let provider = rustls::crypto::ring::default_provider();
    let (_, algs) = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .unwrap_or_else(|| panic!("no verifier for {scheme:?}"));
    assert!(
        algs.iter()
            .any(|a| a.verify_signature(public_key, msg, sig).is_ok()),
        "signature with {scheme:?} does not verify"
    );
}

/// Signs with `scheme` through rustls' interface and verifies the result.
fn sign_and_verify(key: &dyn SigningKey, spki: &[u8], scheme: SignatureScheme) {
    let signer = key
        .choose_scheme(&[scheme])
        .unwrap_or_else(|| panic!("{scheme:?} not chosen"));
    assert_eq!(signer.scheme(), scheme);
    let msg = format!("TLS handshake transcript for {scheme:?}");
    let sig = signer.sign(msg.as_bytes()).unwrap();
    verify(spki, scheme, msg.as_bytes(), &sig);
}

fn softhsm_with_token() -> (SoftHsm, PathBuf) {
    let hsm = SoftHsm::new().unwrap_or_else(|e| panic!("SoftHSM fixture: {e}"));
    hsm.init_token(TOKEN, PIN, SO_PIN).unwrap();
    let pin_file = hsm.write_pin_file("pin", PIN).unwrap();
    (hsm, pin_file)
}

fn child_env(hsm: &SoftHsm, extra: &[(&str, String)]) -> Vec<(String, OsString)> {
    let mut e = hsm.env();
    e.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v))),
    );
    e
}

// ---- EC and RSA signing in SoftHSM ----

#[test]
fn softhsm_ec_keys_sign_and_verify() {
    let (hsm, pin_file) = softhsm_with_token();
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    hsm.import_key(TOKEN, &p256.serialize_pem(), "device", "01", PIN)
        .unwrap();
    hsm.import_key(TOKEN, &p384.serialize_pem(), "device384", "02", PIN)
        .unwrap();
    use rcgen::PublicKeyData;
    run_child(
        "softhsm_ec_keys_sign_and_verify",
        &child_env(
            &hsm,
            &[
                ("URI_P256", hsm.uri(TOKEN, "device", &pin_file)),
                ("URI_P384", hsm.uri(TOKEN, "device384", &pin_file)),
                ("SPKI_P256", hex(&p256.subject_public_key_info())),
                ("SPKI_P384", hex(&p384.subject_public_key_info())),
            ],
        ),
    );
}

#[test]
#[ignore = "runs in a child process of softhsm_ec_keys_sign_and_verify"]
fn child_softhsm_ec_keys_sign_and_verify() {
    if !in_child("child_softhsm_ec_keys_sign_and_verify") {
        return;
    }
    for (uri, spki, scheme, kind) in [
        (
            "URI_P256",
            "SPKI_P256",
            SignatureScheme::ECDSA_NISTP256_SHA256,
            KeyKind::EcP256,
        ),
        (
            "URI_P384",
            "SPKI_P384",
            SignatureScheme::ECDSA_NISTP384_SHA384,
            KeyKind::EcP384,
        ),
    ] {
        let src = KeySource::parse(&param(uri)).unwrap();
        let want = unhex(&param(spki));
        // The public key matches the imported one (what the certificate check relies on).
        assert_eq!(keys::public_key_spki(&src).unwrap(), want);
        let key = keys::load_signing_key(&src).unwrap();
        assert_eq!(key.algorithm(), rustls::SignatureAlgorithm::ECDSA);
        sign_and_verify(key.as_ref(), &want, scheme);
        // Only the matching curve's scheme is chosen.
        assert!(
            key.choose_scheme(&[SignatureScheme::RSA_PSS_SHA256, SignatureScheme::ED25519])
                .is_none()
        );
        let KeySource::Pkcs11(u) = &src else {
            unreachable!()
        };
        assert_eq!(Pkcs11Key::open(u).unwrap().kind(), kind);
    }
}

#[test]
fn softhsm_rsa_key_signs_all_schemes() {
    let (hsm, pin_file) = softhsm_with_token();
    let pem = rsa_pem(2048);
    let spki = spki_of_pem(hsm.dir(), &pem);
    hsm.import_key(TOKEN, &pem, "device-rsa", "03", PIN)
        .unwrap();
    // Select by id only this time.
    let uri = format!(
        "pkcs11:token={TOKEN};id=%03?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
        pin_file.display()
    );
    run_child(
        "softhsm_rsa_key_signs_all_schemes",
        &child_env(&hsm, &[("URI", uri), ("SPKI", hex(&spki))]),
    );
}

#[test]
#[ignore = "runs in a child process of softhsm_rsa_key_signs_all_schemes"]
fn child_softhsm_rsa_key_signs_all_schemes() {
    if !in_child("child_softhsm_rsa_key_signs_all_schemes") {
        return;
    }
    let src = KeySource::parse(&param("URI")).unwrap();
    let spki = unhex(&param("SPKI"));
    let key = keys::load_signing_key(&src).unwrap();
    assert_eq!(key.algorithm(), rustls::SignatureAlgorithm::RSA);
    assert_eq!(keys::spki_of(key.as_ref()).unwrap(), spki);
    for scheme in [
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PKCS1_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384,
    ] {
        sign_and_verify(key.as_ref(), &spki, scheme);
    }
    // TLS 1.3 offers only PSS for RSA; with both offered, PSS is preferred.
    let s = key
        .choose_scheme(&[
            SignatureScheme::RSA_PKCS1_SHA256,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::RSA_PSS_SHA256,
        ])
        .unwrap();
    assert_eq!(s.scheme(), SignatureScheme::RSA_PSS_SHA256);
}

// ---- recovery after the session is lost ----

#[test]
fn softhsm_session_loss_is_recovered() {
    let (hsm, pin_file) = softhsm_with_token();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    hsm.import_key(TOKEN, &kp.serialize_pem(), "device", "01", PIN)
        .unwrap();
    run_child(
        "softhsm_session_loss_is_recovered",
        &child_env(&hsm, &[("URI", hsm.uri(TOKEN, "device", &pin_file))]),
    );
}

/// Calls a function exported by the (already loaded) module, behind the key's back.
fn module_symbol(name: &str) -> *mut libc::c_void {
    let path = std::ffi::CString::new(SOFTHSM_MODULE).unwrap();
    let sym = std::ffi::CString::new(name).unwrap();
    // SAFETY: plain dlopen/dlsym of a library this process has loaded already.
    unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!handle.is_null(), "the module is not loaded");
        let f = libc::dlsym(handle, sym.as_ptr());
        assert!(!f.is_null(), "{name} not exported");
        f
    }
}

#[test]
#[ignore = "runs in a child process of softhsm_session_loss_is_recovered"]
fn child_softhsm_session_loss_is_recovered() {
    if !in_child("child_softhsm_session_loss_is_recovered") {
        return;
    }
    let KeySource::Pkcs11(uri) = KeySource::parse(&param("URI")).unwrap() else {
        unreachable!()
    };
    let key = Arc::new(Pkcs11Key::open(&uri).unwrap());
    let spki = key.spki().to_vec();
    let scheme = SignatureScheme::ECDSA_NISTP256_SHA256;
    sign_and_verify(key.as_ref(), &spki, scheme);

    // 1. Every session of the token closed (as another part of the process or a token reset
    //    would do): the next signature sees CKR_SESSION_HANDLE_INVALID and must still work.
    type CloseAll = unsafe extern "C" fn(libc::c_ulong) -> libc::c_ulong;
    // SAFETY: C_CloseAllSessions has this signature in PKCS#11.
    let close_all: CloseAll = unsafe { std::mem::transmute(module_symbol("C_CloseAllSessions")) };
    // SAFETY: a valid slot id of an initialised module.
    let rv = unsafe { close_all(key.slot_id() as libc::c_ulong) };
    assert_eq!(rv, 0, "C_CloseAllSessions");
    sign_and_verify(key.as_ref(), &spki, scheme);

    // 2. The whole library finalised (CKR_CRYPTOKI_NOT_INITIALIZED afterwards): the key
    //    initialises it again, reopens, logs in and signs.
    type Finalize = unsafe extern "C" fn(*mut libc::c_void) -> libc::c_ulong;
    // SAFETY: C_Finalize has this signature in PKCS#11.
    let finalize: Finalize = unsafe { std::mem::transmute(module_symbol("C_Finalize")) };
    // SAFETY: NULL is the required argument.
    let rv = unsafe { finalize(std::ptr::null_mut()) };
    assert_eq!(rv, 0, "C_Finalize");
    sign_and_verify(key.as_ref(), &spki, scheme);

    // 3. Signing from several threads at once shares the one session safely.
    std::thread::scope(|s| {
        for _ in 0..4 {
            let key = Arc::clone(&key);
            let spki = &spki;
            s.spawn(move || {
                for _ in 0..10 {
                    sign_and_verify(key.as_ref(), spki, scheme);
                }
            });
        }
    });
}

// ---- wrong PIN ----

#[test]
fn softhsm_wrong_pin_fails_after_one_login_attempt() {
    let (hsm, _) = softhsm_with_token();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    hsm.import_key(TOKEN, &kp.serialize_pem(), "device", "01", PIN)
        .unwrap();
    let wrong = hsm.write_pin_file("wrong-pin", "987654").unwrap();
    let spy_log = hsm.dir().join("spy.log");
    // Through OpenSC's PKCS#11 spy, which logs every call the agent makes.
    let uri = format!(
        "pkcs11:token={TOKEN};object=device?module-path={PKCS11_SPY_MODULE}&pin-source=file:{}",
        wrong.display()
    );
    let mut e = child_env(&hsm, &[("URI", uri)]);
    e.extend(env(&[
        ("PKCS11SPY", SOFTHSM_MODULE),
        ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
    ]));
    run_child("softhsm_wrong_pin_fails_after_one_login_attempt", &e);
    let log = std::fs::read_to_string(&spy_log).unwrap();
    let logins = log.lines().filter(|l| l.ends_with("C_Login")).count();
    assert_eq!(logins, 1, "expected exactly one C_Login:\n{log}");
    assert!(log.contains("CKR_PIN_INCORRECT"), "{log}");
}

#[test]
#[ignore = "runs in a child process of softhsm_wrong_pin_fails_after_one_login_attempt"]
fn child_softhsm_wrong_pin_fails_after_one_login_attempt() {
    if !in_child("child_softhsm_wrong_pin_fails_after_one_login_attempt") {
        return;
    }
    let src = KeySource::parse(&param("URI")).unwrap();
    let err = keys::load_signing_key(&src).unwrap_err();
    assert!(
        matches!(err, KeyError::WrongPin(ref t) if t == TOKEN),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("wrong PIN") && msg.contains("not retried"),
        "{msg}"
    );
    assert!(!msg.contains("987654"), "{msg}");
}

// ---- keygen in the token ----

#[test]
fn softhsm_keygen_makes_non_extractable_keys_and_valid_csrs() {
    let (hsm, pin_file) = softhsm_with_token();
    let csr_ec = hsm.dir().join("ec.csr");
    let csr_rsa = hsm.dir().join("rsa.csr");
    let ec_uri = format!(
        "pkcs11:token={TOKEN};object=gen-ec;id=%10?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
        pin_file.display()
    );
    // No id: keygen derives one from the public key.
    let rsa_uri = hsm.uri(TOKEN, "gen-rsa", &pin_file);
    run_child(
        "softhsm_keygen_makes_non_extractable_keys_and_valid_csrs",
        &child_env(
            &hsm,
            &[
                ("URI_EC", ec_uri),
                ("URI_RSA", rsa_uri),
                ("CSR_EC", csr_ec.display().to_string()),
                ("CSR_RSA", csr_rsa.display().to_string()),
            ],
        ),
    );
    for csr in [&csr_ec, &csr_rsa] {
        let csr = csr.to_str().unwrap();
        // `openssl req -verify` checks the CSR's self-signature with its public key.
        openssl(&["req", "-verify", "-noout", "-in", csr]);
        let subject = openssl(&["req", "-noout", "-subject", "-in", csr]);
        assert!(
            subject.contains("CN")
                && subject.contains("gateway-0042")
                && subject.contains("Example"),
            "{subject}"
        );
    }
    // pkcs11-tool's view of the objects.
    let listing = list_objects(&hsm);
    for label in ["gen-ec", "gen-rsa"] {
        let private = listing
            .split("Private Key Object")
            .skip(1)
            .find(|b| b.contains(&format!("label:      {label}\n")))
            .unwrap_or_else(|| panic!("no private key {label} in:\n{listing}"));
        let access = private
            .lines()
            .find(|l| l.trim_start().starts_with("Access:"))
            .unwrap_or_else(|| panic!("no Access line for {label}:\n{private}"));
        assert!(access.contains("sensitive"), "{label}: {access}");
        assert!(access.contains("never extractable"), "{label}: {access}");
    }
    assert!(
        listing.contains("label:      gen-ec\n") && listing.contains("ID:         10\n"),
        "{listing}"
    );
}

#[test]
#[ignore = "runs in a child process of softhsm_keygen_makes_non_extractable_keys_and_valid_csrs"]
fn child_softhsm_keygen_makes_non_extractable_keys_and_valid_csrs() {
    if !in_child("child_softhsm_keygen_makes_non_extractable_keys_and_valid_csrs") {
        return;
    }
    let subject = "CN=gateway-0042,O=Example";
    for (uri, csr_out, alg, kind, scheme) in [
        (
            "URI_EC",
            "CSR_EC",
            Algorithm::EcP256,
            KeyKind::EcP256,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ),
        (
            "URI_RSA",
            "CSR_RSA",
            Algorithm::Rsa2048,
            KeyKind::Rsa(2048),
            SignatureScheme::RSA_PSS_SHA256,
        ),
    ] {
        let src = KeySource::parse(&param(uri)).unwrap();
        let csr = keys::keygen(&src, subject, alg, false).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        std::fs::write(param(csr_out), &csr).unwrap();

        let KeySource::Pkcs11(u) = &src else {
            unreachable!()
        };
        let key = Pkcs11Key::open(u).unwrap();
        assert_eq!(key.kind(), kind);
        let a = key.attributes().unwrap();
        assert!(a.token && a.private && a.sign, "{a:?}");
        assert!(a.sensitive && a.always_sensitive, "{a:?}");
        assert!(!a.extractable && a.never_extractable, "{a:?}");
        sign_and_verify(&key, key.spki(), scheme);

        // The CSR carries this key.
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(csr.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
            .unwrap();
        let spki = key.spki();
        assert!(
            der.windows(spki.len()).any(|w| w == spki),
            "the CSR does not carry the token's public key"
        );

        // A second keygen is refused and leaves the key alone...
        let err = keys::keygen(&src, subject, alg, false).unwrap_err();
        assert!(matches!(err, KeyError::KeyExists(_)), "{err}");
        assert!(err.to_string().contains("--overwrite"), "{err}");
        assert_eq!(Pkcs11Key::open(u).unwrap().spki(), spki);
    }
    // ...unless told to overwrite: a new key replaces the old one (no duplicates left).
    let src = KeySource::parse(&param("URI_EC")).unwrap();
    let KeySource::Pkcs11(u) = &src else {
        unreachable!()
    };
    let old = Pkcs11Key::open(u).unwrap().spki().to_vec();
    keys::keygen(&src, subject, Algorithm::EcP256, true).unwrap();
    let new = Pkcs11Key::open(u).unwrap();
    assert_ne!(new.spki(), old.as_slice());
    sign_and_verify(&new, new.spki(), SignatureScheme::ECDSA_NISTP256_SHA256);
}

// ---- rotation in the token: a new key with the same label and a new id ----

#[test]
fn softhsm_rotation_key_same_label_new_id_then_exact_destroy() {
    let (hsm, pin_file) = softhsm_with_token();
    let uri = format!(
        "pkcs11:token={TOKEN};object=device;id=%01?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
        pin_file.display()
    );
    let rsa_uri = format!(
        "pkcs11:token={TOKEN};object=device-rsa;id=%02?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
        pin_file.display()
    );
    let new_id_out = hsm.dir().join("new-id");
    run_child(
        "softhsm_rotation_key_same_label_new_id_then_exact_destroy",
        &child_env(
            &hsm,
            &[
                ("URI_OLD", uri),
                ("URI_RSA", rsa_uri),
                ("NEW_ID_OUT", new_id_out.display().to_string()),
            ],
        ),
    );
    // pkcs11-tool's view: under the label `device` only the new key's pair is left.
    let new_id = std::fs::read_to_string(&new_id_out).unwrap();
    let listing = list_objects(&hsm);
    let objects: Vec<&str> = listing
        .split("Object;")
        .filter(|b| b.contains("label:      device\n"))
        .collect();
    assert_eq!(objects.len(), 2, "{listing}");
    for o in &objects {
        assert!(o.contains(&format!("ID:         {new_id}\n")), "{o}");
    }
    assert!(!listing.contains("ID:         01\n"), "{listing}");
}

#[test]
#[ignore = "runs in a child process of softhsm_rotation_key_same_label_new_id_then_exact_destroy"]
fn child_softhsm_rotation_key_same_label_new_id_then_exact_destroy() {
    if !in_child("child_softhsm_rotation_key_same_label_new_id_then_exact_destroy") {
        return;
    }
    let subject = "CN=gateway-0042,O=Example";
    let old_src = KeySource::parse(&param("URI_OLD")).unwrap();
    let KeySource::Pkcs11(old_uri) = &old_src else {
        unreachable!()
    };
    keys::keygen(&old_src, subject, Algorithm::EcP256, false).unwrap();
    assert!(keys::key_exists(&old_src).unwrap());
    let old_spki = Pkcs11Key::open(old_uri).unwrap().spki().to_vec();

    // The new key's place: same label, a new random id; the URI's text parses back.
    let new_uri = old_uri.with_new_id().unwrap();
    assert_eq!(
        keys::Pkcs11Uri::parse(&new_uri.to_string()).unwrap(),
        new_uri
    );
    let new_src = KeySource::Pkcs11(new_uri.clone());
    assert!(!keys::key_exists(&new_src).unwrap());
    // Plain keygen refuses (the label is taken); keygen_exact only minds label AND id.
    let err = keys::keygen(&new_src, subject, Algorithm::EcP256, false).unwrap_err();
    assert!(matches!(err, KeyError::KeyExists(_)), "{err}");
    let csr = keys::keygen_exact(&new_src, subject, Algorithm::EcP256).unwrap();
    let err = keys::keygen_exact(&new_src, subject, Algorithm::EcP256).unwrap_err();
    assert!(matches!(err, KeyError::KeyExists(_)), "{err}");
    assert!(keys::key_exists(&new_src).unwrap());

    // Each URI (label and id) opens exactly its own key.
    let new = Pkcs11Key::open(&new_uri).unwrap();
    assert_ne!(new.spki(), old_spki.as_slice());
    assert_eq!(
        Pkcs11Key::open(old_uri).unwrap().spki(),
        old_spki.as_slice()
    );
    let a = new.attributes().unwrap();
    assert!(a.token && a.private && a.sign, "{a:?}");
    assert!(a.sensitive && a.always_sensitive, "{a:?}");
    assert!(!a.extractable && a.never_extractable, "{a:?}");
    sign_and_verify(&new, new.spki(), SignatureScheme::ECDSA_NISTP256_SHA256);
    // The keygen CSR, and one made again for the existing key (a resumed run), verify and
    // carry the new key.
    for csr in [csr, keys::csr_for_existing(&new_src, subject).unwrap()] {
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::subject_public_key_info(&parsed.public_key),
            new.spki()
        );
    }
    // RSA in the token: the CSR is signed with RSA PKCS#1 v1.5 SHA-256.
    let rsa_src = KeySource::parse(&param("URI_RSA")).unwrap();
    keys::keygen_exact(&rsa_src, subject, Algorithm::Rsa2048).unwrap();
    let csr = keys::csr_for_existing(&rsa_src, subject).unwrap();
    let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
    assert_eq!(
        rcgen::PublicKeyData::algorithm(&parsed.public_key),
        &rcgen::PKCS_RSA_SHA256
    );

    // The label alone now names two keys: opening and destroying by it are refused.
    let by_label = keys::Pkcs11Uri {
        id: None,
        ..old_uri.clone()
    };
    let err = Pkcs11Key::open(&by_label).unwrap_err();
    assert!(
        matches!(err, KeyError::AmbiguousKey { count: 2, .. }),
        "{err}"
    );
    let err = keys::destroy_key(&KeySource::Pkcs11(by_label.clone())).unwrap_err();
    assert!(matches!(err, KeyError::AmbiguousKey { .. }), "{err}");

    // Destroying the old key leaves the new one whole (it still loads, with its public key
    // object, and signs); destroying it again is fine.
    keys::destroy_key(&old_src).unwrap();
    assert!(!keys::key_exists(&old_src).unwrap());
    let err = Pkcs11Key::open(old_uri).unwrap_err();
    assert!(matches!(err, KeyError::NoKey { .. }), "{err}");
    keys::destroy_key(&old_src).unwrap();
    let again = Pkcs11Key::open(&new_uri).unwrap();
    assert_eq!(again.spki(), new.spki());
    sign_and_verify(&again, again.spki(), SignatureScheme::ECDSA_NISTP256_SHA256);
    assert_eq!(Pkcs11Key::open(&by_label).unwrap().spki(), new.spki());

    let id = new_uri.id.as_ref().unwrap();
    std::fs::write(param("NEW_ID_OUT"), hex(id)).unwrap();
}

// ---- keygen to a PEM file, and PEM key checks ----

#[test]
fn pem_keygen_writes_a_0600_key_and_a_valid_csr() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.key");
    let src = KeySource::Pem(path.clone());
    let csr = keys::keygen(
        &src,
        "CN=gateway-0042,O=Example",
        Algorithm::default(),
        false,
    )
    .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    let csr_path = dir.path().join("device.csr");
    std::fs::write(&csr_path, &csr).unwrap();
    openssl(&[
        "req",
        "-verify",
        "-noout",
        "-in",
        csr_path.to_str().unwrap(),
    ]);
    // The key loads, and its public key is the CSR's.
    let key = keys::load_signing_key(&src).unwrap();
    let spki = keys::spki_of(key.as_ref()).unwrap();
    let csr_pub = openssl(&[
        "req",
        "-noout",
        "-pubkey",
        "-in",
        csr_path.to_str().unwrap(),
    ]);
    let key_pub = openssl(&["pkey", "-pubout", "-in", path.to_str().unwrap()]);
    assert_eq!(csr_pub, key_pub);
    sign_and_verify(key.as_ref(), &spki, SignatureScheme::ECDSA_NISTP256_SHA256);
    // No silent overwrite.
    let err = keys::keygen(&src, "CN=x", Algorithm::EcP256, false).unwrap_err();
    assert!(matches!(err, KeyError::KeyExists(_)), "{err}");
}

#[test]
fn pem_keys_in_every_format_load_and_small_rsa_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        keys::load_signing_key(&KeySource::Pem(p))
    };
    let rsa = rsa_pem(2048);
    let spki = spki_of_pem(dir.path(), &rsa);
    let rsa_file = dir.path().join("rsa.pem");
    std::fs::write(&rsa_file, &rsa).unwrap();
    let pkcs1 = openssl(&["pkey", "-traditional", "-in", rsa_file.to_str().unwrap()]);
    assert!(pkcs1.contains("BEGIN RSA PRIVATE KEY"));
    for (name, pem) in [("p8.pem", &rsa), ("p1.pem", &pkcs1)] {
        let key = load(name, pem).unwrap();
        for scheme in [
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA256,
        ] {
            sign_and_verify(key.as_ref(), &spki, scheme);
        }
    }
    let ec = openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
    ]);
    let ec_file = dir.path().join("ec.pem");
    std::fs::write(&ec_file, &ec).unwrap();
    let sec1 = openssl(&["pkey", "-traditional", "-in", ec_file.to_str().unwrap()]);
    assert!(sec1.contains("BEGIN EC PRIVATE KEY"));
    let ec_spki = spki_of_pem(dir.path(), &ec);
    let key = load("sec1.pem", &sec1).unwrap();
    sign_and_verify(
        key.as_ref(),
        &ec_spki,
        SignatureScheme::ECDSA_NISTP384_SHA384,
    );

    let err = load("small.pem", &rsa_pem(1024)).unwrap_err();
    assert!(matches!(err, KeyError::RsaTooSmall(1024)), "{err}");
    assert!(err.to_string().contains("2048"), "{err}");
    let ed = openssl(&["genpkey", "-algorithm", "ED25519"]);
    let err = load("ed.pem", &ed).unwrap_err();
    assert!(matches!(err, KeyError::UnsupportedKeyType(_)), "{err}");
}

// ---- errors that name the fix ----

#[test]
fn softhsm_selection_errors_say_what_to_fix() {
    let (hsm, pin_file) = softhsm_with_token();
    let unreadable = hsm.dir().join("no-such-pin");
    run_child(
        "softhsm_selection_errors_say_what_to_fix",
        &child_env(
            &hsm,
            &[
                ("URI_NO_TOKEN", hsm.uri("other", "device", &pin_file)),
                ("URI_NO_KEY", hsm.uri(TOKEN, "missing", &pin_file)),
                ("URI_NO_PIN_FILE", hsm.uri(TOKEN, "device", &unreadable)),
                (
                    "URI_BAD_MODULE",
                    format!("pkcs11:token={TOKEN}?module-path=/nonexistent/libnothing.so"),
                ),
                (
                    "URI_NO_PIN",
                    format!("pkcs11:token={TOKEN};object=x?module-path={SOFTHSM_MODULE}"),
                ),
            ],
        ),
    );
}

#[test]
#[ignore = "runs in a child process of softhsm_selection_errors_say_what_to_fix"]
fn child_softhsm_selection_errors_say_what_to_fix() {
    if !in_child("child_softhsm_selection_errors_say_what_to_fix") {
        return;
    }
    let load = |v: &str| keys::load_signing_key(&KeySource::parse(&param(v)).unwrap()).unwrap_err();
    let e = load("URI_NO_TOKEN");
    assert!(
        matches!(e, KeyError::NoToken { .. }) && e.to_string().contains("--list-token-slots"),
        "{e}"
    );
    let e = load("URI_NO_KEY");
    assert!(
        matches!(e, KeyError::NoKey { .. }) && e.to_string().contains("--list-objects"),
        "{e}"
    );
    let e = load("URI_NO_PIN_FILE");
    assert!(matches!(e, KeyError::PinFileUnreadable { .. }), "{e}");
    let e = load("URI_BAD_MODULE");
    assert!(
        matches!(e, KeyError::ModuleLoad { .. }) && e.to_string().contains("module-path"),
        "{e}"
    );
    let e = load("URI_NO_PIN");
    assert!(
        matches!(e, KeyError::MissingPin(_)) && e.to_string().contains("pin-source"),
        "{e}"
    );
}

// ---- TPM 2.0 ----

#[test]
fn tpm_ec_key_signs_and_verifies() {
    let tpm = Tpm::start().unwrap_or_else(|e| panic!("TPM fixture could not start: {e}"));
    let mut e = tpm.env();
    e.extend(env(&[("URI", tpm.uri()), ("SPKI", &hex(tpm.spki()))]));
    run_child("tpm_ec_key_signs_and_verifies", &e);
}

#[test]
#[ignore = "runs in a child process of tpm_ec_key_signs_and_verifies"]
fn child_tpm_ec_key_signs_and_verifies() {
    if !in_child("child_tpm_ec_key_signs_and_verifies") {
        return;
    }
    let src = KeySource::parse(&param("URI")).unwrap();
    let spki = unhex(&param("SPKI"));
    let key = keys::load_signing_key(&src).unwrap();
    assert_eq!(keys::spki_of(key.as_ref()).unwrap(), spki);
    for _ in 0..3 {
        sign_and_verify(key.as_ref(), &spki, SignatureScheme::ECDSA_NISTP256_SHA256);
    }
}

#[test]
fn softhsm_pin_changed_under_a_running_key_is_tried_once() {
    let (hsm, pin_file) = softhsm_with_token();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    hsm.import_key(TOKEN, &kp.serialize_pem(), "device", "01", PIN)
        .unwrap();
    let spy_log = hsm.dir().join("spy.log");
    let uri = format!(
        "pkcs11:token={TOKEN};object=device?module-path={PKCS11_SPY_MODULE}&pin-source=file:{}",
        pin_file.display()
    );
    let mut e = child_env(&hsm, &[("URI", uri)]);
    e.extend(env(&[
        ("PKCS11SPY", SOFTHSM_MODULE),
        ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
    ]));
    run_child("softhsm_pin_changed_under_a_running_key_is_tried_once", &e);
    let log = std::fs::read_to_string(&spy_log).unwrap();
    let logins = log.lines().filter(|l| l.ends_with("C_Login")).count();
    // The first login, and one after the session was lost; none for later signatures.
    assert_eq!(logins, 2, "expected exactly two C_Login calls:\n{log}");
}

#[test]
#[ignore = "runs in a child process of softhsm_pin_changed_under_a_running_key_is_tried_once"]
fn child_softhsm_pin_changed_under_a_running_key_is_tried_once() {
    if !in_child("child_softhsm_pin_changed_under_a_running_key_is_tried_once") {
        return;
    }
    let KeySource::Pkcs11(uri) = KeySource::parse(&param("URI")).unwrap() else {
        unreachable!()
    };
    let key = Pkcs11Key::open(&uri).unwrap();
    let scheme = SignatureScheme::ECDSA_NISTP256_SHA256;
    sign_and_verify(&key, key.spki(), scheme);
    // Someone changes the PIN (through the same module, as a second application in this
    // process would), then the session is lost.
    type OpenSession = unsafe extern "C" fn(
        libc::c_ulong,
        libc::c_ulong,
        *mut libc::c_void,
        *mut libc::c_void,
        *mut libc::c_ulong,
    ) -> libc::c_ulong;
    type SetPin = unsafe extern "C" fn(
        libc::c_ulong,
        *const u8,
        libc::c_ulong,
        *const u8,
        libc::c_ulong,
    ) -> libc::c_ulong;
    // SAFETY: the PKCS#11 signatures of C_OpenSession and C_SetPIN.
    let (open_session, set_pin): (OpenSession, SetPin) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, OpenSession>(module_symbol("C_OpenSession")),
            std::mem::transmute::<*mut libc::c_void, SetPin>(module_symbol("C_SetPIN")),
        )
    };
    let mut h: libc::c_ulong = 0;
    const CKF_RW_SESSION: libc::c_ulong = 2;
    const CKF_SERIAL_SESSION: libc::c_ulong = 4;
    let new_pin = b"24680";
    // SAFETY: valid slot, flags and out-pointer; buffers live across the calls.
    unsafe {
        let flags = CKF_RW_SESSION | CKF_SERIAL_SESSION;
        let rv = open_session(
            key.slot_id() as libc::c_ulong,
            flags,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut h,
        );
        assert_eq!(rv, 0, "C_OpenSession");
        let rv = set_pin(
            h,
            PIN.as_ptr(),
            PIN.len() as libc::c_ulong,
            new_pin.as_ptr(),
            new_pin.len() as libc::c_ulong,
        );
        assert_eq!(rv, 0, "C_SetPIN");
    }
    type CloseAll = unsafe extern "C" fn(libc::c_ulong) -> libc::c_ulong;
    // SAFETY: C_CloseAllSessions has this signature in PKCS#11.
    let close_all: CloseAll = unsafe { std::mem::transmute(module_symbol("C_CloseAllSessions")) };
    // SAFETY: a valid slot id of an initialised module.
    assert_eq!(unsafe { close_all(key.slot_id() as libc::c_ulong) }, 0);
    let signer = key.choose_scheme(&[scheme]).unwrap();
    for _ in 0..3 {
        let err = signer.sign(b"hello").unwrap_err();
        assert!(err.to_string().contains("wrong PIN"), "{err}");
    }
}

/// `pkcs11-tool --list-objects` of the test token, logged in.
fn list_objects(hsm: &SoftHsm) -> String {
    let out = hsm
        .command("pkcs11-tool")
        .args(["--module", SOFTHSM_MODULE, "--token-label", TOKEN])
        .args(["--login", "--pin", PIN, "--list-objects"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}
