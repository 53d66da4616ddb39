//! What `/v1/health` and `/v1/metrics` say about the device identity: provisioning state,
//! certificate expiry, rotation state and counters. Written by the daemon, read by the server.

use std::sync::{Arc, Mutex};

use iotcred_core::UnixTime;

/// Whether the device has an identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IdentityState {
    /// It has one.
    #[default]
    Provisioned,
    /// It has none, and no provisioning is running right now.
    NotProvisioned,
    /// A provisioning is running.
    Provisioning,
}

impl IdentityState {
    /// As shown in health.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityState::Provisioned => "provisioned",
            IdentityState::NotProvisioned => "not provisioned",
            IdentityState::Provisioning => "provisioning",
        }
    }
}

/// Where rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RotationState {
    /// No `[rotation]`.
    #[default]
    Off,
    /// Waiting for the certificate to come within `before_days` of its expiry.
    Idle,
    /// Due (a try is scheduled).
    Due,
    /// A rotation is running.
    Rotating,
    /// The last try failed; another follows after a backoff.
    Failed,
}

impl RotationState {
    /// As shown in health.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationState::Off => "off",
            RotationState::Idle => "idle",
            RotationState::Due => "due",
            RotationState::Rotating => "rotating",
            RotationState::Failed => "failed",
        }
    }
}

/// The identity's status.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Provisioned or not.
    pub identity: IdentityState,
    /// The thing name in use.
    pub thing_name: Option<String>,
    /// AWS IoT's certificate id, when recorded.
    pub certificate_id: Option<String>,
    /// The leaf certificate's notAfter.
    pub certificate_expiration: Option<UnixTime>,
    /// Rotation.
    pub rotation: RotationState,
    /// When the next rotation try is due (device wall clock).
    pub next_rotation: Option<UnixTime>,
    /// Failed tries in a row (provisioning or rotation).
    pub failures: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// The last successful rotation.
    pub last_rotation: Option<UnixTime>,
    /// Successful and failed rotations since start.
    pub rotations: (u64, u64),
    /// Successful and failed provisionings since start.
    pub provisionings: (u64, u64),
}

/// The shared status.
#[derive(Clone, Debug, Default)]
pub struct Status(Arc<Mutex<Snapshot>>);

impl Status {
    /// A copy of the current status.
    pub fn snapshot(&self) -> Snapshot {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the status.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Health's `identity` object.
    pub fn health_json(&self) -> serde_json::Value {
        let s = self.snapshot();
        let t = |u: Option<UnixTime>| u.map(|u| u.rfc3339().to_string());
        // The worker's failures are provisioning's until the device has an identity, then
        // rotation's.
        let provisioned = s.identity == IdentityState::Provisioned;
        let (rotation_failures, rotation_error) = if provisioned {
            (s.failures, s.last_error.clone())
        } else {
            (0, None)
        };
        serde_json::json!({
            "state": s.identity.as_str(),
            "thing_name": s.thing_name,
            "certificate_id": s.certificate_id,
            "certificate_expiration": t(s.certificate_expiration),
            "failures": s.failures,
            "last_error": s.last_error,
            "rotation": {
                "state": s.rotation.as_str(),
                "next_attempt": t(s.next_rotation),
                "failures": rotation_failures,
                "last_error": rotation_error,
                "last_rotation": t(s.last_rotation),
            },
        })
    }

    /// The identity's Prometheus lines.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let s = self.snapshot();
        let _ = writeln!(
            out,
            "# HELP iotcred_provisioned Whether the device has an identity (1) or not yet (0).\n# TYPE iotcred_provisioned gauge\niotcred_provisioned {}",
            u8::from(s.identity == IdentityState::Provisioned)
        );
        if let Some(exp) = s.certificate_expiration {
            let _ = writeln!(
                out,
                "# HELP iotcred_certificate_expiry_timestamp_seconds The device certificate's notAfter.\n# TYPE iotcred_certificate_expiry_timestamp_seconds gauge\niotcred_certificate_expiry_timestamp_seconds {}",
                exp.as_secs()
            );
        }
        let _ = writeln!(
            out,
            "# HELP iotcred_rotations_total Certificate rotations, by result.\n# TYPE iotcred_rotations_total counter\niotcred_rotations_total{{result=\"success\"}} {}\niotcred_rotations_total{{result=\"failure\"}} {}",
            s.rotations.0, s.rotations.1
        );
        let _ = writeln!(
            out,
            "# HELP iotcred_provisioning_total Fleet provisioning runs, by result.\n# TYPE iotcred_provisioning_total counter\niotcred_provisioning_total{{result=\"success\"}} {}\niotcred_provisioning_total{{result=\"failure\"}} {}",
            s.provisionings.0, s.provisionings.1
        );
        let _ = writeln!(
            out,
            "# HELP iotcred_rotation_due Whether a rotation is due or failing (1) or not (0).\n# TYPE iotcred_rotation_due gauge\niotcred_rotation_due {}",
            u8::from(matches!(
                s.rotation,
                RotationState::Due | RotationState::Rotating | RotationState::Failed
            ))
        );
    }
}
