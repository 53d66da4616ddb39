//! `[[role]]`: provider and chained roles, their file sinks, and the checks between roles
//! (unique names, existing sources, no cycles, one writer per file).

use std::path::PathBuf;
use std::time::Duration;

use iotcred_core::render::Format;
use iotcred_core::{CredentialDuration, Request, RoleAlias};

use super::read::{Cx, Table, Val};
use super::{
    ChainedRole, FileSink, Identity, ProviderRole, Role, RoleSource, parse_mode, valid_role_name,
};

/// The roles, and the names of all roles that have a valid name (for references to them).
pub(super) struct Roles {
    pub roles: Vec<Role>,
    pub names: Vec<String>,
}

/// What a `[[role]]` said, before the roles are checked against each other.
struct RoleEntry<'t> {
    name: Option<Val<&'t str>>,
    source_role: Option<Val<&'t str>>,
    role: Option<Role>,
}

pub(super) fn read_roles(cx: &Cx<'_>, root: &mut Table<'_, '_>, identity: &Identity) -> Roles {
    let tables = root.tables("role");
    if tables.is_empty() {
        cx.report_at(
            None,
            "no [[role]] configured: add at least one [[role]] with `name` and `role_alias`",
        );
    }
    let mut entries = Vec::with_capacity(tables.len());
    for mut t in tables {
        entries.push(read_role(cx, &mut t, identity));
        t.finish();
    }
    let mut names: Vec<String> = Vec::new();
    for e in &entries {
        let Some(name) = &e.name else { continue };
        if names.iter().any(|n| n == name.value) {
            cx.report(
                name,
                format!(
                    "role name {:?} is used twice: names must be unique",
                    name.value
                ),
            );
        } else {
            names.push(name.value.to_string());
        }
    }
    check_chains(cx, &entries);
    Roles {
        roles: entries.into_iter().filter_map(|e| e.role).collect(),
        names,
    }
}

fn read_role<'t>(cx: &Cx<'_>, t: &mut Table<'t, '_>, identity: &Identity) -> RoleEntry<'t> {
    let name = t
        .required_str("name", "give the role a name (used in routes, token files and profiles)")
        .filter(|v| {
            let ok = valid_role_name(v.value);
            if !ok {
                cx.report(
                    v,
                    format!(
                        "role name {:?}: use 1-64 characters of A-Z a-z 0-9 _ - . (not starting with .)",
                        v.value
                    ),
                );
            }
            ok
        });
    let alias = t.str("role_alias");
    let source_role = t.str("source_role");
    let source = match (&alias, &source_role) {
        (Some(alias), None) => read_provider(cx, t, alias, identity).map(RoleSource::Provider),
        (None, Some(src)) => read_chained(cx, t, src, identity).map(RoleSource::Chained),
        (Some(_), Some(src)) => {
            t.skip(&ROLE_SOURCE_KEYS);
            cx.report(
                src,
                "a role has either role_alias (credentials provider) or source_role (STS), not both",
            );
            None
        }
        // A role_alias or source_role of the wrong type was reported.
        (None, None) if t.has("role_alias") || t.has("source_role") => {
            t.skip(&ROLE_SOURCE_KEYS);
            None
        }
        (None, None) => {
            t.skip(&ROLE_SOURCE_KEYS);
            cx.report_at(
                Some(t.span()),
                format!(
                    "role{}: give role_alias (credentials provider), or source_role and assume_role_arn (STS)",
                    name.as_ref().map(|n| format!(" {:?}", n.value)).unwrap_or_default()
                ),
            );
            None
        }
    };
    let allow_uids = t.ids("allow_uids");
    let allow_gids = t.ids("allow_gids");
    let files = read_files(cx, t);
    let role = (|| {
        Some(Role {
            name: name.as_ref()?.value.to_string(),
            source: source?,
            allow_uids: allow_uids?,
            allow_gids: allow_gids?,
            files: files?,
        })
    })();
    RoleEntry {
        name,
        source_role: source_role.filter(|_| alias.is_none()),
        role,
    }
}

/// The keys that say where a role's credentials come from.
const ROLE_SOURCE_KEYS: [&str; 6] = [
    "role_alias",
    "source_role",
    "assume_role_arn",
    "session_name",
    "external_id",
    "duration_seconds",
];

/// Keys only a chained role has.
const CHAINED_ONLY: [&str; 3] = ["assume_role_arn", "session_name", "external_id"];

