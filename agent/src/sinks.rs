//! File sinks (SPEC §4.2): every format written atomically with its final mode.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::config::FileSink;
use crate::state::Served;

/// Replaces `path` with `contents` so that a reader sees either the old or the new file, never
/// a partial one, and never a file with a mode wider than `mode`:
/// a temporary file is created in the same directory with `mode` (O_EXCL), written, fsynced,
/// renamed over `path`, and the directory is fsynced.
pub fn write_atomic(path: &Path, mode: u32, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path names no file"))?;
    let mut rnd = [0u8; 6];
    getrandom::fill(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
    let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{}.{suffix}.tmp", name.to_string_lossy()));
    let result = (|| {
        // Created with `mode` (narrowed by the umask), then set exactly: never wider than `mode`.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temporary files that an earlier run of [`write_atomic`] for `path` left behind when
/// it was killed between creating and renaming them (`.<name>.<12 hex digits>.tmp` in the same
/// directory). Call it before the first write of a sink; only one agent writes a sink.
pub fn remove_stale_temps(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let is_ours = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .is_some_and(|hex| hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_ours && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Writes one sink for `role` from servable credentials.
pub fn write_sink(sink: &FileSink, role: &str, served: &Served) -> io::Result<()> {
    let text = sink
        .format
        .render(role, &served.credentials, served.expiration);
    write_atomic(&sink.path, sink.mode, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_mode_and_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        write_atomic(&p, 0o640, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        write_atomic(&p, 0o600, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temps_of_a_killed_write_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        fs::write(d.path().join(".creds.0123456789ab.tmp"), b"partial").unwrap();
        fs::write(d.path().join(".other.0123456789ab.tmp"), b"not ours").unwrap();
        fs::write(d.path().join(".creds.notours.tmp"), b"not ours").unwrap();
        remove_stale_temps(&p);
        let mut names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![".creds.notours.tmp", ".other.0123456789ab.tmp"]);
    }

    #[test]
    fn failure_leaves_old_file_and_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        write_atomic(&p, 0o600, b"old").unwrap();
        // Renaming a file over a directory fails: the old content must stay.
        let target = d.path().join("adir");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, 0o600, b"new").is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
