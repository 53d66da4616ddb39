//! The exit codes of SPEC §5, spelled once.

use iotcred_core::ErrorClass;

/// How an `iotcred` command ended (SPEC §5).
/// Ordered by code, so the least of several failures is the most specific (3 before 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Exit {
    /// 0: success.
    Ok = 0,
    /// 1: anything else.
    Other = 1,
    /// 2: usage or configuration error (for `get`: an unknown role).
    Config = 2,
    /// 3: permanent upstream rejection (400/401/403/404).
    Permanent = 3,
    /// 4: transient failure (network, TLS, 429, 5xx, timeout, protocol error).
    Transient = 4,
    /// 5: the agent is unreachable, refusing (401/403) or without credentials yet.
    Agent = 5,
}

impl Exit {
    /// The code the process exits with.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl From<ErrorClass> for Exit {
    fn from(class: ErrorClass) -> Exit {
        match class {
            ErrorClass::Permanent => Exit::Permanent,
            ErrorClass::Transient => Exit::Transient,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_spec_codes() {
        let all = [
            (Exit::Ok, 0),
            (Exit::Other, 1),
            (Exit::Config, 2),
            (Exit::Permanent, 3),
            (Exit::Transient, 4),
            (Exit::Agent, 5),
        ];
        for (exit, code) in all {
            assert_eq!(exit.code(), code);
        }
        assert_eq!(Exit::from(ErrorClass::Permanent), Exit::Permanent);
        assert_eq!(Exit::from(ErrorClass::Transient), Exit::Transient);
    }
}