fn read_provider(
    cx: &Cx<'_>,
    t: &mut Table<'_, '_>,
    alias: &Val<&str>,
    identity: &Identity,
) -> Option<ProviderRole> {
    for key in CHAINED_ONLY {
        if let Some(v) = t.str(key) {
            cx.report(
                &v,
                format!("{key} is for chained roles (with source_role), not with role_alias"),
            );
        }
    }
    let role_alias = cx.check(alias, "role_alias", RoleAlias::new(alias.value));
    let duration = match t.int("duration_seconds") {
        None => Some(None),
        Some(d) => match u32::try_from(d.value)
            .ok()
            .and_then(|s| CredentialDuration::new(s).ok())
        {
            Some(c) => Some(Some(c)),
            None => {
                cx.report(
                    &d,
                    format!(
                        "duration_seconds = {}: use 900 to 43200, at most the role alias's credentialDurationSeconds",
                        d.value
                    ),
                );
                None
            }
        },
    };
    let (role_alias, duration) = (role_alias?, duration?);
    let endpoint = identity.endpoint.as_ref()?;
    let thing = identity.thing_name.as_ref()?;
    // The endpoint was checked with core's host rules, so this only fails if those rules
    // change; it is then reported like any other invalid value.
    let request = cx.check(
        alias,
        "role_alias",
        Request::new(
            endpoint.host(),
            endpoint.port(),
            &role_alias,
            crate::USER_AGENT,
        )
        .map(|r| {
            r.with_thing_name(thing.as_ref())
                .with_duration(duration)
                .prepare()
        }),
    )?;
    Some(ProviderRole {
        role_alias,
        duration,
        request,
    })
}

fn read_chained(
    cx: &Cx<'_>,
    t: &mut Table<'_, '_>,
    source: &Val<&str>,
    identity: &Identity,
) -> Option<ChainedRole> {
    let role_arn = t
        .required_str(
            "assume_role_arn",
            "a role with source_role needs the ARN of the role to assume",
        )
        .and_then(|v| {
            cx.check(
                &v,
                format_args!("assume_role_arn = {:?}", v.value),
                check_role_arn(v.value),
            )
        });
    let session_name = match t.str("session_name") {
        Some(v) => cx.check(
            &v,
            format_args!("session_name = {:?}", v.value),
            check_session_name(v.value),
        ),
        None => match identity.thing_name.as_ref() {
            Some(Some(thing)) => match check_session_name(thing.as_str()) {
                Ok(s) => Some(s),
                Err(e) => {
                    cx.report(
                        source,
                        format!(
                            "the session name defaults to thing_name {:?}, which cannot be one ({e}): set session_name",
                            thing.as_str()
                        ),
                    );
                    None
                }
            },
            Some(None) => {
                cx.report(
                    source,
                    "a chained role needs a session name: set session_name (or thing_name, its default)",
                );
                None
            }
            // thing_name itself is invalid and reported.
            None => None,
        },
    };
    let external_id = match t.str("external_id") {
        None => Some(None),
        Some(v) => cx
            .check(&v, "external_id", check_external_id(v.value))
            .map(Some),
    };
    let duration = t.int_in("duration_seconds", 3600, 900, 3600);
    Some(ChainedRole {
        source_role: source.value.to_string(),
        role_arn: role_arn?,
        session_name: session_name?,
        external_id: external_id?,
        duration: Duration::from_secs(duration?),
    })
}

/// Why an STS value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StsValueError {
    /// Not an IAM role ARN.
    #[error("use an IAM role ARN, arn:aws:iam::<12-digit account>:role/<name>")]
    RoleArn,
    /// Wrong length.
    #[error("use {min} to {max} characters, not {len}")]
    Length {
        /// Shortest.
        min: usize,
        /// Longest.
        max: usize,
        /// Given.
        len: usize,
    },
    /// A character outside the allowed set.
    #[error("{found:?} is not allowed; use letters, digits and {allowed}")]
    Character {
        /// The character.
        found: char,
        /// The other characters allowed.
        allowed: &'static str,
    },
}

/// `arn:<aws partition>:iam::<12 digits>:role/<path/><name>` (name 1–64, whole ARN ≤ 2048).
pub fn check_role_arn(arn: &str) -> Result<String, StsValueError> {
    let bad = || StsValueError::RoleArn;
    let rest = arn.strip_prefix("arn:").ok_or_else(bad)?;
    let (partition, rest) = rest.split_once(':').ok_or_else(bad)?;
    let partition_ok = partition
        .strip_prefix("aws")
        .is_some_and(|p| p.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
    let rest = rest.strip_prefix("iam::").ok_or_else(bad)?;
    let (account, resource) = rest.split_once(':').ok_or_else(bad)?;
    let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    let path_and_name = resource.strip_prefix("role/").ok_or_else(bad)?;
    let name = path_and_name.rsplit('/').next().unwrap_or_default();
    let chars_ok = path_and_name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_/-".contains(&b));
    if partition_ok && account_ok && chars_ok && (1..=64).contains(&name.len()) && arn.len() <= 2048
    {
        Ok(arn.to_string())
    } else {
        Err(bad())
    }
}

/// `RoleSessionName`: 2–64 of `[\w+=,.@-]`.
pub fn check_session_name(s: &str) -> Result<String, StsValueError> {
    check_sts_chars(s, 2, 64, "+=,.@_-")
}

/// `ExternalId`: 2–1224 of `[\w+=,.@:/-]`.
pub fn check_external_id(s: &str) -> Result<String, StsValueError> {
    check_sts_chars(s, 2, 1224, "+=,.@:/_-")
}

fn check_sts_chars(
    s: &str,
    min: usize,
    max: usize,
    allowed: &'static str,
) -> Result<String, StsValueError> {
    let len = s.chars().count();
    if !(min..=max).contains(&len) {
        return Err(StsValueError::Length { min, max, len });
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || allowed.contains(*c)))
    {
        Some(found) => Err(StsValueError::Character { found, allowed }),
        None => Ok(s.to_string()),
    }
}

