//! mosquitto (Debian's 2.0.x) run by the tests: one TLS listener on 127.0.0.1 that requires a
//! client certificate from the test CA and takes the certificate's CN as the user name, and an
//! ACL file that plays the AWS IoT policies.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pki::Pki;
use crate::provider::Error;
use crate::softhsm::require_file;

/// The mosquitto binary on Debian.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Request topic of CreateCertificateFromCsr.
pub const CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";

/// Request topic of RegisterThing for `template`.
pub fn provision_topic(template: &str) -> String {
    format!("$aws/provisioning-templates/{template}/provision/json")
}

/// The ACL: which user name (certificate CN) may do what.
///
/// Claim and device users get, for CreateCertificateFromCsr and for RegisterThing of every
/// template: `write` on the request topic and `read` (subscribe and receive) on its `/accepted`
/// and `/rejected` topics — the claim policy and the device policy of AWS's documentation. The
/// responder's user may read and write everything under `$aws/`. Any topic listed in `deny` is
/// left out of the claim and device rules (mosquitto then drops a denied publish silently, as
/// AWS IoT does, and refuses a denied subscription).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    /// CN of the claim certificate.
    pub claim_user: String,
    /// CNs of device certificates (the CSR subjects the agent sends; AWS's device policy).
    pub device_users: Vec<String>,
    /// CN of the responder's certificate.
    pub responder_user: String,
    /// Templates whose RegisterThing topics are granted.
    pub templates: Vec<String>,
    /// Topics left out of the claim and device rules.
    pub deny: Vec<String>,
}

impl Acl {
    /// The grants of one claim or device user.
    fn api_topics(&self) -> Vec<(&'static str, String)> {
        let mut requests = vec![CSR_TOPIC.to_owned()];
        requests.extend(self.templates.iter().map(|t| provision_topic(t)));
        let mut out = Vec::new();
        for r in requests {
            out.push(("read", format!("{r}/accepted")));
            out.push(("read", format!("{r}/rejected")));
            out.push(("write", r));
        }
        out.retain(|(_, t)| !self.deny.contains(t));
        out
    }

    /// The ACL file's text.
    pub fn render(&self) -> String {
        let mut s = String::from("# written by the iotcred test fixture\n");
        let mut users = vec![self.claim_user.clone()];
        users.extend(self.device_users.iter().cloned());
        users.dedup();
        for u in users {
            let _ = writeln!(s, "\nuser {u}");
            for (access, topic) in self.api_topics() {
                let _ = writeln!(s, "topic {access} {topic}");
            }
        }
        let _ = writeln!(s, "\nuser {}\ntopic readwrite $aws/#", self.responder_user);
        s
    }
}

/// A running (or stopped) mosquitto with its files in `dir`. Killed on drop.
#[derive(Debug)]
pub struct Broker {
    dir: PathBuf,
    port: u16,
    conf: PathBuf,
    acl_path: PathBuf,
    log: PathBuf,
    tcp_nodelay: bool,
    child: Option<Child>,
}

const START_LIMIT: Duration = Duration::from_secs(20);

impl Broker {
    /// Writes the configuration into `dir` (created) and starts mosquitto on an ephemeral port
    /// of 127.0.0.1 with `pki`'s CA and server certificate. Returns once the port accepts
    /// connections.
    pub fn start(dir: &Path, pki: &Pki, acl: &Acl) -> Result<Broker, Error> {
        Broker::start_with(dir, pki, acl, false)
    }