/// Every `source_role` names another existing role, and no chain comes back to where it
/// started. Each cycle is reported once, at its first role in the file.
fn check_chains(cx: &Cx<'_>, entries: &[RoleEntry<'_>]) {
    let index_of = |name: &str| {
        entries
            .iter()
            .position(|e| e.name.as_ref().is_some_and(|n| n.value == name))
    };
    let mut next: Vec<Option<usize>> = Vec::with_capacity(entries.len());
    for e in entries {
        let Some(src) = &e.source_role else {
            next.push(None);
            continue;
        };
        let own = e.name.as_ref().map(|n| n.value);
        if own == Some(src.value) {
            cx.report(
                src,
                format!(
                    "source_role = {:?}: a role cannot be its own source",
                    src.value
                ),
            );
            next.push(None);
            continue;
        }
        let target = index_of(src.value);
        if target.is_none() {
            let names: Vec<&str> = entries
                .iter()
                .filter_map(|e| e.name.as_ref().map(|n| n.value))
                .filter(|n| Some(*n) != own)
                .collect();
            cx.report(
                src,
                format!(
                    "source_role = {:?}: no such [[role]]; roles: {}",
                    src.value,
                    names.join(", ")
                ),
            );
        }
        next.push(target);
    }
    for start in 0..entries.len() {
        let mut path = vec![start];
        let mut at = start;
        while let Some(n) = next.get(at).copied().flatten() {
            if let Some(pos) = path.iter().position(|&p| p == n) {
                let cycle = path.get(pos..).unwrap_or_default();
                if cycle.iter().min() == Some(&start) {
                    let names: Vec<&str> = cycle
                        .iter()
                        .chain(std::iter::once(&n))
                        .filter_map(|&i| entries.get(i)?.name.as_ref().map(|v| v.value))
                        .collect();
                    if let Some(src) = entries.get(start).and_then(|e| e.source_role.as_ref()) {
                        cx.report(
                            src,
                            format!(
                                "source_role: the roles {} form a cycle: one of them needs a role_alias",
                                names.join(" -> ")
                            ),
                        );
                    }
                }
                break;
            }
            path.push(n);
            at = n;
        }
    }
}

fn read_files(cx: &Cx<'_>, role: &mut Table<'_, '_>) -> Option<Vec<FileSink>> {
    let mut files = Some(Vec::new());
    for mut f in role.tables("file") {
        let format = match f.str("format") {
            None => Some(Format::Ini),
            Some(v) => v.value.parse::<Format>().ok().or_else(|| {
                cx.report(
                    &v,
                    format!(
                        "role.file.format = {:?}: use \"ini\", \"json\", \"credential-process\" or \"env\"",
                        v.value
                    ),
                );
                None
            }),
        };
        let mode = match f.str("mode") {
            Some(v) => cx.check(&v, "role.file.mode", parse_mode(v.value)),
            None => Some(0o600),
        };
        let path = f
            .required_str("path", "give the file to write")
            .and_then(|v| {
                let p = cx.path(&v, "role.file.path")?;
                if p.file_name().is_none() {
                    cx.report(&v, "role.file.path must name a file");
                    return None;
                }
                Some(p)
            });
        f.finish();
        match (format, mode, path, files.as_mut()) {
            (Some(format), Some(mode), Some(path), Some(list)) => {
                list.push(FileSink { path, format, mode })
            }
            _ => files = None,
        }
    }
    files
}

pub(super) fn check_file_sinks(cx: &Cx<'_>, roles: &[Role]) {
    let all: Vec<&PathBuf> = roles
        .iter()
        .flat_map(|r| r.files.iter().map(|f| &f.path))
        .collect();
    for (i, p) in all.iter().enumerate() {
        if all.get(..i).is_some_and(|before| before.contains(p)) {
            cx.report_at(
                None,
                format!(
                    "file {} is written by two sinks: give each its own path",
                    p.display()
                ),
            );
        }
    }
}