    /// [`Broker::start`], with mosquitto's `set_tcp_nodelay` set to `tcp_nodelay`.
    pub fn start_with(
        dir: &Path,
        pki: &Pki,
        acl: &Acl,
        tcp_nodelay: bool,
    ) -> Result<Broker, Error> {
        require_file(MOSQUITTO, "mosquitto").map_err(|e| Error::Config(e.0))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let acl_path = dir.join("acl");
        write(&acl_path, &acl.render())?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let mut broker = Broker {
                dir: dir.to_path_buf(),
                port,
                conf: dir.join("mosquitto.conf"),
                acl_path: acl_path.clone(),
                log: dir.join("mosquitto.log"),
                tcp_nodelay,
                child: None,
            };
            broker.write_conf(pki)?;
            match broker.spawn_and_wait() {
                Ok(()) => return Ok(broker),
                Err(e) => last = e.to_string(),
            }
            // Another process took the port between our probe and mosquitto's bind: retry.
            if !last.contains("Address already in use") {
                break;
            }
        }
        Err(Error::Config(format!("mosquitto did not start: {last}")))
    }

    fn write_conf(&self, pki: &Pki) -> Result<(), Error> {
        let mut c = String::new();
        // As root mosquitto would switch to the `mosquitto` user, who cannot read the test's
        // 0600 keys; stay root (the option is only valid when started as root).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            c.push_str("user root\n");
        }
        let _ = write!(
            c,
            "persistence false\nallow_anonymous false\nper_listener_settings false\n\
             log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n\
             log_type information\nconnection_messages true\nlog_timestamp_format %H:%M:%S\n\
             acl_file {acl}\nmax_keepalive 600\n\
             listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
             require_certificate true\nuse_identity_as_username true\n",
            log = self.log.display(),
            acl = self.acl_path.display(),
            port = self.port,
            ca = pki.ca_cert.display(),
            cert = pki.server.cert.display(),
            key = pki.server.key.display(),
        );
        if self.tcp_nodelay {
            c.push_str("set_tcp_nodelay true\n");
        }
        write(&self.conf, &c)
    }

    fn spawn_and_wait(&mut self) -> Result<(), Error> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.stderr"))
            .map_err(|e| Error::io("mosquitto stderr file".into(), e))?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::io(format!("starting {MOSQUITTO}"), e))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_LIMIT;
        let addr = self.addr();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(Error::Config(format!(
                        "mosquitto exited ({status}): {}",
                        self.logs()
                    )));
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::Config(format!(
                    "mosquitto did not listen on {addr} within {START_LIMIT:?}: {}",
                    self.logs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills mosquitto (SIGKILL): every client connection breaks at once, mid-flow.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts mosquitto again on the same port (after [`Broker::kill`]), re-reading the ACL file.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        // The listening socket of the killed process is gone; mosquitto binds with SO_REUSEADDR.
        self.spawn_and_wait()
    }

    /// Rewrites the ACL file and restarts the broker so that it is in force (deterministic,
    /// unlike a SIGHUP reload, whose completion cannot be observed from outside).
    pub fn set_acl(&mut self, acl: &Acl) -> Result<(), Error> {
        write(&self.acl_path, &acl.render())?;
        self.restart()
    }

    /// mosquitto's log and stderr so far.
    pub fn logs(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.join("mosquitto.stderr")).unwrap_or_default();
        format!("{log}{err}")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("binding 127.0.0.1:0".into(), e))?;
    let port = l
        .local_addr()
        .map_err(|e| Error::io("local address".into(), e))?
        .port();
    Ok(port)
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_denies_listed_topics() {
        let acl = Acl {
            claim_user: "claim".into(),
            device_users: vec!["iotcred".into()],
            responder_user: "responder".into(),
            templates: vec!["T".into()],
            deny: vec![provision_topic("T")],
        };
        let text = acl.render();
        assert!(
            text.contains("user claim\ntopic read $aws/certificates/create-from-csr/json/accepted")
        );
        assert!(text.contains("topic write $aws/certificates/create-from-csr/json\n"));
        assert!(!text.contains("topic write $aws/provisioning-templates/T/provision/json\n"));
        assert!(text.contains("topic read $aws/provisioning-templates/T/provision/json/accepted"));
        assert!(text.contains("user responder\ntopic readwrite $aws/#"));
    }
}
